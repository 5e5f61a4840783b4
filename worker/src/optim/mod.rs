//! Optimizers over named parameters, and learning-rate schedules.
//!
//! An optimizer reads each parameter's `.grad()` (already all-reduced by the training step)
//! and updates the parameter in place. Its state is a list of named tensors so checkpoints can
//! store it next to the model variables in one safetensors file.

pub mod adamw;
pub mod clip;
pub mod flat;
pub mod groups;
pub mod lars;
pub mod loss_scale;
pub mod scaling;
pub mod schedule;
pub mod sgd;

use anyhow::{bail, Context};
use contrail_common::config::{OptimConfig, OptimKind};
use std::collections::HashMap;
use tch::Tensor;

pub use adamw::{AdamW, AdamWOptions};
pub use clip::GradClip;
pub use groups::ParamGroups;
pub use lars::{Lars, LarsOptions};
pub use loss_scale::LossScaled;
pub use scaling::scaled_peak_lr;
pub use schedule::lr_at;
pub use sgd::Sgd;

pub trait Optimizer: Send {
    /// One update of every parameter that has a gradient, with learning rate `lr`.
    fn step(&mut self, lr: f64) {
        self.step_skipping(lr, &|_| false);
    }

    /// [`Optimizer::step`] that leaves the parameters named by `skip` alone, value and
    /// optimizer state both, as PyTorch optimizers treat a parameter whose `.grad` is None
    /// (e.g. SwAV's prototypes while frozen).
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool);

    /// Zeroes every parameter gradient (keeping it allocated).
    fn zero_grad(&mut self);

    /// Optimizer state as (name, tensor) pairs, sorted by name; names are `<state>.<param>`,
    /// e.g. `momentum.layer1.0.conv1.weight`.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores state written by [`Optimizer::state_tensors`]. Fails, naming the key, on a
    /// missing or unexpected key or a shape mismatch; on error the state is unchanged.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> anyhow::Result<()>;

    /// The factor the training step multiplies the loss by before backward (fp16's dynamic
    /// loss scale, [`LossScaled`]); the step then divides the gradients by it. None: the
    /// loss is not scaled.
    fn loss_scale(&self) -> Option<f64> {
        None
    }
}

/// The optimizer named by `optim.kind` over `params` (a model's `named_parameters()`), every
/// parameter at the step's learning rate. With `optim.grad_clip_norm` set, its steps clip the
/// gradients first. A job's optimizer comes from `ContrastiveModel::optimizer`, which also
/// applies `optim.layer_decay`.
pub fn build(cfg: &OptimConfig, params: Vec<(String, Tensor)>) -> Box<dyn Optimizer> {
    build_scaled(cfg, params, None)
}

/// [`build`] with a learning-rate multiplier per parameter (same order as `params`), as
/// parameter groups ([`ParamGroups`]); None: all 1.
pub fn build_scaled(
    cfg: &OptimConfig,
    params: Vec<(String, Tensor)>,
    scales: Option<&[f64]>,
) -> Box<dyn Optimizer> {
    let clipped: Option<Vec<(String, Tensor)>> = (cfg.grad_clip_norm > 0.0).then(|| {
        params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect()
    });
    let make = |params: Vec<(String, Tensor)>| -> Box<dyn Optimizer> {
        match cfg.kind {
            OptimKind::Sgd => Box::new(Sgd::new(params, cfg.momentum, cfg.weight_decay)),
            OptimKind::Lars => Box::new(Lars::new(params, LarsOptions::from_config(cfg))),
            OptimKind::Adamw => Box::new(AdamW::new(params, AdamWOptions::from_config(cfg))),
        }
    };
    let inner = match scales {
        Some(scales) if scales.iter().any(|&s| s != 1.0) => {
            Box::new(ParamGroups::new(params, scales, &make))
        }
        _ => make(params),
    };
    match clipped {
        Some(params) => Box::new(GradClip::new(inner, params, cfg.grad_clip_norm)),
        None => inner,
    }
}

/// Zeroes every parameter's gradient, keeping it allocated.
fn zero_grads(params: &mut [(String, Tensor)]) {
    for (_, p) in params.iter_mut() {
        p.zero_grad();
    }
}

/// Copies loaded state into the optimizer's buffers, on their device and kind.
fn copy_into(buffers: &mut [Tensor], loaded: &[Tensor]) {
    tch::no_grad(|| {
        for (buf, t) in buffers.iter_mut().zip(loaded) {
            buf.copy_(&t.to_device(buf.device()).to_kind(buf.kind()));
        }
    });
}

/// The momentum buffers of SGD and LARS as state tensors (`momentum.<param>`).
fn momentum_state(params: &[(String, Tensor)], buffers: &[Tensor]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .zip(buffers)
        .map(|((name, _), buf)| (format!("{}.{name}", sgd::MOMENTUM), buf.copy()))
        .collect()
}

/// Restores what [`momentum_state`] wrote; `optimizer` names it in errors.
fn load_momentum_state(
    state: &[(String, Tensor)],
    params: &[(String, Tensor)],
    buffers: &mut [Tensor],
    optimizer: &str,
) -> anyhow::Result<()> {
    let loaded = split_state(state, params, &[(sgd::MOMENTUM, true)], optimizer)?.remove(0);
    copy_into(buffers, &loaded);
    Ok(())
}

/// Splits checkpointed optimizer state into one tensor per (slot, parameter), in parameter
/// order, for state keyed `<slot>.<param>`. A slot marked `true` must have the parameter's
/// shape; `false` marks a scalar. Fails, naming the key, on a key of no known slot, a key for
/// no parameter, a missing key or a wrong shape.
fn split_state(
    state: &[(String, Tensor)],
    params: &[(String, Tensor)],
    slots: &[(&str, bool)],
    optimizer: &str,
) -> anyhow::Result<Vec<Vec<Tensor>>> {
    let mut by_key: HashMap<&str, &Tensor> = state.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = Vec::with_capacity(slots.len());
    for &(slot, param_shaped) in slots {
        let mut tensors = Vec::with_capacity(params.len());
        for (name, p) in params {
            let key = format!("{slot}.{name}");
            let t = by_key
                .remove(key.as_str())
                .with_context(|| format!("{optimizer} optimizer state has no \"{key}\""))?;
            let want = if param_shaped { p.size() } else { Vec::new() };
            if t.size() != want {
                bail!(
                    "{optimizer} optimizer state \"{key}\" has shape {:?}, expected {want:?}",
                    t.size()
                );
            }
            tensors.push(t.shallow_clone());
        }
        out.push(tensors);
    }
    if let Some(extra) = by_key.keys().min() {
        let known: Vec<String> = slots.iter().map(|(s, _)| format!("{s}.<param>")).collect();
        bail!(
            "{optimizer} optimizer state has \"{extra}\", which is not one of {} for a model parameter",
            known.join(", ")
        );
    }
    Ok(out)
}
