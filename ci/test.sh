#!/usr/bin/env bash
# The test command: sets up a fresh machine, then runs every check and test of accl.
#   bash ci/test.sh
# Needs: the Rust toolchain (cargo, rustfmt, clippy) and Debian's apt for system packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n=== %s\n' "$*"; }

step "system packages"
# iproute2: network namespaces for fabric tests; pkg-config for -sys crates.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v pkg-config >/dev/null || need+=(pkg-config)
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
else
    echo "clippy not installed: skipped"
fi

step "build"
cargo build --workspace --release --bins

step "tests (unit, thread suites over mem and TCP, failure tests, tools, multi-process over accl-run)"
cargo test --workspace --no-fail-fast

step "benchmarks compile"
cargo bench --workspace --no-run
