#!/usr/bin/env bash
# One-core data-pipeline benchmark: JPEG decode + SimCLR two-view augmentation to SIZE×SIZE,
# contrail (zune-jpeg + data::augment) vs PIL + torchvision, same JPEGs, same transforms,
# one invocation. Both are pinned to the same CPU core; prints both results and the ratio.
#   bash bench/data_pipeline/run.sh [--size 224] [--seconds 4] [--rounds 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
CORE=${BENCH_CORE:-0}
ARGS=("$@")

if ! "$PY" -c 'import torch, torchvision, PIL, sys; sys.exit(0 if (torch.__version__.startswith("2.11.0") and torchvision.__version__.startswith("0.26.0") and PIL.__version__ == "13.0.0") else 1)' 2>/dev/null; then
    echo "installing pinned torch==2.11.0 torchvision==0.26.0 pillow==13.0.0 into $PY's environment" >&2
    "$PY" -m pip install -q torch==2.11.0 torchvision==0.26.0 pillow==13.0.0 numpy==2.4.6
fi

cargo build --release -q -p contrail-data --example augment_bench
BENCH=target/release/examples/augment_bench

IMAGES=$(mktemp -d)
trap 'rm -rf "$IMAGES"' EXIT
"$PY" bench/data_pipeline/torchvision_ref.py make-images "$IMAGES" --count 64
echo "64 JPEGs of 320x256 (quality 90, $(du -sk "$IMAGES" | cut -f1) KiB) in $IMAGES; pinned to core $CORE"

echo "== PIL + torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)') (torch.set_num_threads(1)) =="
TV_OUT=$(OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" bench/data_pipeline/torchvision_ref.py bench "$IMAGES" "${ARGS[@]}")
echo "$TV_OUT" | grep -v '^IMAGES_PER_S='
echo "== contrail (zune-jpeg + data::augment, one thread) =="
OURS_OUT=$(taskset -c "$CORE" "$BENCH" "$IMAGES" "${ARGS[@]}")
echo "$OURS_OUT" | grep -v '^IMAGES_PER_S='

TV=$(echo "$TV_OUT" | sed -n 's/^IMAGES_PER_S=//p')
OURS=$(echo "$OURS_OUT" | sed -n 's/^IMAGES_PER_S=//p')
"$PY" -c "print(f'images/s per core, contrail/torchvision: {float(\"$OURS\") / float(\"$TV\"):.2f}x  ($OURS vs $TV)')"
