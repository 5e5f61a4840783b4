//! SGD with momentum and weight decay, exactly `torch.optim.SGD` (dampening 0, no Nesterov):
//! `d = g + wd·p; buf = momentum·buf + d; p -= lr·buf`.

use super::flat::FlatParams;
use super::{load_momentum_state, momentum_state, zero_grads, Optimizer};
use tch::Tensor;

/// Optimizer-state slot of the momentum buffers: keys are `momentum.<param>`.
pub(super) const MOMENTUM: &str = "momentum";

pub struct Sgd {
    params: Vec<(String, Tensor)>,
    /// Created zero with the parameter: PyTorch's first step sets `buf = d`, and
    /// `momentum·0 + d` is exactly `d`, so a zero start is the same update.
    buffers: Vec<Tensor>,
    momentum: f64,
    weight_decay: f64,
    /// Parameters and momentum buffers in flat storage (`buffers` are views into
    /// `flat_buffer`), for the few-kernel update.
    flat: Option<(FlatParams, Tensor)>,
}

impl Sgd {
    /// Over named parameters (the model's `named_parameters()`, sorted by name); the tensors
    /// share storage with the model, which they update in place.
    pub fn new(params: Vec<(String, Tensor)>, momentum: f64, weight_decay: f64) -> Self {
        let flat = FlatParams::new(&params).map(|fp| {
            let buffer = fp.zeros();
            (fp, buffer)
        });
        let buffers = match &flat {
            Some((fp, buffer)) => (0..params.len()).map(|i| fp.view(buffer, i)).collect(),
            None => params.iter().map(|(_, p)| p.zeros_like()).collect(),
        };
        Self {
            params,
            buffers,
            momentum,
            weight_decay,
            flat,
        }
    }

    /// The whole update on the flat buffers; false when it does not apply (a parameter is
    /// skipped or lacks a gradient), and then nothing was changed.
    fn flat_step(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) -> bool {
        let Some((fp, buffer)) = &mut self.flat else {
            return false;
        };
        if self.params.iter().any(|(n, _)| skip(n)) {
            return false;
        }
        let Some(g) = fp.gradients(&self.params) else {
            return false;
        };
        tch::no_grad(|| {
            let mut p = fp.flat().shallow_clone();
            let d = if self.weight_decay != 0.0 {
                g + &p * self.weight_decay
            } else {
                g
            };
            momentum_update(&mut p, buffer, &d, self.momentum, lr);
        });
        true
    }
}

impl Optimizer for Sgd {
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) {
        if self.flat_step(lr, skip) {
            return;
        }
        tch::no_grad(|| {
            for ((name, p), buf) in self.params.iter_mut().zip(&mut self.buffers) {
                let g = p.grad();
                if !g.defined() || skip(name) {
                    continue;
                }
                let d = if self.weight_decay != 0.0 {
                    &g + &*p * self.weight_decay
                } else {
                    g
                };
                momentum_update(p, buf, &d, self.momentum, lr);
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
        load_momentum_state(state, &self.params, &mut self.buffers, "SGD")
    }
}

/// `buf = momentum·buf + d; p -= lr·buf` (with momentum 0: `p -= lr·d`): the update of
/// `torch.optim.SGD`, which LARS applies to its trust-ratio-scaled direction too.
pub(super) fn momentum_update(
    p: &mut Tensor,
    buf: &mut Tensor,
    d: &Tensor,
    momentum: f64,
    lr: f64,
) {
    if momentum != 0.0 {
        let _ = buf.g_mul_scalar_(momentum).g_add_(d);
        let _ = p.g_sub_(&(&*buf * lr));
    } else {
        let _ = p.g_sub_(&(d * lr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        let _ = p.grad(); // absent before the first backward
        let loss = (p * Tensor::from_slice(g)).sum(Kind::Float);
        loss.backward();
    }

    #[test]
    fn matches_torch_sgd_recurrence() {
        // Scalar recurrence written out: d = g + wd p; buf = m buf + d; p -= lr buf.
        let (lr, m, wd) = (0.5, 0.9, 0.1);
        let p = param(&[1.0, -2.0]);
        let mut opt = Sgd::new(vec![("w".into(), p.shallow_clone())], m, wd);
        let grads = [[0.3f32, -0.1], [0.2, 0.4], [-0.5, 0.0]];
        let (mut pw, mut buf) = ([1.0f64, -2.0], [0.0f64; 2]);
        for g in grads {
            opt.zero_grad();
            set_grad(&p, &g);
            opt.step(lr);
            for i in 0..2 {
                let d = g[i] as f64 + wd * pw[i];
                buf[i] = m * buf[i] + d;
                pw[i] -= lr * buf[i];
            }
        }
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - pw[i]).abs() < 1e-5,
                "param {i}: {} vs {}",
                got[i],
                pw[i]
            );
        }
    }

    #[test]
    fn parameters_without_gradient_are_left_alone() {
        let p = param(&[1.0, 2.0]);
        let mut opt = Sgd::new(vec![("w".into(), p.shallow_clone())], 0.9, 0.1);
        opt.step(1.0);
        assert_eq!(Vec::<f32>::try_from(&p.detach()).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn state_round_trip_and_errors_name_the_key() {
        let p = param(&[1.0, 2.0]);
        let mut a = Sgd::new(vec![("w".into(), p.shallow_clone())], 0.9, 0.0);
        set_grad(&p, &[1.0, 1.0]);
        a.step(0.1);
        let state = a.state_tensors();
        assert_eq!(state[0].0, "momentum.w");

        let q = param(&[0.0, 0.0]);
        let mut b = Sgd::new(vec![("w".into(), q.shallow_clone())], 0.9, 0.0);
        b.load_state(&state).unwrap();
        assert!(b.state_tensors()[0].1.equal(&state[0].1));

        let bad = vec![(
            "momentum.w".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )];
        let e = b.load_state(&bad).unwrap_err().to_string();
        assert!(e.contains("momentum.w") && e.contains("[3]"), "{e}");
        let e = b.load_state(&[]).unwrap_err().to_string();
        assert!(e.contains("has no \"momentum.w\""), "{e}");
        let mut extra: Vec<_> = state.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        extra.push((
            "momentum.v".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        let e = b.load_state(&extra).unwrap_err().to_string();
        assert!(e.contains("momentum.v"), "{e}");
        // A failed load leaves the earlier state in place.
        assert!(b.state_tensors()[0].1.equal(&state[0].1));
    }
}
