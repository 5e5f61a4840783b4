//! `[cluster]`: how many workers, where each computes, how they talk to each other and to
//! the coordinator.

use super::choice::{choice, serde_via_str};
use super::{err, ConfigError};
use serde::{Deserialize, Serialize};
use std::fmt;

choice! {
    /// The collective backend.
    pub enum Backend default Tcp {
        /// Ring over TCP; GPU tensors are staged through host memory.
        Tcp = "tcp",
        /// NCCL (GPUs only).
        Nccl = "nccl",
        /// NCCL when the worker computes on a GPU, TCP otherwise.
        Auto = "auto",
    }
}

choice! {
    /// The type gradients travel in when they are summed across ranks.
    pub enum GradDtype default Float32 {
        /// As computed (float32).
        Float32 = "float32",
        /// bfloat16 on the wire (half the bytes), written back into the float32 gradients, as
        /// PyTorch DDP's `bf16_compress_hook`.
        Bf16 = "bf16",
    }
}

/// Where a rank computes: `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSetting {
    /// The GPU the rank's node worker claimed for its local rank when libtorch sees one,
    /// else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU the node worker claimed for the rank's local rank; an error without one.
    Gpu,
    /// This GPU index on every rank.
    Cuda(u32),
}

impl DeviceSetting {
    /// Whether the setting asks for a GPU whatever the machine has.
    pub fn requires_gpu(self) -> bool {
        matches!(self, DeviceSetting::Gpu | DeviceSetting::Cuda(_))
    }
}

impl fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSetting::Auto => f.write_str("auto"),
            DeviceSetting::Cpu => f.write_str("cpu"),
            DeviceSetting::Gpu => f.write_str("cuda"),
            DeviceSetting::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for DeviceSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSetting::Auto),
            "cpu" => Ok(DeviceSetting::Cpu),
            "cuda" => Ok(DeviceSetting::Gpu),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceSetting::Cuda)
                .ok_or_else(|| {
                    format!("(\"{other}\") must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
                }),
        }
    }
}

serde_via_str!(DeviceSetting);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Ranks in the job: the sum of the node workers' local ranks.
    pub world_size: u32,
    /// Ranks per node (the job's shape in nodes: world_size ÷ local_ranks nodes); 0 leaves it
    /// open. When set, world_size must be a multiple of it and the coordinator refuses a node
    /// worker that runs another number of ranks.
    pub local_ranks: u32,
    pub backend: Backend,
    pub device: DeviceSetting,
    /// Address the coordinator's gRPC server binds (workers dial `http://` + this).
    pub grpc_addr: String,
    /// Address of the HTTP status server (`/status`, `/healthz`).
    pub http_addr: String,
    pub heartbeat_ms: u64,
    /// A worker silent for this long is declared dead and its leases return to the pool.
    pub worker_timeout_ms: u64,
    /// A shard lease not renewed (by heartbeats) within this time returns to the pool.
    pub lease_ttl_ms: u64,
    /// A collective that makes no progress for this long fails, naming the silent peer.
    pub collective_timeout_ms: u64,
    /// 0: a worker that dies fails the job. N ≥ 1: the survivors of a failure regroup and
    /// train on while at least N workers are left (TCP backend on the CPU only, for now).
    pub min_workers: u32,
    /// With `min_workers`: how long the survivors wait for replacements when fewer than
    /// `min_workers` are left, before the job fails; 0 fails it at once.
    pub replacement_wait_ms: u64,
    /// Where the coordinator journals its state so a restarted coordinator takes the job
    /// over: a file URL. "" = `coordinator-journal.json` under `checkpoint.url` (no journal
    /// without one); "off" = none (a coordinator restart then fails the job).
    pub journal_url: String,
    /// How long workers keep training and retrying while the coordinator cannot be reached
    /// (it is restarting); after that they stop.
    pub coordinator_timeout_ms: u64,
    /// Sum gradient buckets across ranks while the backward pass still runs (each bucket as
    /// soon as its gradients are final), as PyTorch DDP does; false sums them after backward.
    /// Models with MoE blocks always sum after backward.
    pub overlap: bool,
    /// Largest gradient bucket of the all-reduce, in MiB (DDP's `bucket_cap_mb`).
    pub bucket_mb: f64,
    /// The type gradients are summed in across ranks: "float32" or "bf16".
    pub grad_dtype: GradDtype,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            world_size: 2,
            local_ranks: 0,
            backend: Backend::Tcp,
            device: DeviceSetting::Auto,
            grpc_addr: "127.0.0.1:50051".into(),
            http_addr: "127.0.0.1:8080".into(),
            heartbeat_ms: 500,
            worker_timeout_ms: 5_000,
            lease_ttl_ms: 10_000,
            collective_timeout_ms: 60_000,
            min_workers: 0,
            replacement_wait_ms: 120_000,
            journal_url: String::new(),
            coordinator_timeout_ms: 60_000,
            overlap: true,
            bucket_mb: 25.0,
            grad_dtype: GradDtype::Float32,
        }
    }
}

impl ClusterConfig {
    /// The journal's URL: `journal_url`, or a file under `checkpoint_url`; None when off.
    pub fn journal(&self, checkpoint_url: &str) -> Option<String> {
        match self.journal_url.as_str() {
            "off" => None,
            "" if checkpoint_url.is_empty() => None,
            "" => Some(format!(
                "{}/coordinator-journal.json",
                checkpoint_url.trim_end_matches('/')
            )),
            url => Some(url.to_string()),
        }
    }

    /// Whether the job file asks for GPUs on every worker (NCCL, or a CUDA device).
    pub fn requires_gpu(&self) -> bool {
        self.backend == Backend::Nccl || self.device.requires_gpu()
    }

    /// `world_size` is checked first (in `JobConfig::validate`), as the batch relation in
    /// `[train]` divides by it.
    pub(super) fn validate_world_size(&self) -> Result<(), ConfigError> {
        if self.world_size == 0 {
            return Err(err("cluster.world_size", "must be at least 1"));
        }
        if self.local_ranks > 0 && !self.world_size.is_multiple_of(self.local_ranks) {
            return Err(err(
                "cluster.world_size",
                format!(
                    "({}) must be a multiple of cluster.local_ranks ({}): every node runs \
                     that many ranks",
                    self.world_size, self.local_ranks
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        if c.heartbeat_ms == 0 || c.worker_timeout_ms <= c.heartbeat_ms * 2 {
            return Err(err(
                "cluster.worker_timeout_ms",
                format!(
                    "({}) must exceed twice cluster.heartbeat_ms ({})",
                    c.worker_timeout_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.lease_ttl_ms <= c.heartbeat_ms * 2 {
            return Err(err(
                "cluster.lease_ttl_ms",
                format!(
                    "({}) must exceed twice cluster.heartbeat_ms ({})",
                    c.lease_ttl_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.min_workers > c.world_size {
            return Err(err(
                "cluster.min_workers",
                format!(
                    "({}) cannot exceed cluster.world_size ({})",
                    c.min_workers, c.world_size
                ),
            ));
        }
        if c.coordinator_timeout_ms <= c.heartbeat_ms * 2 {
            return Err(err(
                "cluster.coordinator_timeout_ms",
                format!(
                    "({}) must exceed twice cluster.heartbeat_ms ({})",
                    c.coordinator_timeout_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.collective_timeout_ms == 0 {
            return Err(err("cluster.collective_timeout_ms", "must be positive"));
        }
        if !(c.bucket_mb.is_finite() && c.bucket_mb > 0.0) {
            return Err(err(
                "cluster.bucket_mb",
                format!("({}) must be a positive number of MiB", c.bucket_mb),
            ));
        }
        Ok(())
    }
}
