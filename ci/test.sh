#!/usr/bin/env bash
# The test command: sets up a fresh machine, then runs every check and test of accl.
#   bash ci/test.sh
# Needs: the Rust toolchain (cargo, rustfmt, clippy) and Debian's apt for system packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n=== %s\n' "$*"; }

step "system packages"
# iproute2: network namespaces for fabric tests; pkg-config for -sys crates; rdma-core's
# headers and libclang for the `verbs` feature (rdma-sys generates its bindings at build time).
# ci/softroce.sh installs what the soft-RoCE VMs need itself.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v pkg-config >/dev/null || need+=(pkg-config)
for p in libibverbs-dev librdmacm-dev libclang-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        echo "missing ${need[*]} and not root: install them first" >&2
    fi
fi

step "format and lints"
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; else echo "rustfmt not installed: skipped"; fi
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --workspace --all-targets --features accl-tools/verbs -- -D warnings
else
    echo "clippy not installed: skipped"
fi

step "build (with the verbs feature)"
cargo build --workspace --release --bins --features accl-tools/verbs

step "tests (unit, thread suites over mem and TCP, failure tests, tools, multi-process over accl-run)"
# With the verbs feature: its tests check the transport choice here (no RDMA device on this
# kernel) and run the collective suite over verbs in the soft-RoCE VM below.
cargo test --workspace --no-fail-fast --features accl-tools/verbs
# The default build (no rdma-core needed): transport choice without the feature.
cargo test -p accl-core --test verbs --test init

step "soft-RoCE: verbs suite and accl-perf in a VM, a 2-rank allreduce across two VMs"
if [ "$(id -u)" = 0 ]; then
    bash ci/softroce.sh accl
else
    echo "soft-RoCE needs root (apt, qemu, 9p passthrough): skipped" >&2
    exit 1
fi

step "benchmarks compile"
cargo bench --workspace --no-run
