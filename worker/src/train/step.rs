//! One distributed SimCLR step: forward, NT-Xent against every rank's embeddings, exact
//! global-batch gradients, all-reduce, optimizer update.
//!
//! tch has no custom autograd functions, so the gather-with-gradient is done by hand
//! (ARCHITECTURE.md, "Data flow of one step", item 3):
//!
//! 1. every rank forwards its 2·b_r views → `z_local`;
//! 2. all-gather the detached `z_local` → `Z` (N = 2B rows), a fresh leaf with gradient;
//! 3. loss of the local anchors against all of `Z`, summed and divided by N, so that the sum
//!    of the ranks' losses is the single-process mean over all 2B anchors;
//! 4. backward to `dZ`; each rank's `dZ` holds the contributions of its own anchors to every
//!    row, so reduce-scatter(sum) gives each rank the full gradient of its own rows;
//! 5. backprop `dz_local` into the encoder, then all-reduce(sum) the parameter gradients.
//!    Summing (not averaging) is right because step 3 already scaled by the global N.
//!
//! A rank with no samples skips the forward but enters every collective with zero rows and
//! zero gradients, so no peer ever waits for it.

use crate::dist::{all_gather_counts, Collective};
use crate::model::SimClrModel;
use crate::objective::{nt_xent_anchor_losses, LocalAnchors};
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// Gradients are all-reduced in buckets of at most this many elements (16 MiB of f32): few
/// calls, and bounded extra memory for the flattened copy.
pub const GRAD_BUCKET_ELEMENTS: i64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The global-batch NT-Xent loss (mean over all 2B anchors), identical on every rank.
    pub loss: f64,
    /// B: samples in the step across all ranks.
    pub global_samples: i64,
}

/// One SimCLR step. `view1`/`view2` are this rank's `b × 3 × H × W` float images (b may be 0).
/// Gathers the per-rank counts first; use [`simclr_train_step_with_counts`] when the caller
/// has them already.
pub fn simclr_train_step(
    model: &SimClrModel,
    opt: &mut dyn Optimizer,
    view1: &Tensor,
    view2: &Tensor,
    temperature: f64,
    lr: f64,
    coll: &dyn Collective,
) -> Result<StepOutcome> {
    check_views(view1, view2, coll.rank())?;
    let counts = all_gather_counts(coll, view1.size()[0])
        .with_context(|| format!("rank {}: gathering batch sizes", coll.rank()))?;
    simclr_train_step_with_counts(model, opt, view1, view2, temperature, lr, coll, &counts)
}

/// [`simclr_train_step`] with every rank's local batch size already known (`counts[r]` = b_r,
/// identical on all ranks). If all counts are 0 nothing happens and the loss is 0.
#[allow(clippy::too_many_arguments)]
pub fn simclr_train_step_with_counts(
    model: &SimClrModel,
    opt: &mut dyn Optimizer,
    view1: &Tensor,
    view2: &Tensor,
    temperature: f64,
    lr: f64,
    coll: &dyn Collective,
    counts: &[i64],
) -> Result<StepOutcome> {
    let rank = coll.rank();
    check_views(view1, view2, rank)?;
    let b = view1.size()[0];
    let global_samples = checked_global_samples(counts, b, coll)?;
    if global_samples == 0 {
        // Every rank sees the same counts, so every rank skips the same collectives.
        return Ok(StepOutcome {
            loss: 0.0,
            global_samples: 0,
        });
    }
    let device = model.device();
    opt.zero_grad();
    let z_local = if b > 0 {
        let x = Tensor::cat(&[view1, view2], 0)
            .to_device(device)
            .to_kind(Kind::Float);
        model.forward_t(&x, true)
    } else {
        Tensor::zeros([0, model.embedding_dim()], (Kind::Float, device))
    };
    let (local_loss, d_local) =
        gathered_nt_xent_gradient(&z_local.detach(), counts, temperature, coll)?;
    ensure_grads_defined(model);
    if b > 0 {
        // d(sum(z · g))/dz = g: backprop a given output gradient without a custom function.
        (&z_local * d_local).sum(Kind::Float).backward();
    }
    let loss = finish_step(model, opt, &local_loss, lr, coll)?;
    Ok(StepOutcome {
        loss,
        global_samples,
    })
}

/// Checks that `counts` has one entry per rank and that this rank's is `local` (its samples
/// in this step), and returns the step's global sample count.
pub(crate) fn checked_global_samples(
    counts: &[i64],
    local: i64,
    coll: &dyn Collective,
) -> Result<i64> {
    let rank = coll.rank();
    if counts.len() != coll.world_size() || counts.get(rank) != Some(&local) {
        bail!(
            "rank {rank}: batch-size counts {counts:?} do not match world size {} and local \
             samples {local}",
            coll.world_size()
        );
    }
    Ok(counts.iter().sum())
}

/// The gathered-negatives core shared by the plain and the accumulated step. `z_local` holds
/// this rank's `2 b` embeddings (every view-1 row, then every view-2 row; `b = counts[rank]`).
/// All-gathers them, computes the NT-Xent of the local anchors against the global set divided
/// by the global anchor count (so the shares of all ranks sum to the global mean), and
/// reduce-scatters the gradient of the gathered tensor back to its owners. Returns this rank's
/// loss share and d(total loss)/d(z_local).
pub(crate) fn gathered_nt_xent_gradient(
    z_local: &Tensor,
    counts: &[i64],
    temperature: f64,
    coll: &dyn Collective,
) -> Result<(Tensor, Tensor)> {
    let rank = coll.rank();
    let b = counts[rank];
    let rows: Vec<i64> = counts.iter().map(|c| 2 * c).collect();
    let n_rows: i64 = rows.iter().sum();
    let offset: i64 = rows[..rank].iter().sum();
    let device = z_local.device();
    let gathered = coll
        .all_gather(&z_local.contiguous(), &rows)
        .with_context(|| format!("rank {rank}: all-gathering embeddings ({rows:?} rows)"))?
        .to_device(device)
        .set_requires_grad(true);
    let anchor_losses =
        nt_xent_anchor_losses(&gathered, LocalAnchors { offset, samples: b }, temperature);
    let local_loss = anchor_losses.sum(Kind::Float) / n_rows as f64;
    let d_gathered = if b > 0 {
        Tensor::run_backward(&[&local_loss], &[&gathered], false, false).remove(0)
    } else {
        gathered.zeros_like()
    };
    let d_local = coll
        .reduce_scatter_sum(&d_gathered.contiguous(), &rows)
        .with_context(|| format!("rank {rank}: reduce-scattering embedding gradients"))?
        .to_device(device);
    Ok((local_loss.detach(), d_local))
}

/// Sums the parameter gradients and the loss shares across ranks, then takes the optimizer
/// step. Returns the global loss.
pub(crate) fn finish_step(
    model: &SimClrModel,
    opt: &mut dyn Optimizer,
    local_loss: &Tensor,
    lr: f64,
    coll: &dyn Collective,
) -> Result<f64> {
    let rank = coll.rank();
    all_reduce_gradients(model, coll)
        .with_context(|| format!("rank {rank}: all-reducing parameter gradients"))?;
    let mut loss = Tensor::from_slice(&[local_loss.double_value(&[])]);
    coll.all_reduce_sum(&mut loss)
        .with_context(|| format!("rank {rank}: all-reducing the loss"))?;
    opt.step(lr);
    Ok(loss.double_value(&[0]))
}

pub(crate) fn check_views(view1: &Tensor, view2: &Tensor, rank: usize) -> Result<()> {
    let (s1, s2) = (view1.size(), view2.size());
    if s1 != s2 || s1.len() != 4 || s1[1] != 3 {
        bail!("rank {rank}: views must both be b×3×H×W, got {s1:?} and {s2:?}");
    }
    Ok(())
}

/// A rank without samples never runs a backward, so its parameters have no `.grad()` yet; it
/// must still contribute zeros of the right shape to the all-reduce.
pub(crate) fn ensure_grads_defined(model: &SimClrModel) {
    let params = model.named_parameters();
    if params.iter().all(|(_, p)| p.grad().defined()) {
        return;
    }
    let zero: Tensor = params.iter().map(|(_, p)| p.sum(Kind::Float) * 0.0).fold(
        Tensor::zeros([], (Kind::Float, model.device())),
        |acc, t| acc + t,
    );
    zero.backward();
}

/// Sums every parameter gradient across ranks, in name order, a bucket at a time.
pub(crate) fn all_reduce_gradients(model: &SimClrModel, coll: &dyn Collective) -> Result<()> {
    let grads: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.grad()))
        .collect();
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut elements = 0;
        // A single parameter larger than the bucket still goes alone in one bucket.
        while end < grads.len()
            && (end == start || elements + grads[end].1.numel() as i64 <= GRAD_BUCKET_ELEMENTS)
        {
            elements += grads[end].1.numel() as i64;
            end += 1;
        }
        let bucket = &grads[start..end];
        let flat: Vec<Tensor> = bucket.iter().map(|(_, g)| g.reshape([-1])).collect();
        let mut flat = Tensor::cat(&flat, 0);
        coll.all_reduce_sum(&mut flat).with_context(|| {
            format!("bucket {} ..= {}", bucket[0].0, bucket[bucket.len() - 1].0)
        })?;
        let flat = flat.to_device(model.device());
        let mut at = 0;
        for (_, g) in bucket {
            let n = g.numel() as i64;
            g.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(g));
            at += n;
        }
        start = end;
    }
    Ok(())
}
