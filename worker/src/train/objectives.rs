//! The objectives a job can train, as seen by one distributed step ([`super::step`]): each
//! turns this rank's detached embeddings into its share of the global loss and the gradient
//! of the global loss with respect to those embeddings.
//!
//! - [`NtXent`] (SimCLR): negatives are every other embedding of every rank; the loss couples
//!   samples across ranks, so the gathered gradient is reduce-scattered back to its owners.
//! - [`Moco`] (MoCo v2, symmetric): each view's query against the momentum encoder's key of
//!   the other view, with the queue as negatives; keys and queue carry no gradient, so each
//!   query's loss is its own.
//! - [`Swav`]: codes from Sinkhorn–Knopp over the global batch (sums all-reduced), each view
//!   predicting the other's codes through the shared prototypes.
//! - [`Clip`]: images against the captions of every rank (open_clip's `ClipLoss` with
//!   `gather_with_grad`, written as local pairs against the gathered matrices), the gathered
//!   gradient reduce-scattered back as for SimCLR, and the logit scale's gradient summed.

use super::step::StepClock;
use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::objective::clip::{clip_local_loss, LocalPairs};
use crate::objective::moco::{moco_query_losses, momentum_at};
use crate::objective::swav::{prototypes_frozen, swav_loss_with_queue, FeatureQueue};
use crate::objective::{l2_normalize, nt_xent_anchor_losses, LocalAnchors};
use anyhow::{bail, Context, Result};
use contrail_common::config::NormKind;
use contrail_common::JobConfig;
use tch::{Device, Kind, Tensor};

/// What one objective does inside a step. Every rank calls every method in the same order;
/// `counts[r]` is rank r's sample count in the step (identical everywhere) and `z_local` holds
/// this rank's `2 b` embeddings, view 1 of every sample first, then view 2.
pub trait StepObjective {
    /// Before any forward pass, with the step's micro-batches (MoCo computes keys here).
    fn prepare(
        &mut self,
        _model: &ContrastiveModel,
        _micro_batches: &[(Tensor, Tensor)],
        _counts: &[i64],
        _clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        Ok(())
    }

    /// This rank's share of the global loss (the shares of all ranks sum to it) and
    /// d(global loss)/d(z_local). May add gradients to head parameters of the model.
    fn loss_and_grad(
        &mut self,
        model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)>;

    /// Whether the optimizer leaves parameter `name` alone in this step.
    fn frozen(&self, _name: &str, _clock: StepClock) -> bool {
        false
    }

    /// After the optimizer step.
    fn after_update(
        &mut self,
        _model: &ContrastiveModel,
        _clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        Ok(())
    }
}

/// The objective `objective.kind` names, configured from the job.
pub fn build_objective(cfg: &JobConfig) -> Result<Box<dyn StepObjective>> {
    let o = &cfg.objective;
    Ok(match o.kind.as_str() {
        "simclr" => Box::new(NtXent {
            temperature: o.temperature,
        }),
        "moco" => Box::new(Moco::new(
            o.temperature,
            o.moco_momentum,
            o.moco_shuffle_bn && cfg.model.norm == NormKind::Batch,
            cfg.train.micro_batch as i64,
            cfg.data.image_size as i64,
            cfg.train.seed,
        )),
        "swav" => Box::new(Swav::new(
            o.temperature,
            o.swav_epsilon,
            o.swav_sinkhorn_iterations as usize,
            o.swav_freeze_prototypes_steps,
            o.swav_queue_size as i64,
        )),
        "clip" => Box::new(Clip),
        other => bail!("objective.kind \"{other}\" is not a training objective"),
    })
}

/// Row offset of this rank's block and the block sizes (2 rows per sample).
fn block_layout(counts: &[i64], rank: usize) -> (Vec<i64>, i64) {
    let rows: Vec<i64> = counts.iter().map(|c| 2 * c).collect();
    let offset = rows[..rank].iter().sum();
    (rows, offset)
}

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

/// Every rank's embeddings (`rows[r]` from rank r), as a fresh leaf that records gradients. A
/// single rank has nothing to gather.
fn gather_rows(z_local: &Tensor, rows: &[i64], coll: &dyn Collective) -> Result<Tensor> {
    let gathered = if coll.world_size() == 1 {
        z_local.detach().copy()
    } else {
        coll.all_gather(&z_local.contiguous(), rows)
            .with_context(|| {
                format!(
                    "rank {}: all-gathering embeddings ({rows:?} rows)",
                    coll.rank()
                )
            })?
            .to_device(z_local.device())
    };
    Ok(gathered.set_requires_grad(true))
}

/// This rank's rows of the sum over ranks of `d_gathered`: every rank's gradient holds its own
/// anchors' contributions to every row, so the sum is the full gradient of each row.
fn scatter_back(d_gathered: Tensor, rows: &[i64], coll: &dyn Collective) -> Result<Tensor> {
    if coll.world_size() == 1 {
        return Ok(d_gathered);
    }
    let device = d_gathered.device();
    Ok(coll
        .reduce_scatter_sum(&d_gathered.contiguous(), rows)
        .with_context(|| {
            format!(
                "rank {}: reduce-scattering embedding gradients",
                coll.rank()
            )
        })?
        .to_device(device))
}

/// CLIP's symmetric image–text loss over every rank's pairs. `z_local` holds this rank's image
/// embeddings, then its caption embeddings.
pub struct Clip;

impl StepObjective for Clip {
    fn loss_and_grad(
        &mut self,
        model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        _clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        let rank = coll.rank();
        let logit_scale = model
            .logit_scale()
            .context("objective \"clip\" needs a CLIP model (text tower and logit scale)")?;
        let (rows, _) = block_layout(counts, rank);
        let device = z_local.device();
        let gathered = gather_rows(z_local, &rows, coll)?;
        let (mut images, mut texts) = (Vec::new(), Vec::new());
        let mut start = 0;
        for &c in counts {
            images.extend(start..start + c);
            texts.extend(start + c..start + 2 * c);
            start += 2 * c;
        }
        let pick =
            |rows: &[i64]| gathered.index_select(0, &Tensor::from_slice(rows).to_device(device));
        let pairs = LocalPairs {
            offset: counts[..rank].iter().sum(),
            count: counts[rank],
        };
        let loss = clip_local_loss(&pick(&images), &pick(&texts), logit_scale, pairs)?;
        // Fills the gathered rows' gradient and adds this rank's share to the logit scale's.
        loss.backward();
        let grad = gathered.grad();
        let d_gathered = if grad.defined() {
            grad
        } else {
            gathered.zeros_like()
        };
        Ok((loss.detach(), scatter_back(d_gathered, &rows, coll)?))
    }

    fn after_update(
        &mut self,
        model: &ContrastiveModel,
        _clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        model.clamp_logit_scale();
        Ok(())
    }
}

/// A permutation of `0..n` that every rank derives alike from (seed, step): SplitMix64 driving
/// a Fisher–Yates shuffle.
fn shared_permutation(n: i64, seed: u64, step: u64) -> Vec<i64> {
    let mut rng = contrail_common::shards::SplitMix64::new(
        seed ^ 0x6d6f_636f_5f62_6e00 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut p: Vec<i64> = (0..n).collect();
    for i in (1..p.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// MoCo v2 in its symmetric form (solo-learn's MoCo v2+): query(view 1) against key(view 2)
/// and query(view 2) against key(view 1), negatives from a queue that every step extends with
/// the keys of both views of every rank.
pub struct Moco {
    temperature: f64,
    base_momentum: f64,
    shuffle_bn: bool,
    /// Rows per key-encoder forward (BatchNorm statistics come from this many images).
    chunk_rows: i64,
    image_size: i64,
    seed: u64,
    /// This step's keys of every rank (view 1 of every sample, then view 2), this rank's rows
    /// in its embedding layout, and the queue as it was before the step.
    keys_global: Tensor,
    keys_local: Tensor,
    queue: Tensor,
}

impl Moco {
    pub fn new(
        temperature: f64,
        base_momentum: f64,
        shuffle_bn: bool,
        micro_batch: i64,
        image_size: i64,
        seed: u64,
    ) -> Self {
        let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        Self {
            temperature,
            base_momentum,
            shuffle_bn,
            chunk_rows: (2 * micro_batch).max(1),
            image_size,
            seed,
            keys_global: empty.shallow_clone(),
            keys_local: empty.shallow_clone(),
            queue: empty,
        }
    }

    fn keys_in_chunks(&self, model: &ContrastiveModel, images: &Tensor) -> Result<Tensor> {
        let branch = model
            .momentum()
            .context("MoCo needs a model with a momentum branch")?;
        let n = images.size()[0];
        let mut out = Vec::new();
        let mut at = 0;
        while at < n {
            let take = self.chunk_rows.min(n - at);
            out.push(branch.keys(&images.narrow(0, at, take)));
            at += take;
        }
        Ok(if out.is_empty() {
            Tensor::zeros([0, model.embedding_dim()], (Kind::Float, model.device()))
        } else {
            Tensor::cat(&out, 0)
        })
    }
}

impl StepObjective for Moco {
    fn prepare(
        &mut self,
        model: &ContrastiveModel,
        micro_batches: &[(Tensor, Tensor)],
        counts: &[i64],
        clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<()> {
        let rank = coll.rank();
        let branch = model
            .momentum()
            .context("objective \"moco\" needs a model built with a momentum branch")?;
        let device = model.device();
        let (rows, offset) = block_layout(counts, rank);
        let n: i64 = rows.iter().sum();
        let s = self.image_size;
        // This rank's images in the embedding row layout: view 1 of every sample, then view 2.
        let present: Vec<&(Tensor, Tensor)> = micro_batches
            .iter()
            .filter(|(v, _)| v.size()[0] > 0)
            .collect();
        let local = if present.is_empty() {
            Tensor::zeros([0, 3, s, s], (Kind::Float, device))
        } else {
            let mut parts: Vec<Tensor> = present.iter().map(|(v1, _)| v1.shallow_clone()).collect();
            parts.extend(present.iter().map(|(_, v2)| v2.shallow_clone()));
            Tensor::cat(&parts, 0)
                .to_device(device)
                .to_kind(Kind::Float)
        };
        let keys_global = if self.shuffle_bn {
            // MoCo's shuffle BN: compute keys on a shared random reassignment of every rank's
            // images, then put them back, so no key shares BatchNorm statistics with its query.
            let all = coll
                .all_gather(&local.contiguous(), &rows)
                .with_context(|| format!("rank {rank}: all-gathering key images for shuffle BN"))?
                .to_device(device);
            let perm = shared_permutation(n, self.seed, clock.step);
            let perm = Tensor::from_slice(&perm).to_device(device);
            let mine = all.index_select(0, &perm.narrow(0, offset, rows[rank]));
            let keys_mine = self.keys_in_chunks(model, &mine)?;
            let shuffled = coll
                .all_gather(&keys_mine.contiguous(), &rows)
                .with_context(|| format!("rank {rank}: all-gathering shuffled keys"))?
                .to_device(device);
            // shuffled[i] is the key of global row perm[i].
            shuffled.zeros_like().index_copy(0, &perm, &shuffled)
        } else {
            let keys_mine = self.keys_in_chunks(model, &local)?;
            coll.all_gather(&keys_mine.contiguous(), &rows)
                .with_context(|| format!("rank {rank}: all-gathering keys"))?
                .to_device(device)
        };
        self.keys_local = keys_global.narrow(0, offset, rows[rank]);
        // Enqueue in an order that does not depend on how the batch was split: view 1 of every
        // sample in rank order, then view 2, as one rank holding the whole batch would.
        let mut view_major: Vec<i64> = Vec::with_capacity(n as usize);
        for view in 0..2 {
            let mut start = 0;
            for &c in counts {
                view_major.extend(start + view * c..start + (view + 1) * c);
                start += 2 * c;
            }
        }
        self.keys_global =
            keys_global.index_select(0, &Tensor::from_slice(&view_major).to_device(device));
        self.queue = branch.queue();
        Ok(())
    }

    fn loss_and_grad(
        &mut self,
        _model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        _clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        let b = counts[coll.rank()];
        let global_rows: i64 = 2 * counts.iter().sum::<i64>();
        if self.keys_local.size() != z_local.size() {
            bail!(
                "rank {}: MoCo keys {:?} do not match the embeddings {:?} (prepare not run?)",
                coll.rank(),
                self.keys_local.size(),
                z_local.size()
            );
        }
        if b == 0 {
            return Ok((
                Tensor::zeros([], (Kind::Float, z_local.device())),
                z_local.zeros_like(),
            ));
        }
        let q = z_local.detach().set_requires_grad(true);
        // Query row i (view 1 of sample i) pairs with the key of view 2 of sample i, and back.
        let positives = Tensor::cat(
            &[
                self.keys_local.narrow(0, b, b),
                self.keys_local.narrow(0, 0, b),
            ],
            0,
        );
        let losses = moco_query_losses(&q, &positives, &self.queue, self.temperature);
        let local_loss = losses.sum(Kind::Float) / global_rows as f64;
        let d_local = Tensor::run_backward(&[&local_loss], &[&q], false, false).remove(0);
        Ok((local_loss.detach(), d_local))
    }

    fn after_update(
        &mut self,
        model: &ContrastiveModel,
        clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        let branch = model.momentum().context("MoCo needs a momentum branch")?;
        let m = momentum_at(clock.step, clock.total_steps, self.base_momentum);
        branch.ema_update(&model.named_parameters(), m)?;
        branch.enqueue(&self.keys_global)
    }
}

/// SwAV over the two views, each predicting the other's codes.
pub struct Swav {
    temperature: f64,
    epsilon: f64,
    iterations: usize,
    freeze_steps: u64,
    /// Per-view queues of this rank's earlier features (None without a queue).
    queues: Option<[FeatureQueue; 2]>,
    queue_size: i64,
    /// Samples every rank has pushed so far (every rank knows every rank's counts), so all
    /// agree on the step from which every queue is full and used.
    filled: Vec<i64>,
}

impl Swav {
    pub fn new(
        temperature: f64,
        epsilon: f64,
        iterations: usize,
        freeze_steps: u64,
        queue_size: i64,
    ) -> Self {
        Self {
            temperature,
            epsilon,
            iterations,
            freeze_steps,
            queues: None,
            queue_size,
            filled: Vec::new(),
        }
    }
}

impl StepObjective for Swav {
    fn loss_and_grad(
        &mut self,
        model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        _clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        let protos = model
            .prototypes()
            .context("objective \"swav\" needs a model built with prototypes")?;
        let b = counts[coll.rank()];
        let z = z_local.detach().set_requires_grad(true);
        let zn = l2_normalize(&z);
        let scores = protos.forward(&zn);
        let views = [scores.narrow(0, 0, b), scores.narrow(0, b, b)];

        let mut queue_scores = None;
        if self.queue_size > 0 {
            if self.filled.is_empty() {
                self.filled = vec![0; counts.len()];
            } else if self.filled.len() != counts.len() {
                bail!(
                    "SwAV queue bookkeeping for {} ranks, step has {}",
                    self.filled.len(),
                    counts.len()
                );
            }
            let use_queue = self.filled.iter().all(|&f| f >= self.queue_size);
            for (f, c) in self.filled.iter_mut().zip(counts) {
                *f += c;
            }
            let dim = zn.size()[1];
            if self.queues.is_none() {
                let make = || FeatureQueue::new(self.queue_size, dim, z.device());
                self.queues = Some([make()?, make()?]);
            }
            let queues = self.queues.as_mut().expect("created above");
            let mut banks = Vec::with_capacity(2);
            for (v, queue) in queues.iter_mut().enumerate() {
                banks.push(queue.push(&zn.narrow(0, v as i64 * b, b).detach())?);
            }
            if use_queue {
                let w = protos.weight.detach();
                let scored: Option<Vec<Tensor>> = banks
                    .into_iter()
                    .map(|bank| bank.map(|f| f.matmul(&w.tr())))
                    .collect();
                queue_scores =
                    Some(scored.context("SwAV queue not full although every rank filled it")?);
            }
        }
        let loss = swav_loss_with_queue(
            &views,
            &[],
            queue_scores.as_deref(),
            self.temperature,
            self.epsilon,
            self.iterations,
            coll,
        )?;
        loss.backward();
        let grad = z.grad();
        let d_local = if grad.defined() { grad } else { z.zeros_like() };
        Ok((loss.detach(), d_local))
    }

    fn frozen(&self, name: &str, clock: StepClock) -> bool {
        name.starts_with("prototypes.") && prototypes_frozen(clock.step, self.freeze_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_permutation_is_a_permutation_and_depends_on_the_step() {
        let a = shared_permutation(50, 7, 3);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, shared_permutation(50, 7, 3));
        assert_ne!(a, shared_permutation(50, 7, 4));
        assert!(shared_permutation(0, 1, 1).is_empty());
    }
}
