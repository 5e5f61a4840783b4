//! The worker's GPU suite: training with bf16, channels-last and NCCL on one GPU, and the NCCL
//! collective itself. Every test that needs a GPU is ignored unless run with
//! `--include-ignored` (see `contrail_test_support::gpu`); one that finds no GPU then fails.
//!
//! `cargo test -p contrail-worker --test gpu -- --include-ignored` on a GPU machine, or the
//! binary that `scripts/gpu_carry.sh` builds.

mod gpu_training;
mod nccl;
