#!/usr/bin/env bash
# Runs every test of conntrack-metrics: formatting, lints, unit and property
# tests, the fixture golden tests, the end-to-end tests against the real
# kernel (in network namespaces it creates and removes), the benches in test
# mode, a compile check of the fuzz targets, and the deployment manifests and
# dashboard (deploy/validate.sh).
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
# The reference OpenMetrics parser and PyYAML (deploy/validate.sh), for the
# python3 on PATH (which may not be Debian's). deploy/validate.sh installs
# kubernetes-validate (PyPI) itself.
for module_pkg in prometheus_client.openmetrics.parser:prometheus-client yaml:pyyaml; do
    if ! python3 -c "import ${module_pkg%%:*}" 2>/dev/null; then
        echo "tests/run.sh: installing ${module_pkg#*:} (PyPI)"
        python3 -m pip install -q --disable-pip-version-check "${module_pkg#*:}"
    fi
done

step() { printf '\n==> %s\n' "$*"; "$@"; }

step cargo fmt --all -- --check
step cargo clippy --all-targets -- -D warnings
step cargo check --manifest-path fuzz/Cargo.toml --bins
# The deployment manifests against the Kubernetes schemas, and every dashboard
# query against a real Prometheus scraping the exporter in a namespace.
step cargo build
step env EXPORTER=target/debug/conntrack-metrics deploy/validate.sh

# Unit, property, fixture and kernel tests; the benches run once in test mode.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
printf '\n==> cargo test --all-targets\n'
cargo test --all-targets 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
