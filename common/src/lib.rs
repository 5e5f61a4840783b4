//! contrail-common: what the coordinator and the workers agree on, with no libtorch.
//!
//! - [`config`]: the TOML job file as typed, validated structs.
//! - [`proto`]: the gRPC protocol (generated from `proto/contrail.proto`).
//! - [`storage`]: object-store URLs (`file://`, `memory://`, `s3://`, `gs://`, `az://`),
//!   brace patterns and shard listing.
//! - [`shards`]: the deterministic per-epoch shuffle and the shard bookkeeping snapshot that
//!   checkpoints carry.
//! - [`status`]: the coordinator's `/status` report, shared with `contrail status`.

pub mod audit;
pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod experts;
pub mod shards;
pub mod status;
pub mod storage;
pub mod tensorboard;

pub mod proto {
    tonic::include_proto!("contrail.v1");
}

pub use config::{ConfigError, JobConfig};
