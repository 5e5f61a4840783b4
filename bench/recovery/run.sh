#!/usr/bin/env bash
# Recovery from a dead worker: contrail (cluster.min_workers) against torchrun --max-restarts
# with a DDP script that resumes from its checkpoint, same machine, one invocation.
#   bash bench/recovery/run.sh [--kill-at STEP]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
BIN=${CONTRAIL_BIN:-target/release/contrail}
[ -n "${CONTRAIL_BIN:-}" ] || cargo build --release -q --bin contrail
"$PY" bench/recovery/drive.py --contrail "$BIN" "$@"
