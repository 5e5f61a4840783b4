#!/usr/bin/env bash
# Builds what a GPU machine without cargo needs to run contrail's GPU tests and benchmarks,
# stripped, into ./carry (git-ignored): the `contrail` CLI, the worker's test suites (cpu, gpu)
# and the benchmark examples. On the GPU machine, with PyTorch 2.11.0 in its python3:
#
#   export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
#   carry/gpu --include-ignored --test-threads 1
#   carry/cpu --include-ignored --exact moe_expert_parallel::two_workers_on_one_gpu --nocapture
#   carry/cpu --include-ignored clip_towers_conformance::f32_and_bf16_agree_with_open_clip::cuda
#   BENCH=carry/moe_dispatch_bench PYTHON=python3 bash bench/moe_dispatch/run.sh --world 1 --device cuda --bf16
#   BENCH=carry/train_step_bench PYTHON=python3 bash bench/train_step/run.sh
#   bash bench/gpu_node/run.sh     # end-to-end from shards vs PyTorch (needs only carry/contrail)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p carry
cargo build --release -p contrail-cli --bin contrail
cargo build --release -p contrail-worker --example moe_dispatch_bench --example train_step_bench
for t in cpu gpu; do
    # The test binary's path is the last "executable" cargo reports for it.
    bin=$(cargo test --release -p contrail-worker --test "$t" --no-run --message-format=json \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    [ -n "$bin" ] || { echo "gpu_carry: no test binary for $t" >&2; exit 1; }
    cp "$bin" "carry/$t"
done
cp "$TARGET/release/contrail" "$TARGET/release/examples/moe_dispatch_bench" \
    "$TARGET/release/examples/train_step_bench" carry/
strip carry/*
du -ch carry/* | tail -n 1
echo "gpu_carry: carry/ is ready (name it in the device run's carry list)"
