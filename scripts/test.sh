#!/usr/bin/env bash
# Runs contrail's whole test suite (installs what it needs first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Container images: hadolint + COPY sources of k8s/docker/*.Dockerfile (no Docker engine needed; seconds).
bash scripts/check_dockerfiles.sh
# .cargo/config.toml points LIBTORCH at ./libtorch, and worker/build.rs records its lib folder
# as an rpath, so no environment is needed here.
# Tests spawn the `contrail` binary for the local-cluster tests; build it first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads 2 "$@"
