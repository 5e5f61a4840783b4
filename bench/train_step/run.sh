#!/usr/bin/env bash
# Side-by-side training-step throughput on one GPU: contrail's step vs PyTorch eager, same
# model, batch, resolution and bf16 autocast, in one invocation. Prints both, the ratio and
# each one's MFU against the bf16 matmul peak measured in the same run.
#   bash bench/train_step/run.sh [--batch 256] [--image-size 224] [--steps 20] [--warmup 5]
#       SimCLR ResNet-50 (+ 2-layer projector), channels_last
#   bash bench/train_step/run.sh --objective clip --model vit-b-16 [--batch 256] ...
#       CLIP ViT-B/16 + 12-layer text transformer, AdamW
#   --precision fp16 (both sides: fp16 autocast with dynamic loss scaling, GradScaler) or fp32
# BENCH=path/to/train_step_bench runs a prebuilt binary (the device machine has no cargo).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
ARGS=("$@")
if [ -z "${BENCH:-}" ]; then
  cargo build --release -q -p contrail-worker --example train_step_bench
  BENCH=target/release/examples/train_step_bench
fi
REF_OUT=$("$PY" bench/train_step/torch_ref.py "${ARGS[@]}")
echo "$REF_OUT" | grep -v '=' || true
OURS_OUT=$("$BENCH" "${ARGS[@]}")
echo "$OURS_OUT" | grep -v '^SAMPLES_PER_S='
REF=$(echo "$REF_OUT" | sed -n 's/^SAMPLES_PER_S=//p')
PEAK=$(echo "$REF_OUT" | sed -n 's/^PEAK_TFLOPS=//p')
OURS=$(echo "$OURS_OUT" | sed -n 's/^SAMPLES_PER_S=//p')
# Forward FLOP per sample at 224 px (2 per multiply-add), training ~3x forward:
# ResNet-50 4.1 GMAC per view, 2 views; ViT-B/16 17.6 GMAC, ViT-B/32 4.4 GMAC, plus the
# 12-layer 512-wide text transformer on 77 tokens, 2.9 GMAC.
ARGSTR="${ARGS[*]:-}"
"$PY" -c "
import re
args = '$ARGSTR'
ref, ours, peak = float('$REF'), float('$OURS'), float('$PEAK')
if 'clip' in args:
    vit = 17.6e9 if 'vit-b-16' in args else 4.4e9
    flop = 3 * 2 * (vit + 2.9e9)
else:
    flop = 3 * 2 * 2 * 4.1e9
print(f'ratio contrail/pytorch eager: {ours / ref:.2f}x ({ours:.0f} vs {ref:.0f} samples/s)')
print(f'MFU vs measured bf16 matmul peak {peak:.0f} TFLOP/s: contrail {ours * flop / peak / 1e12:.1%}, eager {ref * flop / peak / 1e12:.1%} (224 px only)')
"
