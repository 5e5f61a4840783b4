//! MoCo v2's loss: each query is classified against its own key (the positive) and every key
//! in the queue (the negatives), as lightly's `NTXentLoss` with a memory bank computes it.
//!
//! Keys carry no gradient (they come from the momentum encoder) and neither does the queue,
//! so a query's loss depends only on its own row: the distributed form needs no gathered
//! gradient, only the global count to divide by.

use super::gather::block_layout;
use super::{StepClock, StepObjective};
use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::nn::l2_normalize;
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// Per-query losses `logsumexp([q·k, q·queue]/τ) − q·k/τ` for `query` (n × d, raw), `key`
/// (n × d, the positives, normalised here) and `queue` (K × d, used as given: it holds unit
/// keys). Differentiable in `query` only.
pub fn moco_query_losses(query: &Tensor, key: &Tensor, queue: &Tensor, temperature: f64) -> Tensor {
    let q = l2_normalize(query);
    let k = l2_normalize(&key.detach());
    let positive = (&q * &k).sum_dim_intlist(&[1i64][..], true, Kind::Float);
    let negatives = q.matmul(&queue.detach().tr());
    let logits = Tensor::cat(&[&positive, &negatives], 1) / temperature;
    logits.logsumexp([1], false) - logits.select(1, 0)
}

/// Mean of [`moco_query_losses`]: the value lightly's `NTXentLoss(memory_bank_size=(K, d))`
/// returns for `(query, key)` when its bank holds `queue`.
pub fn moco_loss(query: &Tensor, key: &Tensor, queue: &Tensor, temperature: f64) -> Tensor {
    moco_query_losses(query, key, queue, temperature).mean(Kind::Float)
}

/// The key encoder's EMA momentum at 0-based `step` of `total_steps`: `base` at the start,
/// rising along a cosine to 1.0 at the end (BYOL's schedule, used by solo-learn's MoCo v2+).
/// With an unknown run length (`total_steps` = 0) it stays at `base`.
pub fn momentum_at(step: u64, total_steps: u64, base: f64) -> f64 {
    if total_steps == 0 {
        return base;
    }
    let progress = (step.min(total_steps) as f64) / total_steps as f64;
    1.0 - (1.0 - base) * ((std::f64::consts::PI * progress).cos() + 1.0) / 2.0
}

// ---------------------------------------------------------------------------------------------
// The distributed step form.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_schedule_runs_from_base_to_one() {
        assert_eq!(momentum_at(0, 100, 0.99), 0.99);
        assert!((momentum_at(50, 100, 0.99) - 0.995).abs() < 1e-12);
        assert_eq!(momentum_at(100, 100, 0.99), 1.0);
        assert_eq!(momentum_at(7, 0, 0.99), 0.99);
    }

    #[test]
    fn a_key_equal_to_its_query_beats_a_random_one() {
        tch::manual_seed(0);
        let q = Tensor::randn([4, 8], (Kind::Float, tch::Device::Cpu));
        let queue = l2_normalize(&Tensor::randn([16, 8], (Kind::Float, tch::Device::Cpu)));
        let same = moco_loss(&q, &q, &queue, 0.2).double_value(&[]);
        let other = moco_loss(&q, &q.flip([0]), &queue, 0.2).double_value(&[]);
        assert!(same < other, "{same} !< {other}");
    }

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
