#!/usr/bin/env bash
# Runs every test of ferrolb: formatting, lints, unit tests and the privileged end-to-end tests
# on network-namespace labs (run as root; with CI set, a test that cannot run fails).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/ferrolb-target}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee "${TEST_LOG:-/dev/null}"
