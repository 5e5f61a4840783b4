#!/usr/bin/env bash
# Embedding export speed: `contrail embed` against the same job in plain PyTorch (torch_ref.py)
# on Fashion-MNIST WebDataset shards, same machine, same invocation. Both sides read the shards,
# decode the PNGs, take the evaluation view, run the encoder of configs/local-fashion-mnist.toml
# (128 features before the projector) in batches and write img_emb/*.npy + metadata/*.parquet,
# one part per shard. Prints both times and the ratio torch / contrail (> 1: contrail faster).
#   bash bench/embed/run.sh [--split train|test] [--batch 256] [--workers N] [--device cpu|cuda]
#                           [--data DIR] [--limit-shards N] [--ref-loader-workers N]
#                           [--repeat R] [--no-check] [--work DIR] [--keep]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONDONTWRITEBYTECODE=1   # torch_ref.py imports bench/quality/lightly_ref.py
CFG=configs/local-fashion-mnist.toml
SRC=/usr/share/datasets/fashion-mnist
SPLIT=train; BATCH=256; WORKERS=0; DEVICE=cpu; DATA=""; LIMIT=0; REF_WORKERS=0; REPEAT=1
CHECK=1; WORK=""; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --split) SPLIT=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --limit-shards) LIMIT=$2; shift 2 ;;
    --ref-loader-workers) REF_WORKERS=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    --work) WORK=$2; KEEP=1; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
case "$SPLIT" in train|test) ;; *) echo "--split must be train or test" >&2; exit 2 ;; esac
case "$DEVICE" in cpu|cuda|cuda:*) ;; *) echo "--device must be cpu or cuda[:N]" >&2; exit 2 ;; esac

# torch (2.11.0 recorded), torchvision (decode_image), numpy, pyarrow and safetensors come from
# .venv (scripts/setup.sh, scripts/setup-test.sh); nothing is installed.
"$PY" -c 'import torch, torchvision, numpy, pyarrow, safetensors' 2>/dev/null \
  || { echo "$PY lacks torch/torchvision/numpy/pyarrow/safetensors (run scripts/setup-test.sh)" >&2; exit 1; }

# CONTRAIL_BIN=target/debug/contrail skips the release build (say which binary a recorded
# result used: the debug profile builds contrail's own crates at opt-level 1).
BIN=${CONTRAIL_BIN:-target/release/contrail}
[ -n "${CONTRAIL_BIN:-}" ] || cargo build --release -q --bin contrail
[ -x "$BIN" ] || { echo "no contrail binary at $BIN" >&2; exit 1; }

if [ -z "$WORK" ]; then
  WORK=$(mktemp -d /tmp/contrail-embed-bench.XXXXXX)
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
if [ "$KEEP" = 0 ]; then
  trap 'rm -rf "$WORK"' EXIT
else
  echo "work folder (kept): $WORK"
fi
LOGS=$WORK/logs; OUT=$WORK/out
mkdir -p "$LOGS" "$OUT"

now() { date +%s.%N; }
elapsed() { "$PY" -c "print(f'{$2 - $1:.2f}')"; }
fail() { echo "$1 failed; the end of $2:" >&2; tail -n 40 "$2" >&2; exit 1; }
# The coordinator of --workers N, and the check's cluster, on free ports.
PORTS=(--set cluster.grpc_addr=127.0.0.1:0 --set cluster.http_addr=127.0.0.1:0)

# --- data: IDX -> WebDataset shards, once (or --data DIR, an import's root) -------------------
if [ -z "$DATA" ]; then
  [ -e "$SRC/train-images-idx3-ubyte.gz" ] \
    || { echo "needs the Debian package dataset-fashion-mnist (scripts/setup-test.sh installs it)" >&2; exit 1; }
  DATA=$WORK/data
  if [ ! -e "$DATA/dataset.json" ]; then
    echo "== importing Fashion-MNIST into $DATA =="
    "$BIN" data import --source "$SRC" --out "$DATA" --classes fashion-mnist \
      >"$LOGS/import.log" 2>&1 || fail "contrail data import" "$LOGS/import.log"
  fi
fi
DATA=$(cd "$DATA" && pwd)
SHARDS_DIR=$DATA/$SPLIT
mapfile -t ALL < <(find "$SHARDS_DIR" -name '*.tar' | LC_ALL=C sort)
[ "${#ALL[@]}" -gt 0 ] || { echo "no shards under $SHARDS_DIR" >&2; exit 1; }
# --limit-shards N: the first N shards (listing order) in a folder of their own, which both
# sides then read (hard links where the file system allows, else copies).
if [ "$LIMIT" -gt 0 ] && [ "$LIMIT" -lt "${#ALL[@]}" ]; then
  SHARDS_DIR=$WORK/limited/$SPLIT
  rm -rf "$SHARDS_DIR"; mkdir -p "$SHARDS_DIR"
  for f in "${ALL[@]:0:$LIMIT}"; do ln "$f" "$SHARDS_DIR/" 2>/dev/null || cp "$f" "$SHARDS_DIR/"; done
  ALL=("${ALL[@]:0:$LIMIT}")
fi
N_SHARDS=${#ALL[@]}
# Both sides read from the page cache, whichever runs first.
cat "${ALL[@]}" >/dev/null

echo "== $SPLIT split: $N_SHARDS shards in $SHARDS_DIR; batch $BATCH, device $DEVICE, $(nproc) cores =="
echo "   contrail: $BIN embed --workers $WORKERS; torch_ref.py: --loader-workers $REF_WORKERS"
"$PY" -c 'import torch, torchvision; print(f"   torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} intra-op threads")'

run_contrail() {  # $1: run number; prints the process's wall seconds
  local dir=$OUT/contrail-$1 log=$LOGS/contrail-$1.log t0 t1
  rm -rf "$dir"
  t0=$(now)
  "$BIN" embed --config "$CFG" --random-init --set 'eval.url=""' "${PORTS[@]}" \
    --data "file://$SHARDS_DIR" --out "file://$dir" --batch "$BATCH" --workers "$WORKERS" \
    --device "$DEVICE" >"$log" 2>&1 || fail "contrail embed" "$log"
  t1=$(now)
  elapsed "$t0" "$t1"
}

run_torch() {  # $1: run number; prints "SECONDS wall" (in-process seconds, process wall)
  local dir=$OUT/torch-$1 log=$LOGS/torch-$1.log t0 t1
  rm -rf "$dir"
  t0=$(now)
  "$PY" bench/embed/torch_ref.py --random-init --data "$SHARDS_DIR" --out "$dir" \
    --batch "$BATCH" --device "$DEVICE" --loader-workers "$REF_WORKERS" >"$log" 2>&1 \
    || fail "torch_ref.py" "$log"
  t1=$(now)
  echo "$(sed -n 's/^SECONDS=//p' "$log") $(elapsed "$t0" "$t1")"
}

# --- timed runs: contrail and the reference alternate, first one then the other ------------------
C_BEST=""; T_BEST=""; TW_BEST=""
min() { "$PY" -c "import sys; v=[float(x) for x in sys.argv[1:] if x]; print(f'{min(v):.2f}')" "$@"; }
for r in $(seq 1 "$REPEAT"); do
  # (Assignments, so that set -e stops the script when a side fails.)
  if [ $((r % 2)) = 1 ]; then
    c=$(run_contrail "$r"); tt=$(run_torch "$r")
  else
    tt=$(run_torch "$r"); c=$(run_contrail "$r")
  fi
  read -r t tw <<<"$tt"
  inner=$(sed -n 's/^wrote .* in \([0-9.]*\) s, .*/\1/p; s/^embedded .* in \([0-9.]*\) s$/\1/p' "$LOGS/contrail-$r.log" | tail -n 1)
  echo "run $r: contrail ${c} s (process wall; its own count ${inner:-?} s), torch_ref ${t} s (after imports; process wall ${tw} s)"
  grep -E '^(wrote|embedded) ' "$LOGS/contrail-$r.log" | sed 's/^/  contrail: /' || true
  grep -E '^(torch |ROWS=|SKIPPED=|SECONDS_FORWARD=)' "$LOGS/torch-$r.log" | tr '\n' ' ' | sed 's/^/  torch_ref: /'; echo
  # Same parts, same metadata row for row, same shapes (the values differ: random init).
  "$PY" bench/embed/compare.py "$OUT/contrail-$r" "$OUT/torch-$r" >"$LOGS/compare-$r.log" 2>&1 \
    || fail "the two folders differ (compare.py)" "$LOGS/compare-$r.log"
  C_BEST=$(min "$C_BEST" "$c"); T_BEST=$(min "$T_BEST" "$t"); TW_BEST=$(min "$TW_BEST" "$tw")
done
echo "  both folders: $(tr '\n' ' ' <"$LOGS/compare-$REPEAT.log")(same parts, metadata and shapes)"

# --- correctness: the same checkpoint through both, rows within 1e-4 -----------------------------
if [ "$CHECK" = 1 ]; then
  # A 2-step checkpoint from `contrail local` on the first two shards (CPU, a few seconds), then
  # both exports of those shards from it. Always on the CPU: on CUDA both sides may use TF32.
  CHK=$WORK/check; CK=$CHK/ck; CHK_DATA=$CHK/data
  rm -rf "$CHK"; mkdir -p "$CHK_DATA"
  for f in "${ALL[@]:0:2}"; do ln "$f" "$CHK_DATA/" 2>/dev/null || cp "$f" "$CHK_DATA/"; done
  "$BIN" local --workers 2 --config "$CFG" --set train.max_steps=2 --set train.epochs=0 \
    --set train.global_batch=32 --set train.micro_batch=16 --set "data.url=file://$CHK_DATA" \
    --set "checkpoint.url=file://$CK" --set checkpoint.every_steps=0 --set 'eval.url=""' \
    --set cluster.device=cpu "${PORTS[@]}" >"$LOGS/check-train.log" 2>&1 \
    || fail "contrail local (check checkpoint)" "$LOGS/check-train.log"
  "$BIN" embed --config "$CFG" --checkpoint "file://$CK" --set 'eval.url=""' "${PORTS[@]}" \
    --data "file://$CHK_DATA" --out "file://$CHK/contrail" --batch "$BATCH" --device cpu \
    >"$LOGS/check-contrail.log" 2>&1 || fail "contrail embed (check)" "$LOGS/check-contrail.log"
  "$PY" bench/embed/torch_ref.py --checkpoint "$CK" --data "$CHK_DATA" --out "$CHK/torch" \
    --batch "$BATCH" --device cpu >"$LOGS/check-torch.log" 2>&1 \
    || fail "torch_ref.py (check)" "$LOGS/check-torch.log"
  "$PY" bench/embed/compare.py "$CHK/contrail" "$CHK/torch" --atol 1e-4 >"$LOGS/check.log" 2>&1 \
    || fail "same checkpoint, different rows (compare.py)" "$LOGS/check.log"
  echo "check, one 2-step checkpoint through both on $(sed -n 's/^ROWS=//p' "$LOGS/check.log") images: rows agree, max |diff| $(sed -n 's/^MAX_ABS_DIFF=//p' "$LOGS/check.log") (<= 1e-4)"
fi

echo "(binary: $BIN; $SPLIT split, $N_SHARDS shards; best of $REPEAT run(s) each)"
echo "contrail embed: ${C_BEST} s (wall time of the process, start-up included)"
echo "torch_ref.py:   ${T_BEST} s (after Python start-up and imports; whole process ${TW_BEST} s)"
"$PY" -c "print(f'speed ratio torch/contrail: {float(\"$T_BEST\") / float(\"$C_BEST\"):.2f}x (> 1: contrail faster); whole processes: {float(\"$TW_BEST\") / float(\"$C_BEST\"):.2f}x')"
