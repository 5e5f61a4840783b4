//! One SimCLR step over K micro-batches per rank with embedding caching (ARCHITECTURE.md,
//! "Data flow of one step", item 4): the loss sees every micro-batch of every rank, so the
//! negatives are micro_batch × K × world_size, while activation memory stays that of one
//! micro-batch.
//!
//! 1. forward every micro-batch without autograd (train mode) and keep only its embeddings;
//!    they form `z_local` in the row layout of one plain step over the concatenated batch:
//!    view 1 of micro-batches 0..K, then view 2 of micro-batches 0..K;
//! 2. gather counts (once, by the caller or [`simclr_accumulated_step`]) and embeddings once;
//! 3. loss of the local anchors against every rank's rows, scaled by the global anchor count,
//!    backward to the gathered embeddings, reduce-scatter → the gradient of this rank's rows;
//! 4. forward each micro-batch again, now with autograd, and backprop its slice of that
//!    gradient; parameter gradients accumulate across micro-batches;
//! 5. one bucketed all-reduce, one optimizer step.
//!
//! The result equals [`simclr_train_step`](super::step::simclr_train_step) on the
//! concatenated batch as long as the forward pass is deterministic and batch-independent.
//! BatchNorm is neither across micro-batches: each micro-batch is normalised with its own
//! statistics, and because every micro-batch is forwarded twice, the running mean/variance
//! take two momentum updates per micro-batch (2K per step instead of 1). Use
//! `model.norm = "group"` where exact equivalence matters.

use super::step::{
    check_views, checked_global_samples, ensure_grads_defined, finish_step,
    gathered_nt_xent_gradient, StepOutcome,
};
use crate::dist::{all_gather_counts, Collective};
use crate::model::SimClrModel;
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// One step over this rank's `micro_batches` (`(view1, view2)` pairs of `b_k × 3 × H × W`
/// images; sizes may differ, a pair may be empty, the slice may be empty). Gathers every
/// rank's total sample count first; use [`simclr_accumulated_step_with_counts`] when the
/// caller has them already.
pub fn simclr_accumulated_step(
    model: &SimClrModel,
    opt: &mut dyn Optimizer,
    micro_batches: &[(Tensor, Tensor)],
    temperature: f64,
    lr: f64,
    coll: &dyn Collective,
) -> Result<StepOutcome> {
    let local: i64 = micro_batch_sizes(micro_batches, coll.rank())?.iter().sum();
    let counts = all_gather_counts(coll, local)
        .with_context(|| format!("rank {}: gathering batch sizes", coll.rank()))?;
    simclr_accumulated_step_with_counts(model, opt, micro_batches, temperature, lr, coll, &counts)
}

/// [`simclr_accumulated_step`] with `counts[r]` = rank r's samples summed over all its
/// micro-batches, identical on every rank. If all counts are 0 nothing happens and the loss
/// is 0.
#[allow(clippy::too_many_arguments)]
pub fn simclr_accumulated_step_with_counts(
    model: &SimClrModel,
    opt: &mut dyn Optimizer,
    micro_batches: &[(Tensor, Tensor)],
    temperature: f64,
    lr: f64,
    coll: &dyn Collective,
    counts: &[i64],
) -> Result<StepOutcome> {
    let rank = coll.rank();
    let sizes = micro_batch_sizes(micro_batches, rank)?;
    let b: i64 = sizes.iter().sum();
    let global_samples = checked_global_samples(counts, b, coll)
        .with_context(|| format!("micro-batches of sizes {sizes:?}"))?;
    if global_samples == 0 {
        // Every rank sees the same counts, so every rank skips the same collectives.
        return Ok(StepOutcome {
            loss: 0.0,
            global_samples: 0,
        });
    }
    let device = model.device();
    let dim = model.embedding_dim();

    opt.zero_grad();
    // Pass 1: embeddings only, no graph kept, so memory does not grow with K.
    let z_local = tch::no_grad(|| {
        let mut first = Vec::with_capacity(micro_batches.len());
        let mut second = Vec::with_capacity(micro_batches.len());
        for ((v1, v2), &bk) in micro_batches.iter().zip(&sizes) {
            if bk == 0 {
                continue;
            }
            let z = model.forward_t(&views_input(v1, v2, device), true);
            first.push(z.narrow(0, 0, bk));
            second.push(z.narrow(0, bk, bk));
        }
        if first.is_empty() {
            Tensor::zeros([0, dim], (Kind::Float, device))
        } else {
            first.extend(second);
            Tensor::cat(&first, 0)
        }
    });

    let (local_loss, d_local) = gathered_nt_xent_gradient(&z_local, counts, temperature, coll)?;

    // Pass 2: re-forward each micro-batch with a graph and backprop its rows of d_local;
    // `.backward()` adds into the parameters' `.grad()`, which is the accumulation.
    ensure_grads_defined(model);
    let mut at = 0;
    for (k, ((v1, v2), &bk)) in micro_batches.iter().zip(&sizes).enumerate() {
        if bk == 0 {
            continue;
        }
        let g = Tensor::cat(
            &[d_local.narrow(0, at, bk), d_local.narrow(0, b + at, bk)],
            0,
        );
        let z = model.forward_t(&views_input(v1, v2, device), true);
        if z.size() != g.size() {
            bail!(
                "rank {rank}: micro-batch {k} re-forward gave embeddings {:?}, expected {:?}",
                z.size(),
                g.size()
            );
        }
        // d(sum(z · g))/dz = g: backprop a given output gradient without a custom function.
        (&z * g).sum(Kind::Float).backward();
        at += bk;
    }

    let loss = finish_step(model, opt, &local_loss, lr, coll)?;
    Ok(StepOutcome {
        loss,
        global_samples,
    })
}

/// Validates every micro-batch and returns their sample counts.
fn micro_batch_sizes(micro_batches: &[(Tensor, Tensor)], rank: usize) -> Result<Vec<i64>> {
    micro_batches
        .iter()
        .enumerate()
        .map(|(k, (v1, v2))| {
            check_views(v1, v2, rank).with_context(|| format!("micro-batch {k}"))?;
            Ok(v1.size()[0])
        })
        .collect()
}

fn views_input(view1: &Tensor, view2: &Tensor, device: tch::Device) -> Tensor {
    Tensor::cat(&[view1, view2], 0)
        .to_device(device)
        .to_kind(Kind::Float)
}
