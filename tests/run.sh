#!/usr/bin/env bash
# Runs every test of conntrack-metrics: formatting, lints, unit and property
# tests, the loom model of the shard protocol (a build of its own with
# --cfg loom, in target/loom), the fixture golden tests, the end-to-end tests
# against the real kernel (in network namespaces it creates and removes), the
# benches in test mode, a compile check of the fuzz targets, and the
# deployment manifests, dashboard and image (deploy/validate.sh), and a small run of
# each load-test harness (loadtest/: the ab workload, the iperf3 throughput
# workload, the overhead benchmark with UDP and TCP flows), each failing when
# the exporter missed a flow or lost an event.
#
# Needs root (namespaces, nftables, conntrack). Installs the Debian packages
# and the PyPI packages the tests use when they are missing.
# Usage, as root: tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: needs root (network namespaces, nftables, conntrack): run it as root" >&2
    exit 2
fi

missing=()
for tool_pkg in ip:iproute2 nft:nftables conntrack:conntrack python3:python3 curl:curl promtool:prometheus \
                ab:apache2-utils iperf3:iperf3 bc:bc iptables-save:iptables \
                podman:podman runc:runc readelf:binutils; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || missing+=("${tool_pkg#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The reference OpenMetrics parser, PyYAML (deploy/validate.sh) and matplotlib
# (the load-test plots), for the python3 on PATH (which may not be Debian's).
# deploy/validate.sh installs kubernetes-validate (PyPI) itself.
# A python3 without pip gets Debian's; one whose packages Debian manages
# (PEP 668) takes them with --break-system-packages, as root may.
pip_install() {
    python3 -m pip --version >/dev/null 2>&1 || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
    }
    python3 -m pip install -q --disable-pip-version-check "$@" 2>/dev/null ||
        python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@"
}
for module_pkg in prometheus_client.openmetrics.parser:prometheus-client yaml:pyyaml matplotlib:matplotlib; do
    if ! python3 -c "import ${module_pkg%%:*}" 2>/dev/null; then
        echo "tests/run.sh: installing ${module_pkg#*:} (PyPI)"
        pip_install "${module_pkg#*:}"
    fi
done

step() { printf '\n==> %s\n' "$*"; "$@"; }

step cargo fmt --all -- --check
step cargo clippy --all-targets -- -D warnings
step cargo check --manifest-path fuzz/Cargo.toml --bins
# The deployment manifests against the Kubernetes schemas, every dashboard
# query against a real Prometheus scraping the exporter in a namespace, and the
# image (a static release build FROM scratch) built and started with podman.
step cargo build
step env EXPORTER=target/debug/conntrack-metrics deploy/validate.sh

# Unit, property, fixture and kernel tests; the benches run once in test mode.
log=$(mktemp)
smoke=$(mktemp -d)
trap 'rm -rf "$log" "$smoke"' EXIT
printf '\n==> cargo test --all-targets\n'
cargo test --all-targets 2>&1 | tee "$log"
# The loom model of the shard protocol (src/stats/shard.rs, loom_model), in a
# target dir of its own so that the --cfg loom build leaves the normal one be.
step env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom 2>&1 | tee -a "$log"

# The load-test harnesses, small (about a minute and a half in all), with the debug build
# (their figures are not the point here). Each exits non-zero when the
# exporter's flow count differs from the nft counters or it overran.
export EXPORTER=target/debug/conntrack-metrics FLOOR=target/debug/ct-count
step env SERVICES=2 CLIENTS=2 CONN_PER_CLIENT=300 CLIENT_CONCURRENCY=20 OUT="$smoke/ab" loadtest/ab-workload
step env SERVICES=2 CLIENTS=2 DURATION=2 OUT="$smoke/throughput" loadtest/throughput
step env PROTO=udp MIX=50 FLOWS=40000 LISTENERS="none exporter exporter-nofilter exporter-mask exporter-readers2 floor" \
    OUT="$smoke/overhead-udp" loadtest/overhead
step env PROTO=tcp FLOWS=6000 LISTENERS="none exporter exporter-tuned floor exporter+floor+floor-filtered" OUT="$smoke/overhead-tcp" loadtest/overhead
# The A/B harness, one build against itself (its figures mean nothing here).
step env FLOWS=20000 ROUNDS=2 CANDIDATE=target/debug OUT="$smoke/compare" loadtest/compare target/debug

# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
