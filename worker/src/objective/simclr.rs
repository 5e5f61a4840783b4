//! NT-Xent (SimCLR's normalised-temperature cross entropy) with negatives from a gathered batch.
//!
//! Layout of the gathered embeddings: rank r contributes `2·b_r` consecutive rows, first the
//! first view of its `b_r` samples, then their second view. Anchor row `i` of a block has its
//! positive at `(i + b_r) mod 2·b_r` of the same block; every other row of the whole gathered
//! matrix (except the anchor itself) is a negative.
//!
//! Per anchor a: `loss_a = logsumexp_{k≠a}(s_ak / τ) − s_ap / τ` with cosine similarities s,
//! evaluated with logsumexp so large `1/τ` does not overflow.

use super::gather::{block_layout, gather_rows, scatter_back};
use super::{StepClock, StepObjective};
use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::nn::l2_normalize;
use anyhow::Result;
use tch::{Kind, Tensor};

/// Where this rank's anchors sit in the gathered matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAnchors {
    /// First gathered row that belongs to this rank.
    pub offset: i64,
    /// Local samples b (the block has 2b rows: view 1 then view 2).
    pub samples: i64,
}

/// Per-anchor NT-Xent losses (2b values) of the local block of `z_all` (N × d, all ranks'
/// embeddings, not yet normalised) against all N rows. Differentiable in `z_all`.
pub fn nt_xent_anchor_losses(z_all: &Tensor, anchors: LocalAnchors, temperature: f64) -> Tensor {
    let n = z_all.size()[0];
    let rows = 2 * anchors.samples;
    let device = z_all.device();
    let zn = l2_normalize(z_all);
    let logits = zn.narrow(0, anchors.offset, rows).matmul(&zn.tr()) / temperature;

    let local = Tensor::arange(rows, (Kind::Int64, device));
    let self_mask = (&local + anchors.offset)
        .unsqueeze(1)
        .eq_tensor(&Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0));
    let logits = logits.masked_fill(&self_mask, f64::NEG_INFINITY);

    let positive =
        ((&local + anchors.samples).remainder(rows.max(1)) + anchors.offset).unsqueeze(1);
    let positive_logit = logits.gather(1, &positive, false).squeeze_dim(1);
    logits.logsumexp([1], false) - positive_logit
}

/// Single-process NT-Xent: mean over the 2b anchors of two views (b × d each), the value that
/// SimCLR implementations (and lightly's `NTXentLoss` at world size 1) report.
pub fn nt_xent_loss(view1: &Tensor, view2: &Tensor, temperature: f64) -> Tensor {
    let z = Tensor::cat(&[view1, view2], 0);
    let b = view1.size()[0];
    nt_xent_anchor_losses(
        &z,
        LocalAnchors {
            offset: 0,
            samples: b,
        },
        temperature,
    )
    .mean(Kind::Float)
}

// ---------------------------------------------------------------------------------------------
// The distributed step form.

/// SimCLR's NT-Xent with negatives from every rank.
pub struct NtXent {
    pub temperature: f64,
}

impl StepObjective for NtXent {
    fn loss_and_grad(
        &mut self,
        _model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        _clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        gathered_nt_xent_gradient(z_local, counts, self.temperature, coll)
    }
}

/// All-gathers `z_local`, computes the NT-Xent of the local anchors against the global set
/// divided by the global anchor count (so the shares of all ranks sum to the global mean), and
/// reduce-scatters the gradient of the gathered tensor back to its owners: each rank's
/// gathered gradient holds its own anchors' contributions to every row.
pub(crate) fn gathered_nt_xent_gradient(
    z_local: &Tensor,
    counts: &[i64],
    temperature: f64,
    coll: &dyn Collective,
) -> Result<(Tensor, Tensor)> {
    let rank = coll.rank();
    let b = counts[rank];
    let (rows, offset) = block_layout(counts, rank);
    let n_rows: i64 = rows.iter().sum();
    let gathered = gather_rows(z_local, &rows, coll)?;
    let anchor_losses =
        nt_xent_anchor_losses(&gathered, LocalAnchors { offset, samples: b }, temperature);
    let local_loss = anchor_losses.sum(Kind::Float) / n_rows as f64;
    let d_gathered = if b > 0 {
        Tensor::run_backward(&[&local_loss], &[&gathered], false, false).remove(0)
    } else {
        gathered.zeros_like()
    };
    let d_local = scatter_back(d_gathered, &rows, coll)?;
    Ok((local_loss.detach(), d_local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Textbook NT-Xent in f64 with explicit loops (no logsumexp trick, no masking).
    fn reference(z: &[Vec<f64>], blocks: &[(usize, usize)], tau: f64) -> Vec<f64> {
        let unit: Vec<Vec<f64>> = z
            .iter()
            .map(|r| {
                let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                r.iter().map(|x| x / n).collect()
            })
            .collect();
        let sim = |i: usize, j: usize| -> f64 {
            unit[i]
                .iter()
                .zip(&unit[j])
                .map(|(a, b)| a * b)
                .sum::<f64>()
                / tau
        };
        let mut out = Vec::new();
        for &(offset, b) in blocks {
            for i in 0..2 * b {
                let a = offset + i;
                let p = offset + if i < b { i + b } else { i - b };
                let denom: f64 = (0..z.len())
                    .filter(|&k| k != a)
                    .map(|k| sim(a, k).exp())
                    .sum();
                out.push(-(sim(a, p).exp() / denom).ln());
            }
        }
        out
    }

    fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
        let t = t.to_kind(Kind::Double);
        Vec::<Vec<f64>>::try_from(&t).unwrap()
    }

    #[test]
    fn world_one_matches_reference() {
        tch::manual_seed(3);
        let (b, d, tau) = (5, 7, 0.3);
        let z1 = Tensor::randn([b, d], (Kind::Float, Device::Cpu));
        let z2 = Tensor::randn([b, d], (Kind::Float, Device::Cpu));
        let got = nt_xent_loss(&z1, &z2, tau).double_value(&[]);
        let rows = to_rows(&Tensor::cat(&[&z1, &z2], 0));
        let per = reference(&rows, &[(0, b as usize)], tau);
        let want = per.iter().sum::<f64>() / per.len() as f64;
        assert!((got - want).abs() < 1e-5, "got {got}, reference {want}");
    }

    #[test]
    fn gathered_blocks_match_reference_per_anchor() {
        // Three ranks with uneven batches (including an empty one) gathered into 2·(3+0+2) rows.
        tch::manual_seed(4);
        let counts = [3i64, 0, 2];
        let z = Tensor::randn([10, 6], (Kind::Float, Device::Cpu));
        let rows = to_rows(&z);
        let mut offset = 0;
        let mut total = 0.0;
        for &b in &counts {
            let got = nt_xent_anchor_losses(&z, LocalAnchors { offset, samples: b }, 0.5);
            assert_eq!(got.size(), vec![2 * b]);
            let want = reference(&rows, &[(offset as usize, b as usize)], 0.5);
            for (g, w) in to_rows(&got.unsqueeze(1)).iter().zip(&want) {
                assert!(
                    (g[0] - w).abs() < 1e-5,
                    "rank block at {offset}: {} vs {w}",
                    g[0]
                );
            }
            total += got.sum(Kind::Double).double_value(&[]);
            offset += 2 * b;
        }
        assert!(total.is_finite() && total > 0.0);
    }

    #[test]
    fn low_temperature_stays_finite() {
        // exp(1/0.001) overflows f32; the logsumexp form must not.
        let z1 = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let z2 = Tensor::from_slice(&[1.0f32, 0.1, 0.1, 1.0]).view([2, 2]);
        let loss = nt_xent_loss(&z1, &z2, 0.001).double_value(&[]);
        assert!(loss.is_finite(), "loss {loss}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        tch::manual_seed(5);
        let z = Tensor::randn([6, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let anchors = LocalAnchors {
            offset: 2,
            samples: 1,
        };
        let loss = nt_xent_anchor_losses(&z, anchors, 0.4).sum(Kind::Double);
        let grad = Tensor::run_backward(&[&loss], &[&z], false, false).remove(0);
        let eps = 1e-6;
        for (i, j) in [(0, 0), (2, 1), (3, 3), (5, 2)] {
            let f = |delta: f64| {
                let zp = z.detach().copy();
                let _ = zp.get(i).get(j).g_add_scalar_(delta);
                nt_xent_anchor_losses(&zp, anchors, 0.4)
                    .sum(Kind::Double)
                    .double_value(&[])
            };
            let numeric = (f(eps) - f(-eps)) / (2.0 * eps);
            let analytic = grad.double_value(&[i, j]);
            assert!(
                (numeric - analytic).abs() < 1e-6,
                "d/dz[{i}][{j}]: {analytic} vs {numeric}"
            );
        }
    }
}
