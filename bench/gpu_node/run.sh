#!/usr/bin/env bash
# One-command device check on a GPU node, from carried binaries (no cargo, no network), with
# PyTorch 2.11.0 in python3. See bench/gpu_node/README.md.
#   bash scripts/gpu_carry.sh                    # on the build machine: carry/contrail
#   bash bench/gpu_node/run.sh                   # on the GPU node, from the repository root
# 0. writes a synthetic WebDataset dataset (`contrail data synth`, 256² JPEGs) under $WORK;
# 1. one GPU: `contrail local --nodes 1 --local-ranks 1` with configs/gpu-simclr-resnet50.toml
#    (shrunk with --set: a few steps, no eval, no checkpoint) reading those shards through the
#    real pipeline, against torch_ref.py (DataLoader over the same tar shards + SimCLR
#    augmentation + ResNet-50 SimCLR step + DDP at world 1), in the same run; prints the ratio;
# 2. two ranks of one node worker sharing GPU 0 over the host-staged TCP transport;
# 3. with at least 2 GPUs (`nvidia-smi -L`): two NCCL ranks of one node worker.
# Each step runs under `timeout`, and the whole script keeps within $BUDGET seconds. Logs and
# results.md go to $OUT when it is set (the device tool's folder), else $WORK/results.
# Knobs (environment): CONTRAIL, CONFIG, PYTHON, WORK, BATCH, STEPS, WARMUP, SAMPLES, STEP_TIMEOUT, BUDGET.
set -uo pipefail # no -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
CONTRAIL=${CONTRAIL:-carry/contrail}
CONFIG=${CONFIG:-configs/gpu-simclr-resnet50.toml}
WORK=${WORK:-/tmp/contrail-gpu-node}
RESULTS=${OUT:-$WORK/results}
BATCH=${BATCH:-256}        # images per step on one GPU (two views each), as bench/train_step
STEPS=${STEPS:-60}         # measured steps
WARMUP=${WARMUP:-20}       # steps before measuring (cuDNN autotuning, loader start-up)
SAMPLES=${SAMPLES:-40960}  # dataset size: enough that step 1 never ends an epoch
STEP_TIMEOUT=${STEP_TIMEOUT:-180}
BUDGET=${BUDGET:-540}      # seconds for the whole script (the device tool allows 600 per command)
LOG_EVERY=5

mkdir -p "$RESULTS" "$WORK"
SUMMARY=$RESULTS/results.md
die() {
    echo "gpu_node: $*" | tee -a "$SUMMARY" >&2
    exit 1
}
: >"$SUMMARY"

[ -x "$CONTRAIL" ] || die "no $CONTRAIL: build it with scripts/gpu_carry.sh and carry carry/"
TORCH_DIR=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__))') ||
    die "$PY cannot import torch"
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
CORES=$(nproc)
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${GPUS:-0}" -ge 1 ] || die "nvidia-smi lists no GPU"
TORCHVISION=$("$PY" -c 'import torchvision; print(torchvision.__version__)' 2>/dev/null || echo "absent (plain torch augmentation)")
# `contrail local --nodes 1 --local-ranks N` runs N ranks in one node worker. A binary from
# before node workers (CONTRAIL=..., to measure before and after the host-to-GPU changes; see
# the README) has no --local-ranks: it runs N single-rank workers, and results.md says so.
if "$CONTRAIL" local --help 2>/dev/null | grep -q -- '--local-ranks'; then
    ranks_flags() { echo "--nodes 1 --local-ranks $1"; }
    SHAPE="one node worker (--nodes 1 --local-ranks N)"
else
    ranks_flags() { echo "--workers $1"; }
    SHAPE="N single-rank workers (--workers N: this contrail predates node workers)"
fi

{
    echo "# bench/gpu_node results, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    nvidia-smi -L
    echo "cores: $CORES; python3 torch $("$PY" -c 'import torch; print(torch.__version__)'), torchvision $TORCHVISION"
    "$CONTRAIL" --version
    "$CONTRAIL" info 2>&1 | head -n 20
    echo "job file: $CONFIG; ranks as: $SHAPE"
    echo "batch $BATCH per GPU at 224², $WARMUP warm-up + $STEPS measured steps, synthetic 256² JPEGs"
    echo '```'
    echo
} >>"$SUMMARY" 2>&1
cat "$SUMMARY"

# Seconds left for one step: at most STEP_TIMEOUT, and what the budget still holds.
step_limit() {
    local left=$((BUDGET - SECONDS - 10))
    [ "$left" -lt "$STEP_TIMEOUT" ] && echo "$left" || echo "$STEP_TIMEOUT"
}

# The samples/s of rank 0's progress lines after the warm-up: their harmonic mean, since each
# line covers the same LOG_EVERY steps (so it is total samples ÷ total time).
steady_rate() {
    "$PY" - "$1" "$WARMUP" <<'EOF'
import re, sys
rates = []
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"\bstep\s+(\d+)\b.*?([0-9.]+) samples/s", line)
    if m and int(m.group(1)) > int(sys.argv[2]) and float(m.group(2)) > 0:
        rates.append(float(m.group(2)))
print(f"{len(rates) / sum(1 / r for r in rates):.1f}" if rates else "n/a")
EOF
}

outcome() { # rc -> words
    case $1 in
    0) echo "ok" ;;
    124 | 130 | 137) echo "timed out" ;;
    *) echo "failed (exit $1)" ;;
    esac
}

ratio() { "$PY" -c "import sys; a, b = sys.argv[1:]; print(f'{float(a) / float(b):.2f}x')" "$1" "$2" 2>/dev/null || echo "n/a"; }
# "R of WHAT", or nothing when either rate is missing.
versus() {
    local r
    r=$(ratio "$1" "$2")
    [ "$r" = "n/a" ] || echo "$r of $3"
}

# ---- 0. the dataset ----
SHARDS=$WORK/shards
rm -rf "$SHARDS"
echo "== 0. writing $SAMPLES synthetic samples (256² JPEGs, 256 per shard) to $SHARDS"
timeout -k 10 "$(step_limit)" "$CONTRAIL" data synth --out "file://$SHARDS" --samples "$SAMPLES" \
    --shard-size 256 --image-size 256 --seed 0 >"$RESULTS/data.log" 2>&1
rc=$?
tail -n 3 "$RESULTS/data.log"
[ "$rc" -eq 0 ] || die "contrail data synth: $(outcome "$rc") (see data.log)"

# The job: the GPU recipe, shrunk. Everything else (model, LARS, bf16, channels-last, TF32,
# cuDNN autotuning, augmentation) is the file's.
COMMON=(
    --config "$CONFIG"
    --set "data.url=file://$SHARDS" --set data.synth_samples=0 --set data.shuffle_buffer=0
    --set train.epochs=0 --set "train.max_steps=$((WARMUP + STEPS))" --set "train.log_every=$LOG_EVERY"
    --set optim.warmup_steps=5 --set checkpoint.url= --set eval.url=
    --set cluster.grpc_addr=127.0.0.1:0 --set cluster.http_addr=127.0.0.1:0
)

# run_contrail NAME RANKS MICRO_BATCH DECODE_THREADS [--set ...]: sets RATE and STATUS.
run_contrail() {
    local name=$1 ranks=$2 micro=$3 threads=$4
    shift 4
    local limit log=$RESULTS/$name.log
    limit=$(step_limit)
    if [ "$limit" -lt 30 ]; then
        RATE=n/a STATUS="skipped: out of time"
        return
    fi
    echo "== $name: $ranks rank(s), micro-batch $micro, $threads decode threads per rank (limit ${limit}s)"
    # shellcheck disable=SC2046
    timeout -k 20 -s INT "$limit" "$CONTRAIL" local $(ranks_flags "$ranks") "${COMMON[@]}" \
        --set "cluster.world_size=$ranks" --set "train.micro_batch=$micro" \
        --set "train.global_batch=$((micro * ranks))" --set "data.decode_threads=$threads" \
        "$@" >"$log" 2>&1
    local rc=$?
    grep -E 'samples/s|error|Error|panicked' "$log" | tail -n 4
    RATE=$(steady_rate "$log")
    STATUS=$(outcome "$rc")
    echo "   $STATUS; steady rate $RATE samples/s"
}

# ---- 1. one GPU: contrail vs PyTorch ----
THREADS1=$((CORES > 3 ? CORES - 2 : 1))
run_contrail step1_contrail 1 "$BATCH" "$THREADS1"
C1_RATE=$RATE C1_STATUS=$STATUS

limit=$(step_limit)
if [ "$limit" -ge 30 ]; then
    echo "== step1_pytorch: DataLoader with $THREADS1 workers + DDP at world 1 (limit ${limit}s)"
    timeout -k 20 -s INT "$limit" "$PY" bench/gpu_node/torch_ref.py --shards "$SHARDS" \
        --batch "$BATCH" --image-size 224 --workers "$THREADS1" --steps "$STEPS" --warmup "$WARMUP" \
        --max-seconds $((limit / 4)) --device cuda >"$RESULTS/step1_pytorch.log" 2>&1
    rc=$?
    grep -v '_SAMPLES_PER_S=' "$RESULTS/step1_pytorch.log" | tail -n 5
    P_E2E=$(sed -n 's/^E2E_SAMPLES_PER_S=//p' "$RESULTS/step1_pytorch.log")
    P_LOADER=$(sed -n 's/^LOADER_SAMPLES_PER_S=//p' "$RESULTS/step1_pytorch.log")
    P_STEP=$(sed -n 's/^STEP_SAMPLES_PER_S=//p' "$RESULTS/step1_pytorch.log")
    P_STATUS=$(outcome "$rc")
else
    P_STATUS="skipped: out of time"
fi
fmt() { [ -n "${1:-}" ] && printf '%.1f' "$1" 2>/dev/null || echo n/a; }
P_E2E=$(fmt "${P_E2E:-}") P_LOADER=$(fmt "${P_LOADER:-}") P_STEP=$(fmt "${P_STEP:-}")
RATIO1=$(ratio "$C1_RATE" "$P_E2E")
echo "   pytorch: $P_STATUS; end to end $P_E2E samples/s (loader alone $P_LOADER, step alone $P_STEP)"
echo "ratio contrail/pytorch, end to end on one GPU: $RATIO1 ($C1_RATE vs $P_E2E samples/s)"

# ---- 2. two ranks sharing GPU 0 over the host-staged TCP transport ----
THREADS2=$((CORES > 5 ? (CORES - 2) / 2 : 1))
run_contrail step2_contrail_tcp_shared_gpu 2 $((BATCH / 2)) "$THREADS2" \
    --set cluster.backend=tcp --set cluster.device=cuda:0
C2_RATE=$RATE C2_STATUS=$STATUS

# ---- 3. two NCCL ranks, one GPU each ----
if [ "$GPUS" -ge 2 ]; then
    run_contrail step3_contrail_nccl 2 "$BATCH" "$THREADS2" --set cluster.backend=nccl --set cluster.device=auto
    C3_RATE=$RATE C3_STATUS=$STATUS
else
    C3_RATE=n/a C3_STATUS="skipped: $GPUS GPU"
fi

{
    echo "| check | result | samples/s (after $WARMUP warm-up steps) | compared |"
    echo "| --- | --- | --- | --- |"
    echo "| 1. contrail, 1 rank on 1 GPU, batch $BATCH, real shards + pipeline | $C1_STATUS | $C1_RATE | $(versus "$C1_RATE" "$P_E2E" PyTorch) |"
    echo "| 1. PyTorch DataLoader ($THREADS1 workers, torchvision $TORCHVISION) + DDP world 1 | $P_STATUS | $P_E2E (loader alone $P_LOADER, step alone $P_STEP) | |"
    echo "| 2. contrail, 2 ranks sharing GPU 0 (tcp, host-staged), $((BATCH / 2)) each | $C2_STATUS | $C2_RATE | $(versus "$C2_RATE" "$C1_RATE" "step 1") |"
    echo "| 3. contrail, 2 NCCL ranks on 2 GPUs, $BATCH each | $C3_STATUS | $C3_RATE | $(versus "$C3_RATE" "$C1_RATE" "step 1") |"
    echo
    echo "Total ${SECONDS}s. Logs: data.log, step1_contrail.log, step1_pytorch.log, step2_contrail_tcp_shared_gpu.log, step3_contrail_nccl.log."
} | tee -a "$SUMMARY"
