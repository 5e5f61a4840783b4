//! `[train]` and `[checkpoint]`: batch sizes, run length, precision and GPU math settings, and
//! where the run's state is saved.

use super::choice::choice;
use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

choice! {
    /// Numeric precision of the forward and backward passes.
    pub enum Precision default Auto {
        /// bf16 on a GPU, fp32 on the CPU.
        Auto = "auto",
        Fp32 = "fp32",
        /// CUDA autocast with bf16 (GPU only); weights, optimizer state and the loss stay fp32.
        Bf16 = "bf16",
        /// CUDA autocast with fp16 (GPU only: for GPUs without bf16, e.g. V100 and T4), with
        /// dynamic loss scaling as `torch.amp.GradScaler` (an overflowing step is skipped);
        /// weights, optimizer state and the loss stay fp32.
        Fp16 = "fp16",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples (images, each giving two views) per optimizer step across all workers.
    pub global_batch: u64,
    /// Samples per worker per forward pass.
    pub micro_batch: u64,
    /// Passes over the dataset.
    pub epochs: u32,
    /// Stop after this many steps even if epochs remain (0: no limit).
    pub max_steps: u64,
    pub seed: u64,
    /// Print a progress line every this many steps.
    pub log_every: u64,
    pub precision: Precision,
    /// Conv nets on a GPU keep weights and activations in channels-last (NHWC) layout, which
    /// tensor cores run about 1.8× faster; no effect on the CPU.
    pub channels_last: bool,
    /// On a GPU, float32 matmuls (cuBLAS) and convolutions (cuDNN) may run on TF32 tensor
    /// cores (`torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32`);
    /// `false` keeps them full float32. No effect on the CPU.
    pub tf32: bool,
    /// On a GPU, cuDNN times its convolution algorithms for each new input shape and keeps the
    /// fastest (`torch.backends.cudnn.benchmark`); `false` takes cuDNN's heuristic choice.
    /// No effect on the CPU.
    pub cudnn_benchmark: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            global_batch: 64,
            micro_batch: 32,
            epochs: 4,
            max_steps: 0,
            seed: 0,
            log_every: 10,
            precision: Precision::Auto,
            channels_last: true,
            tf32: true,
            cudnn_benchmark: true,
        }
    }
}

impl TrainConfig {
    /// K: micro-batches each worker accumulates per optimizer step; `validate` guarantees the
    /// division is exact and K ≥ 1.
    pub fn accumulation_steps(&self, world_size: u32) -> u64 {
        self.global_batch / (self.micro_batch * world_size as u64)
    }

    pub(super) fn validate(&self, world_size: u32) -> Result<(), ConfigError> {
        let t = self;
        if t.micro_batch == 0 {
            return Err(err("train.micro_batch", "must be at least 1"));
        }
        let per_round = world_size as u64 * t.micro_batch;
        if t.global_batch == 0 || !t.global_batch.is_multiple_of(per_round) {
            return Err(err(
                "train.global_batch",
                format!(
                    "({}) must be a multiple of world_size × micro_batch ({} × {} = {})",
                    t.global_batch, world_size, t.micro_batch, per_round
                ),
            ));
        }
        // global_batch > 0 and a multiple of per_round, so accumulation_steps() = K ≥ 1: each
        // worker runs K micro-batches per optimizer step (train::accumulate).
        if t.epochs == 0 && t.max_steps == 0 {
            return Err(err(
                "train.epochs",
                "is 0 and train.max_steps is 0: nothing to train",
            ));
        }
        if t.log_every == 0 {
            return Err(err("train.log_every", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory URL for checkpoints; empty disables them. A job started again with the same
    /// URL resumes from the latest one.
    pub url: String,
    /// Write a checkpoint every this many steps (and at the end); 0 only at the end.
    pub every_steps: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: u32,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            url: "file://./run/checkpoints".into(),
            every_steps: 100,
            keep: 2,
        }
    }
}

/// `[audit]`: which samples each rank trained in each committed step (`common::audit`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Folder URL the workers write their audit parts to; empty: no audit.
    pub url: String,
    /// A rank writes a part every this many steps (and when it stops).
    pub flush_every_steps: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            flush_every_steps: 100,
        }
    }
}

impl AuditConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() && self.flush_every_steps == 0 {
            return Err(err("audit.flush_every_steps", "must be at least 1"));
        }
        Ok(())
    }
}

impl CheckpointConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.url.is_empty() && self.keep == 0 {
            return Err(err(
                "checkpoint.keep",
                "must be at least 1 when checkpoint.url is set",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::JobConfig;

    #[test]
    fn gpu_math_settings_default_on_and_can_be_turned_off() {
        let cfg = JobConfig::default();
        assert!(cfg.train.tf32 && cfg.train.cudnn_benchmark);
        let cfg = JobConfig::from_toml("[train]\ntf32 = false\ncudnn_benchmark = false\n").unwrap();
        assert!(!cfg.train.tf32 && !cfg.train.cudnn_benchmark);
        let cfg = JobConfig::from_toml_with_overrides("", &["train.tf32=false".into()]).unwrap();
        assert!(!cfg.train.tf32 && cfg.train.cudnn_benchmark);
        // The typed config writes both back.
        assert_eq!(JobConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        for bad in ["tf32 = \"yes\"", "cudnn_benchmark = 1"] {
            let e = JobConfig::from_toml(&format!("[train]\n{bad}\n")).unwrap_err();
            let key = bad.split(' ').next().unwrap();
            assert_eq!(e.path, format!("train.{key}"), "{bad}: {e}");
        }
    }
}
