#!/usr/bin/env bash
# Runs contrail's whole test suite (installs what it needs first): the checks of
# scripts/check.sh, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-test.sh
bash scripts/check.sh
# .cargo/config.toml points LIBTORCH at ./libtorch, and build-support/libtorch_link.rs records
# its lib folder as an rpath, so no environment is needed here.
cargo test --workspace --no-fail-fast -- --test-threads 2 "$@"
