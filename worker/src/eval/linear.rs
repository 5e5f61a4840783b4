//! Linear probe: multinomial logistic regression with an L2 penalty on frozen features,
//! minimising scikit-learn's objective for `LogisticRegression(C)` (cross-entropy averaged
//! over rows plus `‖W‖² / (2·C·n)`, the bias unpenalised) with L-BFGS, as its default solver
//! does. Loss and gradient are computed in float64 over row chunks, so the probe needs memory
//! for one chunk and the `dim × classes` weights, whatever the bank's size.

use std::collections::VecDeque;

use tch::{Device, Kind, Tensor};

use super::bank::{Bank, EvalError, Result};
use super::{top_k_accuracy, TopK, DEFAULT_CHUNK_ROWS};

/// L-BFGS curvature pairs kept (scipy's default `maxcor`).
const HISTORY: usize = 10;
/// Armijo sufficient-decrease constant of the backtracking line search.
const ARMIJO: f64 = 1e-4;
/// Halvings tried before a line search gives up.
const MAX_HALVINGS: usize = 40;

#[derive(Clone, Copy, Debug)]
pub struct LinearOptions {
    /// Inverse regularisation strength, scikit-learn's `C`.
    pub c: f64,
    pub max_iter: usize,
    /// Stop when the largest gradient entry is at most this (scikit-learn's `tol`).
    pub tolerance: f64,
}

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions {
            c: 1.0,
            max_iter: 1000,
            tolerance: 1e-6,
        }
    }
}

/// How a fit ended.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FitReport {
    pub iterations: usize,
    /// The final objective (mean cross-entropy plus penalty).
    pub loss: f64,
    /// Whether the gradient tolerance was reached before `max_iter` or a stalled line search.
    pub converged: bool,
}

/// A fitted probe: `logits = x · weight + bias`.
pub struct LinearProbe {
    /// `(dim, classes)`, float32.
    pub weight: Tensor,
    /// `(classes,)`, float32.
    pub bias: Tensor,
}

/// The features, labels and shapes the objective is evaluated on.
struct Problem<'a> {
    x: &'a Tensor,
    y: &'a Tensor,
    n: i64,
    dim: i64,
    classes: i64,
    /// The penalty's coefficient: `1 / (C · n)`.
    l2: f64,
}

impl Problem<'_> {
    /// Objective and gradient at the flat parameters `theta` (`dim·classes` weights, then
    /// `classes` biases), float64 on the features' device.
    fn value_and_grad(&self, theta: &Tensor) -> (f64, Tensor) {
        let (d, c) = (self.dim, self.classes);
        let w = theta.narrow(0, 0, d * c).view([d, c]);
        let b = theta.narrow(0, d * c, c);
        let mut loss = 0.0;
        let mut gw = Tensor::zeros([d, c], (Kind::Double, theta.device()));
        let mut gb = Tensor::zeros([c], (Kind::Double, theta.device()));
        let mut start = 0;
        while start < self.n {
            let len = DEFAULT_CHUNK_ROWS.min(self.n - start);
            // float64 per chunk: the gradient must stay accurate down to the tolerance.
            let x = self.x.narrow(0, start, len).to_kind(Kind::Double);
            let y = self.y.narrow(0, start, len);
            let logits = x.matmul(&w) + &b;
            let logp = logits.log_softmax(1, Kind::Double);
            loss -= logp
                .gather(1, &y.unsqueeze(1), false)
                .sum(Kind::Double)
                .double_value(&[]);
            // d(sum CE)/d logits = softmax − one-hot.
            let resid = logp.exp().scatter_add(
                1,
                &y.unsqueeze(1),
                &Tensor::full([len, 1], -1.0, (Kind::Double, theta.device())),
            );
            gw += x.tr().matmul(&resid);
            gb += resid.sum_dim_intlist(0, false, Kind::Double);
            start += len;
        }
        let n = self.n as f64;
        let penalty = 0.5 * self.l2 * (&w * &w).sum(Kind::Double).double_value(&[]);
        let gw = gw / n + &w * self.l2;
        let gb = gb / n;
        (loss / n + penalty, Tensor::cat(&[gw.flatten(0, -1), gb], 0))
    }
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.dot(b).double_value(&[])
}

impl LinearProbe {
    /// Fits on the labelled `train` bank. The class count is one more than its largest label.
    pub fn fit(train: &Bank, options: LinearOptions) -> Result<(LinearProbe, FitReport)> {
        if !options.c.is_finite() || options.c <= 0.0 || options.max_iter == 0 {
            return Err(EvalError::Invalid(format!(
                "linear probe: C = {} must be positive and max_iter = {} at least 1",
                options.c, options.max_iter
            )));
        }
        let y = train.labels()?;
        let classes = train.classes()?;
        if classes < 2 {
            return Err(EvalError::Invalid(format!(
                "linear probe: {} has only one class",
                train.name
            )));
        }
        let p = Problem {
            x: &train.embeddings,
            y,
            n: train.rows(),
            dim: train.dim(),
            classes,
            l2: 1.0 / (options.c * train.rows() as f64),
        };
        let device = train.device();
        let (theta, report) = lbfgs(&p, device, options);
        let (d, c) = (p.dim, p.classes);
        Ok((
            LinearProbe {
                weight: theta.narrow(0, 0, d * c).view([d, c]).to_kind(Kind::Float),
                bias: theta.narrow(0, d * c, c).to_kind(Kind::Float),
            },
            report,
        ))
    }

    /// Top-1/top-5 on the labelled `test` bank.
    pub fn evaluate(&self, test: &Bank) -> Result<TopK> {
        let (dim, classes) = (self.weight.size()[0], self.weight.size()[1]);
        if test.dim() != dim {
            return Err(EvalError::DimMismatch {
                bank: test.name.clone(),
                got: test.dim(),
                other: "the linear probe".into(),
                want: dim,
            });
        }
        test.labels_within(classes)?;
        let labels = test.labels()?;
        let (w, b) = (
            self.weight.to_device(test.device()),
            self.bias.to_device(test.device()),
        );
        Ok(top_k_accuracy(
            test.rows(),
            DEFAULT_CHUNK_ROWS,
            labels,
            5,
            |start, len| (test.embeddings.narrow(0, start, len).matmul(&w) + &b).argsort(1, true),
        ))
    }
}

/// L-BFGS (two-loop recursion, Armijo backtracking) from zero parameters.
fn lbfgs(p: &Problem, device: Device, options: LinearOptions) -> (Tensor, FitReport) {
    let size = p.dim * p.classes + p.classes;
    let mut theta = Tensor::zeros([size], (Kind::Double, device));
    let (mut f, mut g) = p.value_and_grad(&theta);
    let mut history: VecDeque<(Tensor, Tensor, f64)> = VecDeque::new();
    let mut report = FitReport {
        iterations: 0,
        loss: f,
        converged: false,
    };
    for it in 0..options.max_iter {
        if g.abs().max().double_value(&[]) <= options.tolerance {
            report.converged = true;
            break;
        }
        // Two-loop recursion: d = −H·g.
        let mut q = g.copy();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q -= y * a;
            alphas.push(a);
        }
        if let Some((s, y, _)) = history.back() {
            q *= dot(s, y) / dot(y, y);
        }
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q += s * (a - b);
        }
        let mut d = -q;
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (rounding): restart from steepest descent.
            history.clear();
            d = -&g;
            slope = dot(&g, &d);
        }
        let mut step = if history.is_empty() {
            1.0 / g.norm().double_value(&[]).max(1.0)
        } else {
            1.0
        };
        let mut accepted = None;
        for _ in 0..MAX_HALVINGS {
            let candidate = &theta + &d * step;
            let (fc, gc) = p.value_and_grad(&candidate);
            if fc <= f + ARMIJO * step * slope {
                accepted = Some((candidate, fc, gc));
                break;
            }
            step *= 0.5;
        }
        let Some((next, fn_, gn)) = accepted else {
            // No decrease is possible at this precision: the minimum is reached.
            report.converged = true;
            break;
        };
        let s = &next - &theta;
        let y = &gn - &g;
        let sy = dot(&s, &y);
        if sy > 1e-12 {
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        let flat = (f - fn_).abs() <= 64.0 * f64::EPSILON * f.abs().max(fn_.abs()).max(1.0);
        theta = next;
        f = fn_;
        g = gn;
        report.iterations = it + 1;
        report.loss = f;
        if flat {
            report.converged = true;
            break;
        }
    }
    (theta, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the optimum the gradient vanishes: checked by finite differences of the objective,
    /// and the analytic gradient agrees with them at a random point.
    #[test]
    fn gradient_matches_finite_differences_and_vanishes_at_the_fit() {
        tch::manual_seed(11);
        let cpu = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([300, 4], cpu);
        // Linearly separable classes: which of the first three features is largest.
        let y = x.narrow(1, 0, 3).argmax(1, false);
        let p = Problem {
            x: &x,
            y: &y,
            n: 300,
            dim: 4,
            classes: 3,
            l2: 1.0 / 300.0,
        };
        let theta = Tensor::randn([15], (Kind::Double, Device::Cpu)) * 0.3;
        let (_, g) = p.value_and_grad(&theta);
        for i in [0i64, 5, 12, 14] {
            let e = Tensor::zeros([15], (Kind::Double, Device::Cpu));
            let _ = e.get(i).fill_(1e-4);
            let (fp, _) = p.value_and_grad(&(&theta + &e));
            let (fm, _) = p.value_and_grad(&(&theta - &e));
            let numeric = (fp - fm) / 2e-4;
            let analytic = g.double_value(&[i]);
            assert!(
                (numeric - analytic).abs() < 1e-4,
                "{i}: {numeric} vs {analytic}"
            );
        }
        let bank = Bank::new("train", x.copy(), Some(y.copy())).unwrap();
        let (probe, report) = LinearProbe::fit(&bank, LinearOptions::default()).unwrap();
        assert!(report.converged, "{report:?}");
        let theta = Tensor::cat(
            &[probe.weight.flatten(0, -1), probe.bias.shallow_clone()],
            0,
        )
        .to_kind(Kind::Double);
        let (_, g) = p.value_and_grad(&theta);
        assert!(g.abs().max().double_value(&[]) < 1e-4);
        // Separable labels: the probe classifies its own train set well.
        assert!(probe.evaluate(&bank).unwrap().top1 > 0.9);
    }
}
