#!/usr/bin/env bash
# Side-by-side training-step throughput on one GPU: contrail's SimCLR step vs PyTorch eager,
# same model (ResNet-50 + 2-layer projector), batch, resolution, bf16 autocast and
# channels_last, in one invocation. Prints both, the ratio and each one's MFU.
#   bash bench/train_step/run.sh [--batch 256] [--image-size 224] [--steps 20] [--warmup 5]
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
# ResNet-50 at 224 px: 4.1 GMAC = 8.2 GFLOP forward per image; training ~3x; 2 views/sample.
"$PY" -c "
ref, ours, peak = float('$REF'), float('$OURS'), float('$PEAK')
flop = 2 * 3 * 8.2e9
print(f'ratio contrail/pytorch eager: {ours / ref:.2f}x ({ours:.0f} vs {ref:.0f} samples/s)')
print(f'MFU vs measured bf16 matmul peak {peak:.0f} TFLOP/s: contrail {ours * flop / peak / 1e12:.1%}, eager {ref * flop / peak / 1e12:.1%} (224 px only)')
"
