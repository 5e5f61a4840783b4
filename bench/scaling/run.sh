#!/usr/bin/env bash
# Data-parallel scaling on a shaped link, side by side: contrail's TCP backend (gradient
# all-reduce overlapped with backward, and not) vs PyTorch DDP over gloo, same SimCLR ResNet,
# same batch per rank, same bucket size, in one invocation. Each rate runs in a private
# network namespace whose loopback is shaped with tc's token bucket filter, so both systems
# talk over the same constrained link; nothing leaves the machine.
#   bash bench/scaling/run.sh [--rates "1gbit 10gbit"] [--worlds "1 2 4"] [bench args...]
# The bench args go to both sides: --model resnet18 --batch 32 --image-size 64 --steps 6
# --warmup 2 --bucket-mb 25 --threads 0. Needs root (unshare -n, tc).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
RATES="1gbit 10gbit"
WORLDS="1 2 4"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) RATES="$2"; shift 2 ;;
    --worlds) WORLDS="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ -z "${BENCH:-}" ]; then
  cargo build --release -q -p contrail-worker --example scaling_bench
  BENCH=$PWD/target/release/examples/scaling_bench
fi
"$PY" -c 'import torchvision' 2>/dev/null || { echo "torchvision missing: bash scripts/setup-test.sh" >&2; exit 1; }
OUT=$(mktemp -d /tmp/contrail-scaling-XXXXXX)
trap 'rm -rf "$OUT"' EXIT

for RATE in $RATES; do
  # The burst must hold at least one timer tick of traffic at the rate (rate / HZ).
  case "$RATE" in 10gbit) BURST=8mb ;; *) BURST=1mb ;; esac
  for N in $WORLDS; do
    for SIDE in ddp on off; do
      case "$SIDE" in
        ddp) CMD=("$PY" bench/scaling/ddp_ref.py --world "$N" "${ARGS[@]}") ;;
        on) CMD=("$BENCH" --world "$N" --overlap 1 "${ARGS[@]}") ;;
        off) CMD=("$BENCH" --world "$N" --overlap 0 "${ARGS[@]}") ;;
      esac
      unshare -n bash -c '
        set -e
        ip link set lo up
        tc qdisc add dev lo root tbf rate "$0" burst "$1" latency 50ms
        shift 1
        timeout 1800 "$@"
      ' "$RATE" "$BURST" "${CMD[@]}" > "$OUT/$RATE-$N-$SIDE.txt"
      grep -v '=' "$OUT/$RATE-$N-$SIDE.txt" | sed "s/^/[$RATE] /"
    done
  done
done

"$PY" - "$OUT" "$RATES" "$WORLDS" <<'PYEOF'
import sys, pathlib
out, rates, worlds = pathlib.Path(sys.argv[1]), sys.argv[2].split(), [int(w) for w in sys.argv[3].split()]
def val(rate, n, side, key):
    for line in (out / f"{rate}-{n}-{side}.txt").read_text().splitlines():
        if line.startswith(key + "="):
            return float(line.split("=", 1)[1])
    raise SystemExit(f"{rate} world {n} {side}: no {key}")
print()
print("| link | ranks | DDP gloo step ms | contrail step ms (overlap) | contrail step ms (no overlap) | contrail / DDP throughput | overlap saves | efficiency DDP | efficiency contrail |")
print("|---|---|---|---|---|---|---|---|---|")
for rate in rates:
    base = {s: val(rate, worlds[0], s, "SAMPLES_PER_S_PER_RANK") for s in ("ddp", "on")}
    for n in worlds:
        d, on, off = (val(rate, n, s, "STEP_MS") for s in ("ddp", "on", "off"))
        td, ton = (val(rate, n, s, "SAMPLES_PER_S_PER_RANK") for s in ("ddp", "on"))
        print(f"| {rate} | {n} | {d:.0f} | {on:.0f} | {off:.0f} | {ton / td:.2f}x | {1 - on / off:.1%} | "
              f"{td / base['ddp']:.0%} | {ton / base['on']:.0%} |")
print(f"\nefficiency = per-rank throughput at N ranks / at {worlds[0]} rank(s), same link")
PYEOF
