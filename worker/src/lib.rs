//! contrail-worker: everything that runs on a training machine, and the `contrail` CLI.
//!
//! - [`dist`]: the `Collective` trait; the TCP ring backend and an in-process one for tests.
//! - [`model`]: ResNet encoder + MLP projector with torchvision parameter names.
//! - [`objective`]: NT-Xent (SimCLR) over gathered negatives.
//! - [`optim`]: optimizers over named parameters, learning-rate schedules.
//! - [`train`]: one distributed step, the epoch loop with in-band epoch agreement, checkpoints.
//! - [`runtime`]: a worker process: coordinator RPCs, heartbeats, leased shards → batches.
//! - [`local_cluster`], [`cli_support`]: the `contrail` subcommands.
//!
//! The data pipeline (tar streaming, decoding, augmentation) is the `contrail-data` crate, and
//! the coordinator is `contrail-coordinator`; neither links libtorch.

pub mod cli_support;
pub mod dist;
pub mod local_cluster;
pub mod model;
pub mod objective;
pub mod optim;
pub mod runtime;
pub mod train;
