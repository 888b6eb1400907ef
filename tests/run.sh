#!/usr/bin/env bash
# Runs every test of conntrack-metrics: formatting, lints, unit and property
# tests, the fixture golden tests, the end-to-end tests against the real
# kernel (in network namespaces it creates and removes), the benches in test
# mode, and a compile check of the fuzz targets.
#
# Needs root (namespaces, nftables, conntrack). Installs the Debian packages
# (and the one PyPI package) the tests use when they are missing.
# Usage: sudo tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: needs root (network namespaces, nftables, conntrack): sudo tests/run.sh" >&2
    exit 2
fi

missing=()
for tool_pkg in ip:iproute2 nft:nftables conntrack:conntrack python3:python3 curl:curl promtool:prometheus ab:apache2-utils; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || missing+=("${tool_pkg#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The reference OpenMetrics parser, for the python3 on PATH (which may not be Debian's).
if ! python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
    echo "tests/run.sh: installing prometheus-client (PyPI) for the OpenMetrics check"
    python3 -m pip install -q --disable-pip-version-check prometheus-client
fi

step() { printf '\n==> %s\n' "$*"; "$@"; }

step cargo fmt --all -- --check
step cargo clippy --all-targets -- -D warnings
step cargo check --manifest-path fuzz/Cargo.toml --bins

# Unit, property, fixture and kernel tests; the benches run once in test mode.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
printf '\n==> cargo test --all-targets\n'
cargo test --all-targets 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
