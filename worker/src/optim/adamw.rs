//! AdamW, exactly `torch.optim.AdamW` (single-tensor path, no amsgrad): for each parameter with
//! a gradient, `t += 1`;
//!
//! ```text
//! p *= 1 - lr·λ                                  (decoupled decay; λ = 0 where excluded)
//! m = lerp(m, g, 1 - β₁);  v = β₂·v + (1 - β₂)·g²
//! p -= (lr / (1 - β₁ᵗ)) · m / (√v / √(1 - β₂ᵗ) + ε)   (ε outside the square root)
//! ```
//!
//! State keys follow PyTorch's names: `exp_avg.<param>`, `exp_avg_sq.<param>`, and
//! `step.<param>` (a scalar i64: parameters that never had a gradient keep count 0).

use super::flat::FlatParams;
use super::{copy_into, split_state, zero_grads, Optimizer};
use anyhow::{bail, Context};
use contrail_common::config::OptimConfig;
use tch::{Device, Kind, Tensor};

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";

/// AdamW hyper-parameters other than the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWOptions {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// No decay on 1-D parameters (biases, norm scales and shifts).
    pub exclude_1d_from_decay: bool,
}

impl AdamWOptions {
    pub fn from_config(cfg: &OptimConfig) -> Self {
        Self {
            beta1: cfg.adamw.beta1,
            beta2: cfg.adamw.beta2,
            eps: cfg.adamw.eps,
            weight_decay: cfg.weight_decay,
            exclude_1d_from_decay: cfg.exclude_1d_from_decay,
        }
    }
}

pub struct AdamW {
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Steps each parameter has taken (PyTorch keeps the count per parameter too).
    steps: Vec<i64>,
    opts: AdamWOptions,
    /// Flat storage for the few-kernel update: parameters, exp_avg, exp_avg_sq (the
    /// per-parameter moments are views into these) and each element's decay factor.
    flat: Option<FlatAdam>,
}

struct FlatAdam {
    params: FlatParams,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: Tensor,
}

impl AdamW {
    /// Over named parameters (the model's `named_parameters()`, sorted by name); the tensors
    /// share storage with the model, which they update in place.
    pub fn new(params: Vec<(String, Tensor)>, opts: AdamWOptions) -> Self {
        let flat = FlatParams::new(&params).map(|fp| {
            let decay: Vec<f64> = params.iter().map(|(_, p)| decay_of(p, &opts)).collect();
            FlatAdam {
                exp_avg: fp.zeros(),
                exp_avg_sq: fp.zeros(),
                decay: fp.per_element(&decay),
                params: fp,
            }
        });
        let (exp_avg, exp_avg_sq) = match &flat {
            Some(f) => (
                (0..params.len())
                    .map(|i| f.params.view(&f.exp_avg, i))
                    .collect(),
                (0..params.len())
                    .map(|i| f.params.view(&f.exp_avg_sq, i))
                    .collect(),
            ),
            None => (
                params.iter().map(|(_, p)| p.zeros_like()).collect(),
                params.iter().map(|(_, p)| p.zeros_like()).collect(),
            ),
        };
        let steps = vec![0; params.len()];
        Self {
            params,
            exp_avg,
            exp_avg_sq,
            steps,
            opts,
            flat,
        }
    }

    /// The whole update on the flat buffers; false when it does not apply (a parameter is
    /// skipped, lacks a gradient, or has taken a different number of steps), and then nothing
    /// was changed. Same operations as the per-parameter path, elementwise.
    fn flat_step(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) -> bool {
        let o = self.opts;
        let Some(f) = &mut self.flat else {
            return false;
        };
        let first = self.steps.first().copied().unwrap_or(0);
        if self.params.iter().any(|(n, _)| skip(n)) || self.steps.iter().any(|&t| t != first) {
            return false;
        }
        let Some(g) = f.params.gradients(&self.params) else {
            return false;
        };
        let t = (first + 1) as f64;
        tch::no_grad(|| {
            let mut p = f.params.flat().shallow_clone();
            if o.weight_decay != 0.0 {
                let _ = p.g_mul_(&(&f.decay * -lr + 1.0));
            }
            let _ = f.exp_avg.lerp_(&g, 1.0 - o.beta1);
            let _ = f
                .exp_avg_sq
                .g_mul_scalar_(o.beta2)
                .g_add_(&(&g * (1.0 - o.beta2) * &g));
            let step_size = lr / (1.0 - o.beta1.powf(t));
            let bias_correction2_sqrt = (1.0 - o.beta2.powf(t)).sqrt();
            let denom = f.exp_avg_sq.sqrt() / bias_correction2_sqrt + o.eps;
            let _ = p.g_add_(&(&f.exp_avg * -step_size / denom));
        });
        for s in &mut self.steps {
            *s += 1;
        }
        true
    }
}

/// Decoupled weight decay of `p`: none for 1-D and 0-D parameters when excluded (scalars
/// such as CLIP's logit scale count as 1-D; open_clip exempts them too).
fn decay_of(p: &Tensor, o: &AdamWOptions) -> f64 {
    if p.dim() <= 1 && o.exclude_1d_from_decay {
        0.0
    } else {
        o.weight_decay
    }
}

impl Optimizer for AdamW {
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) {
        if self.flat_step(lr, skip) {
            return;
        }
        let o = self.opts;
        tch::no_grad(|| {
            for (i, (name, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() || skip(name) {
                    continue;
                }
                self.steps[i] += 1;
                let t = self.steps[i] as f64;
                let decay = decay_of(p, &o);
                if decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * decay);
                }
                let m = &mut self.exp_avg[i];
                let _ = m.lerp_(&g, 1.0 - o.beta1);
                let v = &mut self.exp_avg_sq[i];
                // Same operand order as PyTorch's addcmul (value·g·g) for bit-level agreement.
                let _ = v
                    .g_mul_scalar_(o.beta2)
                    .g_add_(&(&g * (1.0 - o.beta2) * &g));
                let step_size = lr / (1.0 - o.beta1.powf(t));
                let bias_correction2_sqrt = (1.0 - o.beta2.powf(t)).sqrt();
                let denom = v.sqrt() / bias_correction2_sqrt + o.eps;
                let _ = p.g_add_(&(&self.exp_avg[i] * -step_size / denom));
            }
        });
    }

    fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{EXP_AVG}.{name}"), self.exp_avg[i].copy()));
            out.push((format!("{EXP_AVG_SQ}.{name}"), self.exp_avg_sq[i].copy()));
            out.push((format!("{STEP}.{name}"), Tensor::from(self.steps[i])));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> anyhow::Result<()> {
        let slots = [(EXP_AVG, true), (EXP_AVG_SQ, true), (STEP, false)];
        let mut loaded = split_state(state, &self.params, &slots, "AdamW")?.into_iter();
        let (Some(m), Some(v), Some(steps)) = (loaded.next(), loaded.next(), loaded.next()) else {
            bail!("internal: AdamW state split returned fewer than 3 slots");
        };
        let mut counts = Vec::with_capacity(steps.len());
        for ((name, _), t) in self.params.iter().zip(&steps) {
            let n = t
                .to_device(Device::Cpu)
                .to_kind(Kind::Int64)
                .f_int64_value(&[])
                .with_context(|| format!("optimizer state \"{STEP}.{name}\" is not a scalar"))?;
            if n < 0 {
                bail!(
                    "optimizer state \"{STEP}.{name}\" is {n}; a step count must not be negative"
                );
            }
            counts.push(n);
        }
        copy_into(&mut self.exp_avg, &m);
        copy_into(&mut self.exp_avg_sq, &v);
        self.steps = counts;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        let _ = p.grad();
        (p * Tensor::from_slice(g)).sum(Kind::Float).backward();
    }

    fn opts(exclude: bool) -> AdamWOptions {
        AdamWOptions {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            exclude_1d_from_decay: exclude,
        }
    }

    #[test]
    fn matches_scalar_recurrence() {
        let lr = 0.01;
        let o = opts(false);
        let p = param(&[1.0, -2.0]);
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], o);
        let (mut w, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [[0.3f32, -0.1], [0.2, 0.4], [-0.5, 0.05]]
            .iter()
            .enumerate()
        {
            opt.zero_grad();
            set_grad(&p, g);
            opt.step(lr);
            let t = (t + 1) as i32;
            for i in 0..2 {
                let gi = g[i] as f64;
                w[i] *= 1.0 - lr * o.weight_decay;
                m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * gi;
                v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * gi * gi;
                let mh = m[i] / (1.0 - o.beta1.powi(t));
                let vh = v[i] / (1.0 - o.beta2.powi(t));
                w[i] -= lr * mh / (vh.sqrt() + o.eps);
            }
        }
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{got:?} vs {w:?}");
        }
    }

    #[test]
    fn exclusion_skips_decay_on_1d_only() {
        // A zero gradient leaves only the decay: 1-D excluded stays, 2-D shrinks by 1 - lr·λ.
        let b = param(&[2.0, 2.0]);
        let w = Tensor::from_slice(&[2.0f32, 2.0])
            .reshape([1, 2])
            .set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![
                ("b".into(), b.shallow_clone()),
                ("w".into(), w.shallow_clone()),
            ],
            opts(true),
        );
        set_grad(&b, &[0.0, 0.0]);
        (&w * 0.0).sum(Kind::Float).backward();
        opt.step(0.5);
        assert_eq!(Vec::<f32>::try_from(&b.detach()).unwrap(), vec![2.0, 2.0]);
        let got = Vec::<f32>::try_from(&w.detach().flatten(0, -1)).unwrap();
        assert!((got[0] - 2.0 * 0.95).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn state_round_trip_and_errors_name_the_key() {
        let p = param(&[1.0, 2.0]);
        let mut a = AdamW::new(vec![("w".into(), p.shallow_clone())], opts(false));
        set_grad(&p, &[1.0, -1.0]);
        a.step(0.1);
        a.step(0.1);
        let state = a.state_tensors();
        let keys: Vec<&str> = state.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["exp_avg.w", "exp_avg_sq.w", "step.w"]);

        let q = param(&[0.0, 0.0]);
        let mut b = AdamW::new(vec![("w".into(), q.shallow_clone())], opts(false));
        b.load_state(&state).unwrap();
        assert_eq!(b.steps, vec![2]);
        for ((_, x), (_, y)) in b.state_tensors().iter().zip(&state) {
            assert!(x.equal(y));
        }

        let mut missing: Vec<_> = state.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        missing.retain(|(k, _)| k != "step.w");
        let e = b.load_state(&missing).unwrap_err().to_string();
        assert!(e.contains("has no \"step.w\""), "{e}");

        let mut wrong: Vec<_> = state.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        wrong[1].1 = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let e = b.load_state(&wrong).unwrap_err().to_string();
        assert!(e.contains("exp_avg_sq.w") && e.contains("[3]"), "{e}");

        let mut extra: Vec<_> = state.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        extra.push((
            "momentum.w".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        let e = b.load_state(&extra).unwrap_err().to_string();
        assert!(e.contains("momentum.w"), "{e}");
        // Failed loads leave the earlier state in place.
        assert_eq!(b.steps, vec![2]);
    }
}
