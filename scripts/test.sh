#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every unit, property, golden and integration
# test. Works on a fresh machine with the Rust toolchain; needs no root and no network.
# The network-namespace suite (needs root) is netns-tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests open thousands of sockets: use the hard fd limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
