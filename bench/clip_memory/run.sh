#!/usr/bin/env bash
# Peak GPU memory of one CLIP ViT-B/32 step with 32,768 image-caption pairs (so 32,768
# negatives per image and per caption) on a single GPU, reached through gradient accumulation
# with embedding caching, for K = 1, 4, 16 and 64 micro-batches. With K = 1 the whole batch
# is one forward pass, which is what plain data parallelism on one GPU would need.
#   bash bench/clip_memory/run.sh [--batch 32768]
# BENCH=path/to/train_step_bench runs a prebuilt binary (the device machine has no cargo).
set -uo pipefail
cd "$(dirname "$0")/../.."
BATCH=32768
if [ "${1:-}" = "--batch" ]; then BATCH=$2; fi
if [ -z "${BENCH:-}" ]; then
  cargo build --release -q -p contrail-worker --example train_step_bench || exit 1
  BENCH=target/release/examples/train_step_bench
fi
for K in 1 4 16 64; do
  MICRO=$((BATCH / K))
  LOG=$(mktemp)
  if "$BENCH" --objective clip --model vit-b-32 --batch "$BATCH" --micro-batch "$MICRO" \
       --steps 1 --warmup 1 >"$LOG" 2>&1; then
    PEAK=$(sed -n 's/^PEAK_GIB=//p' "$LOG")
    SPS=$(sed -n 's/^SAMPLES_PER_S=//p' "$LOG")
    printf 'K=%-3s micro-batch %-6s peak %6.1f GiB  %7.0f samples/s\n' "$K" "$MICRO" "$PEAK" "$SPS"
  elif grep -qi "out of memory" "$LOG"; then
    printf 'K=%-3s micro-batch %-6s out of GPU memory\n' "$K" "$MICRO"
  else
    echo "K=$K failed:"; tail -5 "$LOG"
  fi
  rm -f "$LOG"
done
