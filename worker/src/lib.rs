//! contrail-worker: what links libtorch, everything that runs on a training machine.
//!
//! The modules form a one-way stack: each may use the ones on the lines above it, never one
//! on its own line or below (the `layering` test below reads every `crate::` path and fails
//! on an upward or sideways one).
//!
//! 0. [`torch_ext`]: the libtorch features tch does not wrap, through the crate's C++ shim
//!    (gradient-ready hooks, uploads on a copy stream).
//! 1. [`dist`]: the `Collective` trait; NCCL, the TCP ring (with host staging for GPU
//!    tensors) and an in-process backend for tests.
//! 2. [`nn`]: building blocks (bf16 autocast and channels-last, PyTorch's default init, row
//!    normalisation, ring buffers); [`tokenize`]: caption tokenizers (built-in byte-level,
//!    or a Hugging Face `tokenizer.json`).
//! 3. [`optim`]: optimizers over named parameters, learning-rate schedules; [`eval`]: kNN
//!    (with whitening), linear probe, zero-shot and retrieval metrics over embedding banks.
//! 4. [`moe`]: mixture-of-experts blocks: routing, the token exchange, expert checkpoints.
//! 5. [`model`]: ResNet (torchvision names), ViT and text towers (open_clip names), projector,
//!    SwAV prototypes, MoCo momentum branch, CLIP's logit scale; one way to build from config.
//! 6. [`objective`]: SimCLR, MoCo v2, SwAV, CLIP, each its loss and its distributed step form.
//! 7. [`train`]: one distributed step, the epoch loop with in-band epoch agreement, expert
//!    moves, checkpoints.
//! 8. [`process`]: a worker process: coordinator RPCs, heartbeats, leased shards → batches;
//!    [`export`]: a model in open_clip's, timm's or torchvision's layout and config.
//! 9. [`embed`]: a dataset's image and caption embeddings from a job's checkpoint, as an
//!    embedding folder, in one process or spread over workers through shard leases.
//!
//! The data pipeline (tar streaming, decoding, augmentation) is the `contrail-data` crate, and
//! the coordinator is `contrail-coordinator`; neither links libtorch. The `contrail` command is
//! the `contrail-cli` crate, which puts these together.

pub mod dist;
pub mod embed;
pub mod eval;
pub mod export;
pub mod model;
pub mod moe;
pub mod nn;
pub mod objective;
pub mod optim;
pub mod process;
pub mod tokenize;
pub mod torch_ext;
pub mod train;

#[cfg(test)]
mod layering;
