#!/usr/bin/env bash
# LiT on Fashion-MNIST (bench/lit/README.md): a SimCLR image tower trained by contrail, then
# locked, teaches a small BERT text tower with CLIP's loss on the class-name captions; the
# online evaluation measures zero-shot top-1 before (untrained text tower) and after.
#
#   bash bench/lit/run.sh [--simclr-steps N] [--lit-steps N] [--seeds "0 1 2"] [--work DIR]
#
# CONTRAIL_BIN picks the binary (default: target/release/contrail, built here).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
SIMCLR_STEPS=235   # one epoch of 60,000 at 256
LIT_STEPS=500
SEEDS="0 1 2"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --simclr-steps) SIMCLR_STEPS=$2; shift 2 ;;
    --lit-steps) LIT_STEPS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
if [ -z "${CONTRAIL_BIN:-}" ]; then
  cargo build --release --bin contrail
  CONTRAIL_BIN=$ROOT/target/release/contrail
fi
KEEP=1
if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/contrail-lit-XXXX); KEEP=0; fi
mkdir -p "$WORK"
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || {
  echo "needs the Debian package dataset-fashion-mnist (scripts/setup-test.sh installs it)" >&2; exit 1; }
if [ ! -e "$WORK/data/dataset.json" ]; then
  "$CONTRAIL_BIN" data import --format idx --source /usr/share/datasets/fashion-mnist \
    --out "$WORK/data" --classes fashion-mnist --caption-template "a photo of a {}."
fi
CONFIG=$ROOT/configs/local-fashion-mnist.toml
CLASSES='eval.classes=["T-shirt/top","Trouser","Pullover","Dress","Coat","Sandal","Shirt","Sneaker","Bag","Ankle boot"]'
COMMON=(--set "data.url=file://$WORK/data/train" --set "eval.url=file://$WORK/data/test"
        --set model.norm=group --set train.global_batch=256 --set train.micro_batch=128
        --set checkpoint.every_steps=0 --set train.epochs=100)
for seed in $SEEDS; do
  simclr=$WORK/simclr-$seed
  if [ ! -e "$simclr/LATEST" ]; then
    "$CONTRAIL_BIN" local --workers 2 --config "$CONFIG" "${COMMON[@]}" \
      --set train.seed="$seed" --set train.max_steps="$SIMCLR_STEPS" --set eval.at_start=false \
      --set "checkpoint.url=file://$simclr" > "$WORK/simclr-$seed.log" 2>&1
  fi
  weights=$simclr/$(cat "$simclr/LATEST")/model.safetensors
  rm -rf "$WORK/lit-$seed"
  "$CONTRAIL_BIN" local --workers 2 --config "$CONFIG" "${COMMON[@]}" \
    --set objective.kind=clip --set train.seed="$seed" --set train.max_steps="$LIT_STEPS" \
    --set "model.init_weights=file://$weights" --set model.lock_image=true \
    --set model.text.kind=bert --set model.text.width=64 --set model.text.layers=2 \
    --set model.text.heads=4 --set model.text.context_length=32 --set model.text.max_positions=32 \
    --set "$CLASSES" --set 'eval.templates=["a photo of a {}."]' \
    --set optim.kind=adamw --set optim.lr=2e-3 --set optim.weight_decay=0.1 \
    --set "checkpoint.url=file://$WORK/lit-$seed" > "$WORK/lit-$seed.log" 2>&1
  simclr_knn=$(grep -o 'held-out kNN top-1 [0-9.]*%' "$WORK/simclr-$seed.log" | tail -1 | grep -o '[0-9.]*%')
  line=$(grep 'zero-shot top-1 .* vs ' "$WORK/lit-$seed.log" | tail -1)
  zs=$(echo "$line" | grep -o 'zero-shot top-1 [0-9.]*% vs [0-9.]*%')
  knn=$(echo "$line" | grep -o 'kNN top-1: [0-9.]*% after [0-9]* steps vs [0-9.]*%')
  secs=$(grep -o 'local cluster ran for [0-9.]*s' "$WORK/lit-$seed.log" | grep -o '[0-9.]*s$')
  echo "seed $seed: SimCLR kNN $simclr_knn; LiT $zs (trained vs untrained text tower); image $knn; LiT ran $secs"
done
[ "$KEEP" = 1 ] || rm -rf "$WORK"
