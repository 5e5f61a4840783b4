#!/usr/bin/env bash
# Runs the main job: a two-process local cluster training SimCLR on the built-in synthetic
# dataset (written on first run). Extra arguments go to `contrail local`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LIBTORCH="$PWD/libtorch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo build --release --bin contrail
exec target/release/contrail local --workers 2 --config configs/local-simclr.toml "$@"
