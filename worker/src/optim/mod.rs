//! Optimizers over named parameters, and learning-rate schedules.
//!
//! An optimizer reads each parameter's `.grad()` (already all-reduced by the training step)
//! and updates the parameter in place. Its state is a list of named tensors so checkpoints can
//! store it next to the model variables in one safetensors file.

pub mod adamw;
pub mod lars;
pub mod scaling;
pub mod schedule;
pub mod sgd;

use crate::model::SimClrModel;
use contrail_common::config::OptimConfig;
use tch::Tensor;

pub use adamw::{AdamW, AdamWOptions};
pub use lars::{Lars, LarsOptions};
pub use scaling::scaled_peak_lr;
pub use schedule::lr_at;
pub use sgd::Sgd;

pub trait Optimizer: Send {
    /// One update of every parameter that has a gradient, with learning rate `lr`.
    fn step(&mut self, lr: f64);

    /// Zeroes every parameter gradient (keeping it allocated).
    fn zero_grad(&mut self);

    /// Optimizer state as (name, tensor) pairs, sorted by name; names are `<state>.<param>`,
    /// e.g. `momentum.layer1.0.conv1.weight`.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores state written by [`Optimizer::state_tensors`]. Fails, naming the key, on a
    /// missing or unexpected key or a shape mismatch; on error the state is unchanged.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> anyhow::Result<()>;
}

/// The optimizer named by `optim.kind` over the model's parameters.
pub fn build(cfg: &OptimConfig, model: &SimClrModel) -> anyhow::Result<Box<dyn Optimizer>> {
    match cfg.kind.as_str() {
        "sgd" => Ok(Box::new(Sgd::new(model, cfg.momentum, cfg.weight_decay))),
        "lars" => Ok(Box::new(Lars::new(model, LarsOptions::from_config(cfg)))),
        "adamw" => Ok(Box::new(AdamW::new(model, AdamWOptions::from_config(cfg)))),
        other => anyhow::bail!(
            "optim.kind \"{other}\" is not built; expected \"sgd\", \"lars\" or \"adamw\""
        ),
    }
}
