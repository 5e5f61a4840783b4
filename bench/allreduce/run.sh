#!/usr/bin/env bash
# Side-by-side all-reduce benchmark: contrail's TCP ring vs torch.distributed gloo, same size,
# same iteration counts, same machine, one invocation. Prints both results and the ratio.
#   bash bench/allreduce/run.sh [--world 2] [--mib 64] [--warmup 5] [--iters 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
ARGS=("$@")

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.11.0") else 1)'; then
    echo "installing the pinned torch==2.11.0 into $PY's environment" >&2
    "$PY" -m pip install -q torch==2.11.0
fi

cargo build --release -q -p contrail-worker --example allreduce_bench
BENCH=target/release/examples/allreduce_bench

echo "== gloo (torch.distributed) =="
GLOO_OUT=$("$PY" bench/allreduce/gloo_ref.py "${ARGS[@]}")
echo "$GLOO_OUT" | grep -v '^BUSBW_GBPS='
echo "== contrail tcp =="
OURS_OUT=$("$BENCH" "${ARGS[@]}")
echo "$OURS_OUT" | grep -v '^BUSBW_GBPS='

GLOO=$(echo "$GLOO_OUT" | sed -n 's/^BUSBW_GBPS=//p')
OURS=$(echo "$OURS_OUT" | sed -n 's/^BUSBW_GBPS=//p')
"$PY" -c "print(f'busbw ratio contrail/gloo: {float(\"$OURS\") / float(\"$GLOO\"):.2f}x  ($OURS vs $GLOO GB/s)')"
