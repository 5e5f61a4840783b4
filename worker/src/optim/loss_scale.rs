//! Dynamic loss scaling for fp16 training (`train.precision = "fp16"`), as
//! `torch.amp.GradScaler` with its defaults: the backward pass starts from the loss times the
//! scale (2^16 at first), so small fp16 gradients do not flush to zero; before the step the
//! gradients are divided by the scale again, and when any of them is not finite (an fp16
//! overflow) the step is skipped and the scale halved. After 2,000 steps in a row without
//! one, the scale doubles ([`ScaleSettings`]). The division by a power of two is exact, so
//! with finite gradients the step is the one the unscaled gradients give.
//!
//! It runs on the gradients after they were summed across ranks, which are the same on every
//! rank, so every rank skips the same steps (MoE jobs, whose expert gradients differ between
//! ranks, are refused by the config). The scale and the count of good steps are optimizer
//! state (`loss_scale.scale`, `loss_scale.growth_tracker`), so a checkpoint resumes them.

use super::Optimizer;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

const SCALE_KEY: &str = "loss_scale.scale";
const TRACKER_KEY: &str = "loss_scale.growth_tracker";

/// How the scale moves; the defaults are `torch.amp.GradScaler`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleSettings {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// Steps in a row with finite gradients after which the scale grows.
    pub growth_interval: u64,
}

impl Default for ScaleSettings {
    fn default() -> Self {
        Self {
            init_scale: 65_536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2_000,
        }
    }
}

/// The scale now, and the steps in a row with finite gradients since it last changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleState {
    pub scale: f64,
    pub growth_tracker: u64,
}

impl ScaleState {
    pub fn new(settings: &ScaleSettings) -> Self {
        Self {
            scale: settings.init_scale,
            growth_tracker: 0,
        }
    }

    /// The update after a step whose gradients were finite or not, as `_amp_update_scale_`.
    pub fn update(&mut self, found_inf: bool, settings: &ScaleSettings) {
        if found_inf {
            self.scale *= settings.backoff_factor;
            self.growth_tracker = 0;
            return;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == settings.growth_interval {
            let grown = self.scale * settings.growth_factor;
            // As PyTorch: never grow into infinity.
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        }
    }
}

/// An optimizer whose steps unscale the gradients first and skip on an overflow.
pub struct LossScaled {
    inner: Box<dyn Optimizer>,
    params: Vec<(String, Tensor)>,
    settings: ScaleSettings,
    state: ScaleState,
    skipped: u64,
}

impl LossScaled {
    /// `params`: the same parameters `inner` updates; `GradScaler`'s default settings.
    pub fn new(inner: Box<dyn Optimizer>, params: Vec<(String, Tensor)>) -> Self {
        Self::with_settings(inner, params, ScaleSettings::default())
    }

    pub fn with_settings(
        inner: Box<dyn Optimizer>,
        params: Vec<(String, Tensor)>,
        settings: ScaleSettings,
    ) -> Self {
        Self {
            inner,
            params,
            settings,
            state: ScaleState::new(&settings),
            skipped: 0,
        }
    }

    pub fn state(&self) -> ScaleState {
        self.state
    }

    /// Steps skipped so far by this optimizer (overflows).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Divides every gradient the step uses by the scale; true when one is not finite.
    fn unscale(&self, skip: &dyn Fn(&str) -> bool) -> bool {
        let inv = 1.0 / self.state.scale;
        tch::no_grad(|| {
            let mut bad: Option<Tensor> = None;
            for (name, p) in &self.params {
                let g = p.grad();
                if !g.defined() || skip(name) {
                    continue;
                }
                let _ = g.shallow_clone().g_mul_scalar_(inv);
                let here = g.isfinite().logical_not().any();
                bad = Some(match bad {
                    Some(b) => b.logical_or(&here),
                    None => here,
                });
            }
            // One read for the whole step.
            bad.is_some_and(|b| b.int64_value(&[]) != 0)
        })
    }
}

impl Optimizer for LossScaled {
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) {
        let found_inf = self.unscale(skip);
        if found_inf {
            self.skipped += 1;
            tracing::warn!(
                scale = self.state.scale,
                "fp16 gradients overflowed: step skipped, loss scale halved"
            );
        } else {
            self.inner.step_skipping(lr, skip);
        }
        self.state.update(found_inf, &self.settings);
    }

    fn zero_grad(&mut self) {
        self.inner.zero_grad();
    }

    fn loss_scale(&self) -> Option<f64> {
        Some(self.state.scale)
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = self.inner.state_tensors();
        out.push((
            SCALE_KEY.to_string(),
            Tensor::from_slice(&[self.state.scale]),
        ));
        out.push((
            TRACKER_KEY.to_string(),
            Tensor::from_slice(&[self.state.growth_tracker as i64]),
        ));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let find = |key: &str| state.iter().find(|(n, _)| n == key).map(|(_, t)| t);
        let loaded = match (find(SCALE_KEY), find(TRACKER_KEY)) {
            (Some(scale), Some(tracker)) => {
                let scale = scale.to_kind(Kind::Double).double_value(&[0]);
                let tracker = tracker.int64_value(&[0]);
                if !(scale.is_finite() && scale > 0.0) || tracker < 0 {
                    bail!(
                        "the checkpoint's loss scale ({scale}, {tracker} good steps) is not valid"
                    );
                }
                ScaleState {
                    scale,
                    growth_tracker: tracker as u64,
                }
            }
            (None, None) => {
                // A checkpoint of an fp32 or bf16 run: the scale starts afresh, as a
                // GradScaler added to a resumed PyTorch run does.
                tracing::info!(
                    "the checkpoint has no loss scale (not written by an fp16 run): starting at {}",
                    self.settings.init_scale
                );
                ScaleState::new(&self.settings)
            }
            _ => bail!(
                "the checkpoint's optimizer state has only one of {SCALE_KEY} and {TRACKER_KEY}"
            ),
        };
        self.inner.load_state(&without_loss_scale(state))?;
        self.state = loaded;
        Ok(())
    }
}

/// Optimizer state without the loss scale's entries (what an unscaled optimizer loads from
/// an fp16 run's checkpoint).
pub fn without_loss_scale(state: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    state
        .iter()
        .filter(|(n, _)| n != SCALE_KEY && n != TRACKER_KEY)
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Sgd;

    fn param() -> Vec<(String, Tensor)> {
        vec![(
            "w".to_string(),
            Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true),
        )]
    }

    #[test]
    fn the_scale_halves_on_an_overflow_and_doubles_after_a_run_of_good_steps() {
        let settings = ScaleSettings::default();
        let mut s = ScaleState::new(&settings);
        assert_eq!(s.scale, 65_536.0);
        s.update(true, &settings);
        assert_eq!((s.scale, s.growth_tracker), (32_768.0, 0));
        for _ in 0..1_999 {
            s.update(false, &settings);
        }
        assert_eq!((s.scale, s.growth_tracker), (32_768.0, 1_999));
        s.update(false, &settings);
        assert_eq!((s.scale, s.growth_tracker), (65_536.0, 0));
        let mut top = ScaleState {
            scale: f64::MAX,
            growth_tracker: 1_999,
        };
        top.update(false, &settings);
        assert_eq!(
            (top.scale, top.growth_tracker),
            (f64::MAX, 0),
            "never infinite"
        );
    }

    /// The scale travels with the optimizer's state: a checkpoint of an fp16 run resumes it,
    /// an optimizer without scaling loads the rest, and a checkpoint without one starts the
    /// scale afresh.
    #[test]
    fn the_scale_is_saved_and_loaded_with_the_optimizer_state() {
        let p = param();
        let mut a = LossScaled::new(Box::new(Sgd::new(shallow(&p), 0.9, 0.0)), shallow(&p));
        a.state = ScaleState {
            scale: 512.0,
            growth_tracker: 7,
        };
        let saved = a.state_tensors();
        assert!(
            saved.iter().any(|(n, _)| n == SCALE_KEY),
            "{:?}",
            names(&saved)
        );
        let mut b = LossScaled::new(Box::new(Sgd::new(shallow(&p), 0.9, 0.0)), shallow(&p));
        b.load_state(&saved).unwrap();
        assert_eq!(b.state(), a.state());
        let mut plain = Sgd::new(shallow(&p), 0.9, 0.0);
        assert!(
            plain.load_state(&saved).is_err(),
            "the unscaled optimizer sees extra keys"
        );
        plain.load_state(&without_loss_scale(&saved)).unwrap();
        let mut c = LossScaled::new(Box::new(Sgd::new(shallow(&p), 0.9, 0.0)), shallow(&p));
        c.state.scale = 8.0;
        c.load_state(&plain.state_tensors()).unwrap();
        assert_eq!(c.state(), ScaleState::new(&ScaleSettings::default()));
    }

    fn shallow(p: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        p.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    fn names(state: &[(String, Tensor)]) -> Vec<&str> {
        state.iter().map(|(n, _)| n.as_str()).collect()
    }
}
