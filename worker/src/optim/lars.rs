//! LARS (You et al., 2017) as in lightly's `lightly.utils.lars.LARS` (itself PyTorch Lightning
//! Bolts'), with solo-learn's trust-ratio clip. For each parameter `p` with gradient `g`:
//!
//! ```text
//! d = g + λ·p                                   (λ = 0 where decay is excluded)
//! r = η‖p‖ / (‖g‖ + λ‖p‖ + ε)                    (adapted parameters, when ‖p‖ ≠ 0 and ‖g‖ ≠ 0)
//! r = min(r / lr, 1)                             (only with `clip`)
//! d = r·d                                        (a zero norm leaves d = g, as both references do)
//! buf = momentum·buf + d;  p -= lr·buf
//! ```
//!
//! lightly ties the two 1-D exclusions together (a parameter group with weight_decay 0 gets
//! neither decay nor adaptation); here they are separate switches, and a parameter excluded
//! from adaptation still gets plain SGD decay `g + λ·p` unless it is excluded from decay too.
//! With both switches on (the default) this is lightly with biases and norm parameters in a
//! weight_decay=0 group, the usual SimCLR set-up.

use super::sgd::momentum_update;
use super::{load_momentum_state, momentum_state, zero_grads, Optimizer};
use contrail_common::config::OptimConfig;
use tch::Tensor;

/// LARS hyper-parameters other than the learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LarsOptions {
    pub momentum: f64,
    pub weight_decay: f64,
    /// Trust coefficient η.
    pub eta: f64,
    pub eps: f64,
    /// solo-learn's `clip_lars_lr`: the effective rate `lr·r` never exceeds `lr`.
    pub clip: bool,
    pub exclude_1d_from_decay: bool,
    pub exclude_1d_from_adaptation: bool,
}

impl LarsOptions {
    pub fn from_config(cfg: &OptimConfig) -> Self {
        Self {
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            eta: cfg.lars.eta,
            eps: cfg.lars.eps,
            clip: cfg.lars.clip,
            exclude_1d_from_decay: cfg.exclude_1d_from_decay,
            exclude_1d_from_adaptation: cfg.lars.exclude_1d_from_adaptation,
        }
    }
}

impl Default for LarsOptions {
    /// lightly's defaults (η = 0.001, ε = 1e-8) with the config's momentum and decay.
    fn default() -> Self {
        Self::from_config(&OptimConfig::default())
    }
}

pub struct Lars {
    params: Vec<(String, Tensor)>,
    /// Zero at the start: lightly's first step sets `buf = d`, which is `momentum·0 + d`.
    buffers: Vec<Tensor>,
    opts: LarsOptions,
}

impl Lars {
    /// Over named parameters (the model's `named_parameters()`, sorted by name); the tensors
    /// share storage with the model, which they update in place.
    pub fn new(params: Vec<(String, Tensor)>, opts: LarsOptions) -> Self {
        let buffers = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            params,
            buffers,
            opts,
        }
    }

    /// The update direction `r·(g + λ·p)` (or its unadapted form) for one parameter.
    fn direction(&self, p: &Tensor, g: &Tensor, lr: f64) -> Tensor {
        let o = &self.opts;
        // Scalars count as 1-D (no decay or adaptation for a temperature).
        let is_1d = p.dim() <= 1;
        let decay = if is_1d && o.exclude_1d_from_decay {
            0.0
        } else {
            o.weight_decay
        };
        let decayed = if decay != 0.0 {
            g + p * decay
        } else {
            g.shallow_clone()
        };
        if is_1d && o.exclude_1d_from_adaptation {
            return decayed;
        }
        // Kept on the device: a `!= 0` test on the host would sync every parameter every step.
        let p_norm = p.norm();
        let g_norm = g.norm();
        let mut ratio = &p_norm / (&g_norm + &p_norm * decay + o.eps) * o.eta;
        if o.clip {
            ratio = (ratio / lr).clamp_max(1.0);
        }
        let usable = p_norm.ne(0.0).logical_and(&g_norm.ne(0.0));
        (decayed * ratio).where_self(&usable, g)
    }
}

impl Optimizer for Lars {
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) {
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                let (name, p) = &self.params[i];
                let g = p.grad();
                if !g.defined() || skip(name) {
                    continue;
                }
                let d = self.direction(p, &g, lr);
                let mut p = self.params[i].1.shallow_clone();
                momentum_update(&mut p, &mut self.buffers[i], &d, self.opts.momentum, lr);
            }
        });
    }

    fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        momentum_state(&self.params, &self.buffers)
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> anyhow::Result<()> {
        load_momentum_state(state, &self.params, &mut self.buffers, "LARS")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn param(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values)
            .reshape(shape)
            .set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        let _ = p.grad();
        (p * Tensor::from_slice(g).reshape(p.size()))
            .sum(Kind::Float)
            .backward();
    }

    fn opts() -> LarsOptions {
        LarsOptions {
            momentum: 0.0,
            weight_decay: 0.5,
            eta: 0.1,
            eps: 0.0,
            clip: false,
            exclude_1d_from_decay: false,
            exclude_1d_from_adaptation: false,
        }
    }

    #[test]
    fn one_step_follows_the_trust_ratio_formula() {
        // ‖w‖ = 5, ‖g‖ = 1: r = 0.1·5/(1 + 0.5·5) = 1/7; d = r·(g + 0.5·w).
        let w = param(&[3.0, 4.0, 0.0, 0.0], &[2, 2]);
        let mut opt = Lars::new(vec![("w".into(), w.shallow_clone())], opts());
        set_grad(&w, &[0.6, 0.8, 0.0, 0.0]);
        opt.step(1.0);
        let r = 1.0 / 7.0;
        let want = [3.0 - r * (0.6 + 1.5), 4.0 - r * (0.8 + 2.0)];
        let got = Vec::<f32>::try_from(&w.detach().flatten(0, -1)).unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn exclusion_switches_act_separately_on_1d_params() {
        let run = |decay_off: bool, adapt_off: bool| {
            let b = param(&[3.0, 4.0], &[2]);
            let o = LarsOptions {
                exclude_1d_from_decay: decay_off,
                exclude_1d_from_adaptation: adapt_off,
                ..opts()
            };
            let mut opt = Lars::new(vec![("b".into(), b.shallow_clone())], o);
            set_grad(&b, &[0.6, 0.8]);
            opt.step(1.0);
            Vec::<f32>::try_from(&b.detach()).unwrap()[0] as f64
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        // Both on: plain gradient step.
        assert!(close(run(true, true), 3.0 - 0.6));
        // Only adaptation off: plain SGD with decay.
        assert!(close(run(false, true), 3.0 - (0.6 + 1.5)));
        // Only decay off: trust ratio without λ in it, r = 0.1·5/1.
        assert!(close(run(true, false), 3.0 - 0.5 * 0.6));
        // Neither: full LARS, r = 1/7.
        assert!(close(run(false, false), 3.0 - (0.6 + 1.5) / 7.0));
    }

    #[test]
    fn clip_caps_the_effective_rate_at_lr() {
        // r = 1/7; with lr = 0.1, r/lr = 10/7 is clipped to 1, so the step is lr·d.
        let w = param(&[3.0, 4.0], &[1, 2]);
        let o = LarsOptions {
            clip: true,
            ..opts()
        };
        let mut opt = Lars::new(vec![("w".into(), w.shallow_clone())], o);
        set_grad(&w, &[0.6, 0.8]);
        opt.step(0.1);
        let got = Vec::<f32>::try_from(&w.detach().flatten(0, -1)).unwrap();
        assert!((got[0] as f64 - (3.0 - 0.1 * 2.1)).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn zero_weight_norm_takes_the_raw_gradient() {
        let w = param(&[0.0, 0.0], &[1, 2]);
        let mut opt = Lars::new(vec![("w".into(), w.shallow_clone())], opts());
        set_grad(&w, &[1.0, -2.0]);
        opt.step(0.5);
        assert_eq!(
            Vec::<f32>::try_from(&w.detach().flatten(0, -1)).unwrap(),
            vec![-0.5, 1.0]
        );
    }

    #[test]
    fn state_round_trip_and_errors_name_the_key() {
        let w = param(&[1.0, 2.0], &[1, 2]);
        let o = LarsOptions {
            momentum: 0.9,
            ..opts()
        };
        let mut a = Lars::new(vec![("w".into(), w.shallow_clone())], o);
        set_grad(&w, &[1.0, 1.0]);
        a.step(0.1);
        let state = a.state_tensors();
        assert_eq!(state[0].0, "momentum.w");
        assert!(state[0].1.abs().sum(Kind::Float).double_value(&[]) > 0.0);

        let q = param(&[0.0, 0.0], &[1, 2]);
        let mut b = Lars::new(vec![("w".into(), q.shallow_clone())], o);
        b.load_state(&state).unwrap();
        assert!(b.state_tensors()[0].1.equal(&state[0].1));
        let bad = vec![(
            "momentum.w".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )];
        let e = b.load_state(&bad).unwrap_err().to_string();
        assert!(e.contains("momentum.w") && e.contains("[3]"), "{e}");
        let e = b.load_state(&[]).unwrap_err().to_string();
        assert!(e.contains("momentum.w"), "{e}");
        assert!(b.state_tensors()[0].1.equal(&state[0].1));
    }
}
