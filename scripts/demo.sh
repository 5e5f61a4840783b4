#!/usr/bin/env bash
# Runs the main job: a two-process local cluster training SimCLR on the built-in synthetic
# dataset (written on first run). Extra arguments go to `contrail local`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# .cargo/config.toml points LIBTORCH at ./libtorch, and build-support/libtorch_link.rs records its lib folder
# as an rpath, so no environment is needed here.
cargo build --release --bin contrail
exec target/release/contrail local --workers 2 --config configs/local-simclr.toml "$@"
