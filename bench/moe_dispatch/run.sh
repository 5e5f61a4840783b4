#!/usr/bin/env bash
# MoE benchmark, contrail next to PyTorch in one invocation (see README.md).
#   world >= 2 (default 2): the MoE layer's token exchange (header + dispatch + combine
#     all-to-alls) on contrail's TCP backend vs torch.distributed gloo all_to_all_single with
#     the same split sizes, plus contrail's whole block forward + backward for context;
#   world 1: MoE block vs dense MLP of the same active FLOPs, contrail vs eager PyTorch.
#   bash bench/moe_dispatch/run.sh [--world 2] [--tokens 8192] [--width 768] [--experts 8]
#        [--top-k 2] [--capacity-factor 1.25] [--expert-hidden 3072] [--warmup 3] [--iters 20]
#        [--block-warmup 1] [--block-iters 3] [--threads 1] [--device cpu|cuda] [--bf16]
# BENCH=path/to/moe_dispatch_bench runs a prebuilt binary (the device machine has no cargo).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
ARGS=("$@")

WORLD=2
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
        --world) WORLD=${ARGS[i + 1]:-2} ;;
        --world=*) WORLD=${ARGS[i]#--world=} ;;
    esac
done

PINNED='import torch, sys; sys.exit(0 if torch.__version__.startswith("2.11.0") else 1)'
if ! "$PY" -c "$PINNED"; then
    echo "installing the pinned torch==2.11.0 into $PY's environment" >&2
    "$PY" -m pip install -q torch==2.11.0
fi

if [ -z "${BENCH:-}" ]; then
    cargo build --release -q -p contrail-worker --example moe_dispatch_bench
    BENCH=${CARGO_TARGET_DIR:-target}/release/examples/moe_dispatch_bench
fi
value() { sed -n "s/^$1=//p"; }
human() { grep -v '^[A-Z_]*='; }

if [ "$WORLD" = 1 ]; then
    echo "== contrail =="
    OURS_OUT=$("$BENCH" "${ARGS[@]}")
    echo "$OURS_OUT" | human
    echo "== eager PyTorch =="
    REF_OUT=$("$PY" bench/moe_dispatch/dense_ref.py "${ARGS[@]}")
    echo "$REF_OUT" | human
    "$PY" - "$(echo "$OURS_OUT" | value MOE_STEP_MS)" "$(echo "$OURS_OUT" | value DENSE_STEP_MS)" \
        "$(echo "$REF_OUT" | value MOE_STEP_MS)" "$(echo "$REF_OUT" | value DENSE_STEP_MS)" <<'PY'
import sys
om, od, rm, rd = map(float, sys.argv[1:])
print(f"MoE/dense: contrail {om / od:.2f}x, PyTorch {rm / rd:.2f}x; "
      f"MoE step contrail/PyTorch {om / rm:.2f}x, dense step contrail/PyTorch {od / rd:.2f}x")
PY
    exit 0
fi

SPLITS=$(mktemp -d)
trap 'rm -rf "$SPLITS"' EXIT
echo "== contrail tcp =="
OURS_OUT=$("$BENCH" "${ARGS[@]}" --splits-dir "$SPLITS")
echo "$OURS_OUT" | human
echo "== gloo (torch.distributed), same splits =="
GLOO_OUT=$("$PY" bench/moe_dispatch/gloo_ref.py "${ARGS[@]}" --splits-dir "$SPLITS")
echo "$GLOO_OUT" | human
"$PY" - "$(echo "$OURS_OUT" | value EXCHANGE_MS)" "$(echo "$GLOO_OUT" | value EXCHANGE_MS)" \
    "$(echo "$OURS_OUT" | value BUSBW_GBPS)" "$(echo "$GLOO_OUT" | value BUSBW_GBPS)" <<'PY'
import sys
om, gm, ob, gb = map(float, sys.argv[1:])
print(f"exchange per layer forward: contrail {om:.2f} ms vs gloo {gm:.2f} ms; "
      f"busbw ratio contrail/gloo {ob / gb:.2f}x ({ob:.3f} vs {gb:.3f} GB/s)")
PY
