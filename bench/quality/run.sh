#!/usr/bin/env bash
# Quality: contrail's SimCLR, MoCo v2 or SwAV (`contrail local --workers 2`) against the same
# training in PyTorch with lightly 1.6.0's parts (lightly_ref.py) on Fashion-MNIST, same
# machine, one invocation, seeds interleaved. Both sides' encoder features are evaluated by the
# same `contrail eval knn` and `contrail eval linear` commands; raw pixels and a random-init
# encoder are the baselines. Prints kNN and linear-probe top-1 and training time per system (mean ± sd
# over seeds), the time ratio, the baselines and the dataset package's published numbers.
#   bash bench/quality/run.sh [--objective simclr|moco|swav] [--steps 600] [--batch 256]
#                             [--seeds "0 1 2"] [--ref-bn-init ones|uniform] [--work DIR] [--keep]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
REF=${QUALITY_REF:-/tmp/contrail-quality-ref}   # lightly goes here, never into .venv
# QUALITY_REF_ARGS: extra lightly_ref.py flags, e.g. "--embed-limit 2000" for a smoke test.
CFG=configs/local-fashion-mnist.toml
SRC=/usr/share/datasets/fashion-mnist
OBJECTIVE=simclr; STEPS=600; BATCH=256; SEEDS="0 1 2"; BN_INIT=ones; WORK=""; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --objective) OBJECTIVE=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --ref-bn-init) BN_INIT=$2; shift 2 ;;
    --work) WORK=$2; KEEP=1; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
# Each objective's settings, the same on both sides (the config file holds SimCLR's).
case "$OBJECTIVE" in
  simclr) OBJ_SET=(); REF_OBJ=(--objective simclr --temperature 0.2) ;;
  moco)
    OBJ_SET=(--set objective.kind=moco --set objective.temperature=0.2
             --set objective.moco.queue_size=4096 --set objective.moco.momentum=0.99
             --set objective.moco.shuffle_bn=true)
    REF_OBJ=(--objective moco --temperature 0.2 --moco-queue 4096 --moco-momentum 0.99) ;;
  swav)
    OBJ_SET=(--set objective.kind=swav --set objective.temperature=0.1
             --set objective.swav.prototypes=100 --set objective.swav.epsilon=0.05
             --set objective.swav.sinkhorn_iterations=3
             --set objective.swav.freeze_prototypes_steps=100 --set objective.swav.queue_size=0)
    REF_OBJ=(--objective swav --temperature 0.1 --swav-prototypes 100 --swav-epsilon 0.05
             --swav-iterations 3 --swav-freeze-steps 100) ;;
  *) echo "--objective must be simclr, moco or swav, got $OBJECTIVE" >&2; exit 2 ;;
esac
[ $((BATCH % 2)) -eq 0 ] || { echo "--batch must be even (two workers, micro_batch = batch / 2)" >&2; exit 2; }

[ -e "$SRC/train-images-idx3-ubyte.gz" ] \
  || { echo "needs the Debian package dataset-fashion-mnist (scripts/setup-test.sh installs it)" >&2; exit 1; }
# torch, torchvision, pillow, numpy, pyarrow and safetensors come from .venv (scripts/setup.sh and
# scripts/setup-test.sh); lightly 1.6.0's NTXentLoss imports nothing beyond torch, so lightly
# alone goes into the scratch folder, with --no-deps so pip never touches that torch.
"$PY" -c 'import torch, torchvision, PIL, numpy, pyarrow, safetensors' 2>/dev/null \
  || { echo "$PY lacks torch/torchvision/pillow/pyarrow/safetensors (run scripts/setup-test.sh)" >&2; exit 1; }
if ! PYTHONPATH=$REF "$PY" -c 'import lightly, sys; sys.exit(0 if lightly.__version__ == "1.6.0" else 1)' 2>/dev/null; then
  echo "installing lightly==1.6.0 into $REF" >&2
  "$PY" -m pip install -q --no-deps --target "$REF" lightly==1.6.0
fi
PYTHONPATH=$REF "$PY" -c 'from lightly.loss import NTXentLoss, SwaVLoss; from lightly.models.modules.memory_bank import MemoryBankModule' \
  || { echo "lightly in $REF does not import" >&2; exit 1; }

# CONTRAIL_BIN=target/debug/contrail skips the release build (say which binary a recorded
# result used: the debug profile builds contrail's own crates at opt-level 1).
BIN=${CONTRAIL_BIN:-target/release/contrail}
[ -n "${CONTRAIL_BIN:-}" ] || cargo build --release -q --bin contrail
[ -x "$BIN" ] || { echo "no contrail binary at $BIN" >&2; exit 1; }

if [ -z "$WORK" ]; then
  WORK=$(mktemp -d /tmp/contrail-quality.XXXXXX)
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
if [ "$KEEP" = 0 ]; then
  trap 'rm -rf "$WORK"' EXIT
else
  echo "work folder (kept): $WORK"
fi
RES=$WORK/results; EMB=$WORK/emb; LOGS=$WORK/logs
mkdir -p "$RES" "$EMB" "$LOGS"
# contrail local: compute threads per worker = cores / workers, so the reference gets as many.
CORES=$(nproc)
REF_THREADS=$(( CORES >= 2 ? CORES / 2 * 2 : 1 ))

now() { date +%s.%N; }
elapsed() { "$PY" -c "print(f'{$2 - $1:.2f}')"; }
fail() { echo "$1 failed; the end of $2:" >&2; tail -n 40 "$2" >&2; exit 1; }

# Both evaluations of one pair of embedding folders, JSON into $RES/$name.
evaluate() {
  local name=$1 dir=$2 log=$LOGS/eval-$1.log
  mkdir -p "$RES/$name"
  "$BIN" eval knn --train "$dir/train" --test "$dir/test" --device cpu \
    --json "$RES/$name/knn.json" >"$log" 2>&1 || fail "eval knn ($name)" "$log"
  "$BIN" eval linear --train "$dir/train" --test "$dir/test" --device cpu \
    --json "$RES/$name/linear.json" >>"$log" 2>&1 || fail "eval linear ($name)" "$log"
  grep -E "^(kNN|linear probe) |^warning" "$log" | sed "s/^/  $name: /" || true
}

# --- data: IDX -> WebDataset shards, once -------------------------------------------------------
if [ ! -e "$WORK/data/dataset.json" ]; then
  echo "== importing Fashion-MNIST into $WORK/data =="
  "$BIN" data import --source "$SRC" --out "$WORK/data" --classes fashion-mnist \
    >"$LOGS/import.log" 2>&1 || fail "contrail data import" "$LOGS/import.log"
fi

# --- baselines, once ------------------------------------------------------------------------------
echo "== baselines: raw pixels, random-init encoder (seed 0) =="
"$PY" bench/eval_knn/banks.py "$EMB/raw-pixels" >/dev/null
evaluate raw-pixels "$EMB/raw-pixels"
for split in train test; do
  "$BIN" embed --config "$CFG" --random-init --set train.seed=0 --set 'eval.url=""' \
    --set "data.url=file://$WORK/data/train" --data "file://$WORK/data/$split" \
    --out "file://$EMB/random-init-s0/$split" --device cpu >>"$LOGS/embed-random.log" 2>&1 \
    || fail "contrail embed --random-init" "$LOGS/embed-random.log"
done
evaluate random-init-s0 "$EMB/random-init-s0"

# --- per seed: contrail, then the reference ---------------------------------------------------
CHECKED=0
for SEED in $SEEDS; do
  name=contrail-s$SEED; CK=$WORK/checkpoints/$name; log=$LOGS/$name.log
  rm -rf "$CK"   # a checkpoint there would be resumed
  echo "== $name: contrail local --workers 2, $OBJECTIVE, $STEPS steps of $BATCH =="
  # Online evaluation off (eval.url = ""): the reference has none, and it would embed 20,000
  # images twice inside the timed run. Checkpoint only at the end. CPU, free ports.
  t0=$(now)
  "$BIN" local --workers 2 --config "$CFG" "${OBJ_SET[@]}" \
    --set train.max_steps="$STEPS" --set train.epochs=0 \
    --set train.global_batch="$BATCH" --set train.micro_batch=$((BATCH / 2)) \
    --set train.seed="$SEED" \
    --set "data.url=file://$WORK/data/train" \
    --set "checkpoint.url=file://$CK" --set checkpoint.every_steps=0 \
    --set 'eval.url=""' --set cluster.device=cpu \
    --set cluster.grpc_addr=127.0.0.1:0 --set cluster.http_addr=127.0.0.1:0 \
    >"$log" 2>&1 || fail "contrail local ($name)" "$log"
  wall=$(elapsed "$t0" "$(now)")
  train=$(sed -n 's/^local cluster ran for \([0-9.]*\)s$/\1/p' "$log" | tail -n 1)
  losses=$(sed -n 's/^rank 0 finished: .* loss \([0-9.]*\) -> \([0-9.]*\)$/\1 \2/p' "$log" | tail -n 1)
  grep -E "^epoch .* step " "$log" | tail -n 2 | sed 's/^/  /' || true
  grep -E "^rank 0 finished|^local cluster ran for" "$log" | sed 's/^/  /' || true
  model=$CK/$(cat "$CK/LATEST")/model.safetensors
  if [ "$CHECKED" = 0 ]; then
    echo "== parameter names and shapes: reference model vs $model =="
    PYTHONPATH=$REF "$PY" bench/quality/lightly_ref.py "${REF_OBJ[@]}" --threads 1 --check-names "$model" \
      | sed 's/^/  /' || { echo "the reference model does not match contrail's" >&2; exit 1; }
    CHECKED=1
  fi
  t0=$(now)
  for split in train test; do
    "$BIN" embed --config "$CFG" "${OBJ_SET[@]}" --set train.seed="$SEED" --set 'eval.url=""' \
      --set "data.url=file://$WORK/data/train" --checkpoint "file://$CK" \
      --data "file://$WORK/data/$split" --out "file://$EMB/$name/$split" --device cpu \
      >>"$LOGS/embed-$name.log" 2>&1 || fail "contrail embed ($name)" "$LOGS/embed-$name.log"
  done
  embed=$(elapsed "$t0" "$(now)")
  mkdir -p "$RES/$name"
  printf '{"train_seconds": %s, "wall_seconds": %s, "embed_seconds": %s, "loss_first": %s, "loss_last": %s}\n' \
    "${train:-null}" "$wall" "$embed" "$(echo "${losses:-null}" | cut -d' ' -f1)" \
    "$(echo "${losses:-null null}" | cut -d' ' -f2)" >"$RES/$name/timing.json"
  evaluate "$name" "$EMB/$name"

  name=lightly-s$SEED; log=$LOGS/$name.log
  echo "== $name: lightly_ref.py, $OBJECTIVE, $STEPS steps of $BATCH, $REF_THREADS threads + 2 loader workers =="
  t0=$(now)
  PYTHONPATH=$REF "$PY" bench/quality/lightly_ref.py "${REF_OBJ[@]}" --steps "$STEPS" --batch "$BATCH" \
    --seed "$SEED" --threads "$REF_THREADS" --loader-workers 2 --bn-weight-init "$BN_INIT" \
    --out "$EMB/$name" ${QUALITY_REF_ARGS:-} >"$log" 2>&1 || fail "lightly_ref.py ($name)" "$log"
  wall=$(elapsed "$t0" "$(now)")
  grep -E "^step " "$log" | tail -n 2 | sed 's/^/  /' || true
  get() { sed -n "s/^$1=//p" "$log" | tail -n 1; }
  mkdir -p "$RES/$name"
  printf '{"train_seconds": %s, "wall_seconds": %s, "embed_seconds": %s, "loss_first": %s, "loss_last": %s}\n' \
    "$(get SECONDS_TRAIN)" "$wall" "$(get SECONDS_EMBED)" "$(get LOSS_FIRST)" "$(get LOSS_LAST)" \
    >"$RES/$name/timing.json"
  echo "  train $(get SECONDS_TRAIN) s (steps alone $(get SECONDS_LOOP) s), loss $(get LOSS_FIRST) -> $(get LOSS_LAST)"
  evaluate "$name" "$EMB/$name"
done

echo "(binary: $BIN; reference BatchNorm weight init: $BN_INIT; $CORES cores)"
"$PY" bench/quality/summarize.py "$RES" --steps "$STEPS" --batch "$BATCH" --objective "$OBJECTIVE"
