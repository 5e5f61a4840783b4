//! `[optim]` with `[optim.lars]` and `[optim.adamw]`: the optimizer, its learning-rate
//! schedule, and each optimizer's own parameters.

use super::choice::choice;
use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

choice! {
    /// The optimizer.
    pub enum OptimKind default Sgd {
        /// SGD with momentum (`torch.optim.SGD`).
        Sgd = "sgd",
        /// LARS as lightly's `lightly.utils.lars.LARS` (`[optim.lars]`).
        Lars = "lars",
        /// `torch.optim.AdamW` (`[optim.adamw]`).
        Adamw = "adamw",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimKind,
    /// Base learning rate; the peak is this scaled by `lr_scaling`.
    pub lr: f64,
    /// Momentum (sgd, lars).
    pub momentum: f64,
    /// L2 penalty (sgd, lars) or decoupled decay factor (adamw).
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
    /// How the peak learning rate follows `train.global_batch`.
    pub lr_scaling: LrScaling,
    /// lars, adamw: no weight decay on 1-D parameters (biases, norm scales and shifts).
    pub exclude_1d_from_decay: bool,
    /// Before each step, scale the summed gradients down so their joint L2 norm is at most
    /// this (`torch.nn.utils.clip_grad_norm_`); 0 = no clipping.
    pub grad_clip_norm: f64,
    /// Layer-wise learning-rate decay (BEiT, timm): a parameter's rate is the step's times
    /// this^(blocks above it + 1), so the head trains at the full rate and each block below at
    /// this times the one above; 1 = off.
    pub layer_decay: f64,
    /// Used with `kind = "lars"`.
    pub lars: LarsSettings,
    /// Used with `kind = "adamw"`.
    pub adamw: AdamWSettings,
}

/// Peak learning rate as a function of the global batch (see `optim::scaling` in the worker).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// peak = lr.
    #[default]
    None,
    /// peak = lr × global_batch / 256 (Goyal et al.).
    Linear,
    /// peak = lr × √global_batch (SimCLR's LARS recipe).
    Sqrt,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LarsSettings {
    /// Trust coefficient η in η‖w‖/(‖g‖ + λ‖w‖ + ε); lightly's default.
    pub eta: f64,
    /// ε in the trust-ratio denominator.
    pub eps: f64,
    /// Clip the trust ratio to min(ratio/lr, 1), as solo-learn's `clip_lars_lr`.
    pub clip: bool,
    /// 1-D parameters take the plain SGD step instead of the trust-ratio one.
    pub exclude_1d_from_adaptation: bool,
}

impl Default for LarsSettings {
    fn default() -> Self {
        Self {
            eta: 0.001,
            eps: 1e-8,
            clip: false,
            exclude_1d_from_adaptation: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWSettings {
    /// β₁ (first-moment decay).
    pub beta1: f64,
    /// β₂ (second-moment decay).
    pub beta2: f64,
    /// ε added outside the square root.
    pub eps: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-6,
            warmup_steps: 10,
            lr_scaling: LrScaling::None,
            exclude_1d_from_decay: true,
            grad_clip_norm: 0.0,
            layer_decay: 1.0,
            lars: LarsSettings::default(),
            adamw: AdamWSettings::default(),
        }
    }
}

impl OptimConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let o = self;
        if o.lr.is_nan() || o.lr <= 0.0 {
            return Err(err("optim.lr", "must be positive"));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(err(
                "optim.momentum",
                format!("({}) must be in [0, 1)", o.momentum),
            ));
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return Err(err("optim.weight_decay", "must not be negative"));
        }
        if !o.grad_clip_norm.is_finite() || o.grad_clip_norm < 0.0 {
            return Err(err(
                "optim.grad_clip_norm",
                "must be a finite number, 0 (off) or positive",
            ));
        }
        if !(o.layer_decay > 0.0 && o.layer_decay <= 1.0) {
            return Err(err(
                "optim.layer_decay",
                format!("({}) must be in (0, 1]; 1 is off", o.layer_decay),
            ));
        }
        if o.lars.eta.is_nan() || o.lars.eta <= 0.0 {
            return Err(err("optim.lars.eta", "must be positive"));
        }
        if o.lars.eps.is_nan() || o.lars.eps < 0.0 {
            return Err(err("optim.lars.eps", "must not be negative"));
        }
        for (path, beta) in [
            ("optim.adamw.beta1", o.adamw.beta1),
            ("optim.adamw.beta2", o.adamw.beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err(err(path, format!("({beta}) must be in [0, 1)")));
            }
        }
        // eps keeps the AdamW denominator away from zero for parameters whose gradient is 0.
        if o.adamw.eps.is_nan() || o.adamw.eps <= 0.0 {
            return Err(err("optim.adamw.eps", "must be positive"));
        }
        Ok(())
    }
}
