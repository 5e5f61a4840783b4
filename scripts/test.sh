#!/usr/bin/env bash
# Runs contrail's whole test suite (installs what it needs first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LIBTORCH="$PWD/libtorch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Tests spawn the `contrail` binary for the local-cluster tests; build it first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads 2 "$@"
