#!/usr/bin/env bash
# The node worker's cost on the CPU: `contrail local --nodes 1 --local-ranks 2` (one node
# worker supervising two rank processes) against `--workers 2` (two single-rank workers), the
# same job, alternating, same machine, one invocation.
#   bash bench/node_worker/run.sh [--repeats 3] [--steps 120]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
BIN=${CONTRAIL_BIN:-target/release/contrail}
[ -n "${CONTRAIL_BIN:-}" ] || cargo build --release -q --bin contrail
"$PY" bench/node_worker/compare.py --contrail "$BIN" "$@"
