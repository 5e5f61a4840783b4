//! Gradient-norm clipping before an optimizer's step (`optim.grad_clip_norm`), as
//! `torch.nn.utils.clip_grad_norm_`: the joint L2 norm of every gradient the step uses, and
//! when it exceeds the limit every such gradient is scaled by limit / (norm + 1e-6). It runs
//! on the gradients after they were summed across ranks, which are the same on every rank, so
//! every rank clips alike (MoE jobs, whose expert gradients differ, are refused by the config).

use super::Optimizer;
use tch::{Kind, Tensor};

/// An optimizer whose steps clip first.
pub struct GradClip {
    inner: Box<dyn Optimizer>,
    params: Vec<(String, Tensor)>,
    max_norm: f64,
}

impl GradClip {
    /// `params`: the same parameters `inner` updates.
    pub fn new(inner: Box<dyn Optimizer>, params: Vec<(String, Tensor)>, max_norm: f64) -> Self {
        Self {
            inner,
            params,
            max_norm,
        }
    }
}

/// Scales the gradients of `params` not named by `skip` so that their joint L2 norm is at
/// most `max_norm`; returns the norm before (a 0-d float32 tensor on the gradients' device,
/// so no step waits for the GPU here). None when no parameter has a gradient.
pub fn clip_grad_norm(
    params: &[(String, Tensor)],
    max_norm: f64,
    skip: &dyn Fn(&str) -> bool,
) -> Option<Tensor> {
    let grads: Vec<Tensor> = params
        .iter()
        .filter(|(n, p)| !skip(n) && p.grad().defined())
        .map(|(_, p)| p.grad())
        .collect();
    if grads.is_empty() {
        return None;
    }
    tch::no_grad(|| {
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm().reshape([1]))
            .collect();
        let total = Tensor::cat(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for g in &grads {
            let _ = g.shallow_clone().g_mul_(&coef.to_kind(g.kind()));
        }
        Some(total)
    })
}

impl Optimizer for GradClip {
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) {
        clip_grad_norm(&self.params, self.max_norm, skip);
        self.inner.step_skipping(lr, skip);
    }

    fn zero_grad(&mut self) {
        self.inner.zero_grad();
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.inner.state_tensors()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> anyhow::Result<()> {
        self.inner.load_state(state)
    }

    fn loss_scale(&self) -> Option<f64> {
        self.inner.loss_scale()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(values: &[f32], grad: &[f32]) -> Tensor {
        let p = Tensor::from_slice(values).set_requires_grad(true);
        (&p * Tensor::from_slice(grad)).sum(Kind::Float).backward();
        p
    }

    #[test]
    fn gradients_above_the_limit_are_scaled_to_it_and_below_it_kept() {
        // Joint norm 5 (3, 4).
        let params = vec![
            ("a".to_string(), param(&[1.0], &[3.0])),
            ("b".to_string(), param(&[1.0], &[4.0])),
        ];
        let norm = clip_grad_norm(&params, 10.0, &|_| false).unwrap();
        assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6);
        assert_eq!(params[0].1.grad().double_value(&[0]), 3.0);
        let _ = clip_grad_norm(&params, 2.5, &|_| false).unwrap();
        let scaled = 2.5 / (5.0 + 1e-6);
        assert!((params[0].1.grad().double_value(&[0]) - 3.0 * scaled).abs() < 1e-6);
        assert!((params[1].1.grad().double_value(&[0]) - 4.0 * scaled).abs() < 1e-6);
        // A skipped parameter neither counts nor is scaled.
        let params = vec![
            ("a".to_string(), param(&[1.0], &[3.0])),
            ("frozen".to_string(), param(&[1.0], &[400.0])),
        ];
        let norm = clip_grad_norm(&params, 10.0, &|n| n == "frozen").unwrap();
        assert!((norm.double_value(&[]) - 3.0).abs() < 1e-6);
        assert_eq!(params[1].1.grad().double_value(&[0]), 400.0);
        let none = vec![(
            "x".to_string(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        )];
        assert!(clip_grad_norm(&none, 1.0, &|_| false).is_none());
    }
}
