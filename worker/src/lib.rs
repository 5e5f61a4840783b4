//! contrail-worker: everything that runs on a training machine, and the `contrail` CLI.
//!
//! - [`dist`]: the `Collective` trait; NCCL, the TCP ring (with host staging for GPU tensors)
//!   and an in-process backend for tests.
//! - [`model`]: ResNet (torchvision names), ViT and text towers (open_clip names), projector,
//!   SwAV prototypes, MoCo momentum branch; bf16 autocast and channels-last.
//! - [`objective`]: the losses: NT-Xent (SimCLR), MoCo v2, SwAV, CLIP.
//! - [`optim`]: optimizers over named parameters, learning-rate schedules.
//! - [`train`]: one distributed step, the epoch loop with in-band epoch agreement, checkpoints.
//! - [`text`]: caption tokenizers (built-in byte-level, or a Hugging Face `tokenizer.json`).
//! - [`runtime`]: a worker process: coordinator RPCs, heartbeats, leased shards → batches.
//! - [`local_cluster`], [`cli_support`]: the `contrail` subcommands.
//!
//! The data pipeline (tar streaming, decoding, augmentation) is the `contrail-data` crate, and
//! the coordinator is `contrail-coordinator`; neither links libtorch.

pub mod cli_support;
pub mod dist;
pub mod local_cluster;
pub mod model;
pub mod moe;
pub mod objective;
pub mod optim;
pub mod runtime;
pub mod text;
pub mod train;
