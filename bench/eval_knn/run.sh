#!/usr/bin/env bash
# kNN evaluation speed: `contrail eval knn` vs faiss-cpu exact inner-product search + the same
# voting, on the raw-pixel Fashion-MNIST banks (60,000 × 784 against 10,000 × 784), same machine,
# one invocation; prints both accuracies (they must agree), both times and the ratio.
#   bash bench/eval_knn/run.sh [--k 200] [--temperature 0.1] [--device cpu|cuda]
# (--device picks contrail's device; faiss-cpu always runs on the CPU's cores.)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
REF=${EVAL_REF:-/tmp/contrail-eval-knn-ref}   # faiss-cpu goes here, never into .venv
K=200; T=0.1; DEVICE=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --k) K=$2; shift 2 ;;
    --temperature) T=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done

[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
  || { echo "needs the Debian package dataset-fashion-mnist (scripts/setup-test.sh installs it)" >&2; exit 1; }
if ! PYTHONPATH=$REF "$PY" -c 'import faiss, sys; sys.exit(0 if faiss.__version__ == "1.15.1" else 1)' 2>/dev/null; then
  echo "installing faiss-cpu==1.15.1 into $REF" >&2
  "$PY" -m pip install -q --no-deps --target "$REF" faiss-cpu==1.15.1
fi

# CONTRAIL_BIN=target/debug/contrail skips the release build (the arithmetic is libtorch's
# either way; say which binary a recorded result used).
BIN=${CONTRAIL_BIN:-target/release/contrail}
[ -n "${CONTRAIL_BIN:-}" ] || cargo build --release -q --bin contrail
BANKS=$(mktemp -d)
trap 'rm -rf "$BANKS"' EXIT
"$PY" bench/eval_knn/banks.py "$BANKS"

echo "== faiss-cpu (IndexFlatIP, all cores) =="
REF_OUT=$(PYTHONPATH=$REF "$PY" bench/eval_knn/faiss_ref.py "$BANKS" --k "$K" --temperature "$T")
echo "$REF_OUT" | grep -v '^SECONDS='
echo "== contrail eval knn (libtorch, --device $DEVICE) =="
"$BIN" eval knn --train "$BANKS/train" --test "$BANKS/test" --k "$K" \
  --temperature "$T" --device "$DEVICE" --json "$BANKS/knn.json"
OURS=$("$PY" -c "import json; print(json.load(open('$BANKS/knn.json'))['knn_seconds'])")
REFS=$(echo "$REF_OUT" | sed -n 's/^SECONDS=//p')
# Both times cover normalising, searching and voting, not reading the files.
"$PY" -c "print(f'contrail {float(\"$OURS\"):.2f} s, faiss {float(\"$REFS\"):.2f} s: speed ratio contrail/faiss {float(\"$REFS\") / float(\"$OURS\"):.2f}x')"
