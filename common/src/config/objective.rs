//! `[objective]` with `[objective.moco]` and `[objective.swav]`: which contrastive loss
//! trains the model, and each loss's own parameters.

use super::choice::choice;
use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

choice! {
    /// The contrastive objective.
    pub enum ObjectiveKind default Simclr {
        /// NT-Xent over two views, negatives from every worker.
        Simclr = "simclr",
        /// MoCo v2: a momentum key encoder and a queue of negative keys.
        Moco = "moco",
        /// Swapped prototype assignments with Sinkhorn–Knopp codes over every worker's batch.
        Swav = "swav",
        /// Image–text contrastive loss of a dual encoder.
        Clip = "clip",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub kind: ObjectiveKind,
    /// Softmax temperature τ (all kinds; SwAV papers use 0.1, SimCLR and MoCo v2 0.2).
    pub temperature: f64,
    /// Used with `kind = "moco"`.
    pub moco: MocoSettings,
    /// Used with `kind = "swav"`.
    pub swav: SwavSettings,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Simclr,
            temperature: 0.2,
            moco: MocoSettings::default(),
            swav: SwavSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MocoSettings {
    /// Number of keys kept as negatives (a ring buffer filled with every worker's keys).
    pub queue_size: u64,
    /// EMA momentum of the key encoder at step 0; it follows a cosine schedule to 1.0 at the
    /// last step (BYOL's schedule; a constant when the run length is unknown).
    pub momentum: f64,
    /// Compute keys on samples shuffled across workers (MoCo's shuffle BN), so BatchNorm
    /// statistics cannot leak which key belongs to which query. Ignored with norm = "group".
    pub shuffle_bn: bool,
}

impl Default for MocoSettings {
    fn default() -> Self {
        Self {
            queue_size: 65_536,
            momentum: 0.99,
            shuffle_bn: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SwavSettings {
    /// Number of prototypes K.
    pub prototypes: u32,
    /// Sinkhorn–Knopp entropy regularisation ε.
    pub epsilon: f64,
    /// Sinkhorn–Knopp iterations.
    pub sinkhorn_iterations: u32,
    /// The prototypes get no update for this many first steps.
    pub freeze_prototypes_steps: u64,
    /// Features of earlier batches kept per worker and view for the codes (0: none).
    pub queue_size: u64,
}

impl Default for SwavSettings {
    fn default() -> Self {
        Self {
            prototypes: 3000,
            epsilon: 0.05,
            sinkhorn_iterations: 3,
            freeze_prototypes_steps: 313,
            queue_size: 0,
        }
    }
}

impl ObjectiveConfig {
    /// Every kind's parameters are checked, so a job switched to another kind with `--set`
    /// cannot start from a value that was never valid.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(err("objective.temperature", "must be positive"));
        }
        let m = &self.moco;
        if m.queue_size == 0 {
            return Err(err("objective.moco.queue_size", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&m.momentum) {
            return Err(err(
                "objective.moco.momentum",
                format!("({}) must be in [0, 1)", m.momentum),
            ));
        }
        let s = &self.swav;
        if s.prototypes == 0 {
            return Err(err("objective.swav.prototypes", "must be at least 1"));
        }
        if s.epsilon.is_nan() || s.epsilon <= 0.0 {
            return Err(err("objective.swav.epsilon", "must be positive"));
        }
        if s.sinkhorn_iterations == 0 {
            return Err(err(
                "objective.swav.sinkhorn_iterations",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
