//! SwAV (swapped assignments between views) as lightly 1.6.0's `SwaVLoss`, with the
//! Sinkhorn–Knopp codes computed over the batch of ALL ranks.
//!
//! Scores are `B × K` similarities of the (normalised) features with the K (normalised)
//! prototypes. For each high-resolution view i, the codes `q_i = sinkhorn(scores_i)` (no
//! gradient) are the targets of every other view v's `softmax(scores_v / τ)`:
//! `L = 1/n_high · Σ_i 1/(n_crops − 1) · Σ_{v≠i} mean_b(−Σ_k q_i[b,k] · log_softmax(s_v/τ)[b,k])`.
//!
//! Distributed form: Sinkhorn's sums over the batch (the total mass and the per-prototype row
//! sums) are all-reduced, as in SwAV's `distributed_sinkhorn`, so every rank gets its own rows
//! of the codes of the global batch. [`swav_loss`] returns this rank's share of `L` (its
//! per-sample terms divided by the global batch size), so the ranks' values sum to `L` and the
//! local gradients are exactly the rows of the single-process gradients.

use super::{StepClock, StepObjective};
use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::nn::{l2_normalize, write_ring};
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// Sums `t` across ranks where it is (on a GPU with NCCL: Sinkhorn's iterations never wait
/// for the host).
fn all_reduce(coll: &dyn Collective, t: &Tensor, what: &str) -> Result<Tensor> {
    let mut sum = t.contiguous();
    coll.all_reduce_sum(&mut sum).with_context(|| {
        format!(
            "SwAV sinkhorn: all-reduce of {what} on rank {} of {}",
            coll.rank(),
            coll.world_size()
        )
    })?;
    Ok(sum)
}

/// Sinkhorn codes of the first `keep` local rows of `scores` (the batch; later rows are queued
/// scores that only take part in the normalisation), plus the global number of kept rows.
fn sinkhorn_global(
    scores: &Tensor,
    keep: i64,
    epsilon: f64,
    iterations: usize,
    coll: &dyn Collective,
) -> Result<(Tensor, i64)> {
    let rank = coll.rank();
    let size = scores.size();
    if size.len() != 2 {
        bail!("SwAV sinkhorn on rank {rank}: scores must be B × K, got shape {size:?}");
    }
    if !(epsilon.is_finite() && epsilon > 0.0) {
        bail!("SwAV sinkhorn: epsilon must be a positive number, got {epsilon}");
    }
    let (b, k) = (size[0], size[1]);
    if !(0..=b).contains(&keep) {
        bail!("SwAV sinkhorn on rank {rank}: cannot keep {keep} of {b} rows");
    }
    let _guard = tch::no_grad_guard();
    let s = scores.detach().to_kind(Kind::Float);

    // One gather of (local max, local rows) per rank: the global max is subtracted before
    // exp (a constant factor that the first normalisation cancels, so the codes are the same
    // as lightly's) to keep exp(s/ε) from overflowing f32 for scores above ~88·ε.
    let local_max = if b > 0 && k > 0 {
        s.max().double_value(&[])
    } else {
        f64::NEG_INFINITY
    };
    let stats = Tensor::from_slice(&[local_max as f32, b as f32, keep as f32]).view([1, 3]);
    let counts = vec![1i64; coll.world_size()];
    let all = coll
        .all_gather(&stats, &counts)
        .with_context(|| format!("SwAV sinkhorn: gathering batch sizes on rank {rank}"))?;
    let global_sum = |col: i64| {
        all.select(1, col)
            .sum(Kind::Double)
            .double_value(&[])
            .round()
    };
    let (global_b, global_keep) = (global_sum(1) as i64, global_sum(2) as i64);
    if global_b == 0 || k == 0 {
        // Same on every rank (gathered values), so no rank is left waiting in a collective.
        return Ok((s.narrow(0, 0, keep).zeros_like(), global_keep));
    }
    let global_max = all.select(1, 0).max().double_value(&[]);

    // K × b, as lightly: rows are prototypes, columns this rank's samples.
    let mut q = ((s - global_max) / epsilon).exp().tr();
    let total = all_reduce(coll, &q.sum(Kind::Float), "the total mass")?;
    q /= total;
    for _ in 0..iterations {
        // Equal mass per prototype over the global batch. (SwAV's paper code also divides by
        // K here; lightly omits it, as the column step below cancels any uniform factor.)
        let rows = all_reduce(
            coll,
            &q.sum_dim_intlist([1i64].as_slice(), true, None),
            "row sums",
        )?;
        q /= rows;
        // Mass 1/B per sample; purely local, a column is one sample.
        q /= q.sum_dim_intlist([0i64].as_slice(), true, None) * global_b as f64;
    }
    q *= global_b as f64;
    Ok((q.tr().narrow(0, 0, keep).contiguous(), global_keep))
}

/// Sinkhorn–Knopp codes (lightly's `sinkhorn(..., gather_distributed=True)`) of this rank's
/// `scores` (B_local × K, any float kind; computed in float32 without gradient). Every rank
/// must call it with the same K, ε and iterations (a rank may have zero rows). Returns this
/// rank's rows of the global assignment Q: each row sums to 1, and after enough iterations
/// every prototype receives B_global / K of the mass.
pub fn sinkhorn(
    scores: &Tensor,
    epsilon: f64,
    iterations: usize,
    coll: &dyn Collective,
) -> Result<Tensor> {
    let rows = scores.size().first().copied().unwrap_or(0);
    Ok(sinkhorn_global(scores, rows, epsilon, iterations, coll)?.0)
}

/// This rank's share of lightly's `SwaVLoss` (without queue) over this rank's views: `high_res`
/// and `low_res` are B_local × K prototype scores of the same samples, one tensor per crop.
/// The ranks' values sum to the single-process loss of the global batch (a 0-d float32
/// tensor, differentiable in every score tensor). Every rank must pass the same number of
/// crops; codes come from [`sinkhorn`] over all ranks.
pub fn swav_loss(
    high_res: &[Tensor],
    low_res: &[Tensor],
    temperature: f64,
    sinkhorn_epsilon: f64,
    sinkhorn_iterations: usize,
    coll: &dyn Collective,
) -> Result<Tensor> {
    swav_loss_with_queue(
        high_res,
        low_res,
        None,
        temperature,
        sinkhorn_epsilon,
        sinkhorn_iterations,
        coll,
    )
}

/// [`swav_loss`] with lightly's `queue_outputs`: `queue[i]` (Q_local × K, no gradient) are the
/// scores of features queued from earlier batches for high-res crop i, against the current
/// prototypes. They are appended to crop i's scores for Sinkhorn only (more samples make the
/// equal-partition constraint meaningful for small batches) and their codes are dropped.
/// All ranks must agree on whether a queue is passed.
pub fn swav_loss_with_queue(
    high_res: &[Tensor],
    low_res: &[Tensor],
    queue: Option<&[Tensor]>,
    temperature: f64,
    sinkhorn_epsilon: f64,
    sinkhorn_iterations: usize,
    coll: &dyn Collective,
) -> Result<Tensor> {
    let rank = coll.rank();
    let n_crops = high_res.len() + low_res.len();
    if high_res.is_empty() || n_crops < 2 {
        bail!(
            "SwAV on rank {rank}: needs at least one high-resolution crop and two crops in all, \
             got {} high and {} low",
            high_res.len(),
            low_res.len()
        );
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("SwAV: temperature must be a positive number, got {temperature}");
    }
    let shape = high_res[0].size();
    for (i, t) in high_res.iter().chain(low_res).enumerate() {
        if t.size().len() != 2 || t.size() != shape {
            bail!(
                "SwAV on rank {rank}: crop {i} has scores of shape {:?}, crop 0 has {shape:?} \
                 (all crops must be B × K for the same samples and prototypes)",
                t.size()
            );
        }
    }
    if let Some(queue) = queue {
        if queue.len() != high_res.len() {
            bail!(
                "SwAV on rank {rank}: {} queues for {} high-resolution crops",
                queue.len(),
                high_res.len()
            );
        }
        for (i, q) in queue.iter().enumerate() {
            if q.size().len() != 2 || q.size()[1] != shape[1] {
                bail!(
                    "SwAV on rank {rank}: queue {i} has scores of shape {:?}, expected Q × {}",
                    q.size(),
                    shape[1]
                );
            }
        }
    }
    let log_probs: Vec<Tensor> = high_res
        .iter()
        .chain(low_res)
        .map(|t| (t.to_kind(Kind::Float) / temperature).log_softmax(1, Kind::Float))
        .collect();

    let mut loss = Tensor::zeros([], (Kind::Float, high_res[0].device()));
    for (i, high) in high_res.iter().enumerate() {
        let scores = match queue {
            Some(queue) => Tensor::cat(
                &[
                    high.detach().to_kind(Kind::Float),
                    queue[i]
                        .detach()
                        .to_kind(Kind::Float)
                        .to_device(high.device()),
                ],
                0,
            ),
            None => high.shallow_clone(),
        };
        let (q, global_b) = sinkhorn_global(
            &scores,
            shape[0],
            sinkhorn_epsilon,
            sinkhorn_iterations,
            coll,
        )
        .with_context(|| format!("SwAV codes of high-resolution crop {i}"))?;
        let mut subloss = Tensor::zeros([], (Kind::Float, high_res[0].device()));
        for (v, lp) in log_probs.iter().enumerate() {
            if v != i {
                // Sum of this rank's per-sample cross entropies over the global batch size:
                // the ranks' shares add up to lightly's mean over the batch.
                subloss -= (&q * lp).sum(Kind::Float) / global_b.max(1) as f64;
            }
        }
        loss += subloss / (n_crops - 1) as f64;
    }
    Ok(loss / high_res.len() as f64)
}

/// Whether the prototypes stay fixed at optimizer step `step` (0-based): SwAV freezes them for
/// the first `freeze_steps` iterations so the codes do not collapse while features are random.
/// The optimizer then skips them entirely (see `Optimizer::step_skipping`), as lightly and
/// SwAV do by dropping their gradient.
pub fn prototypes_frozen(step: u64, freeze_steps: u64) -> bool {
    step < freeze_steps
}

/// A FIFO of past high-resolution features (one per high-res crop), SwAV's queue: the
/// features are kept (detached) and re-scored against the current prototypes each step to
/// feed [`swav_loss_with_queue`].
///
/// Unlike lightly's memory bank, which starts out as random vectors, [`FeatureQueue::push`]
/// returns nothing until the queue has been filled once with real features.
#[derive(Debug)]
pub struct FeatureQueue {
    /// size × d ring buffer; rows `[0, len)` are valid, `next` is where the next row goes.
    bank: Tensor,
    next: i64,
    len: i64,
}

impl FeatureQueue {
    pub fn new(size: i64, dim: i64, device: Device) -> Result<Self> {
        if size <= 0 || dim <= 0 {
            bail!("SwAV queue: size {size} and feature dim {dim} must both be positive");
        }
        Ok(Self {
            bank: Tensor::zeros([size, dim], (Kind::Float, device)),
            next: 0,
            len: 0,
        })
    }

    /// Returns the queued features from before this batch (None until full), then enqueues
    /// `features` (b × d), overwriting the oldest rows; of a batch larger than the queue only
    /// its last rows are kept.
    pub fn push(&mut self, features: &Tensor) -> Result<Option<Tensor>> {
        let (size, dim) = (self.bank.size()[0], self.bank.size()[1]);
        let fs = features.size();
        if fs.len() != 2 || fs[1] != dim {
            bail!("SwAV queue: features of shape {fs:?} do not fit a queue of {size} × {dim}");
        }
        let out = (self.len == size).then(|| self.bank.copy());
        let take = write_ring(&self.bank, self.next, features);
        self.next = (self.next + take) % size;
        self.len = (self.len + take).min(size);
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The distributed step form.

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
    use crate::dist::local::LocalGroup;
    use crate::model::prototypes::Prototypes;
    use tch::nn;

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        Vec::<Vec<f64>>::try_from(&t.to_kind(Kind::Double)).unwrap()
    }

    /// Textbook Sinkhorn–Knopp in f64, written as in the SwAV paper (no max shift).
    fn reference(scores: &[Vec<f64>], eps: f64, iters: usize) -> Vec<Vec<f64>> {
        let (b, k) = (scores.len(), scores[0].len());
        let mut q: Vec<Vec<f64>> = scores
            .iter()
            .map(|r| r.iter().map(|s| (s / eps).exp()).collect())
            .collect();
        let total: f64 = q.iter().flatten().sum();
        q.iter_mut().flatten().for_each(|x| *x /= total);
        for _ in 0..iters {
            for j in 0..k {
                let r: f64 = q.iter().map(|row| row[j]).sum();
                q.iter_mut().for_each(|row| row[j] /= r * k as f64);
            }
            for row in q.iter_mut() {
                let c: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= c * b as f64);
            }
        }
        q.iter_mut().flatten().for_each(|x| *x *= b as f64);
        q
    }

    fn single() -> crate::dist::local::LocalCollective {
        LocalGroup::new(1).remove(0)
    }

    #[test]
    fn sinkhorn_matches_textbook_and_balances_prototypes() {
        tch::manual_seed(7);
        let scores = l2_normalize(&Tensor::randn([12, 6], (Kind::Float, Device::Cpu)))
            .matmul(&l2_normalize(&Tensor::randn([4, 6], (Kind::Float, Device::Cpu))).tr());
        let c = single();
        let q = sinkhorn(&scores, 0.05, 3, &c).unwrap();
        let want = reference(&rows(&scores), 0.05, 3);
        for (g, w) in rows(&q).iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // Many iterations: rows are distributions and each prototype gets B/K = 3 samples.
        let q = sinkhorn(&scores, 0.05, 300, &c).unwrap();
        for r in rows(&q) {
            assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-5, "row {r:?}");
        }
        for m in rows(&q.sum_dim_intlist([0i64].as_slice(), true, Kind::Double)).remove(0) {
            assert!((m - 3.0).abs() < 1e-3, "prototype mass {m}");
        }
    }

    #[test]
    fn large_scores_do_not_overflow_and_bf16_is_cast_up() {
        // exp(10 / 0.05) overflows f32 without the max shift.
        let scores = Tensor::from_slice(&[10.0f32, 9.9, 9.8, 10.0]).view([2, 2]);
        let q = sinkhorn(&scores.to_kind(Kind::BFloat16), 0.05, 3, &single()).unwrap();
        assert_eq!(q.kind(), Kind::Float);
        let want = reference(&rows(&scores.to_kind(Kind::BFloat16)), 0.05, 3);
        assert!(want.iter().flatten().all(|x| x.is_finite()));
        for (g, w) in rows(&q).iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn rank_with_no_rows_gets_empty_codes_and_others_are_unchanged() {
        tch::manual_seed(8);
        let scores = Tensor::randn([5, 3], (Kind::Float, Device::Cpu)).tanh();
        let want = sinkhorn(&scores, 0.1, 3, &single()).unwrap();
        let group = LocalGroup::new(2);
        let parts = [scores.narrow(0, 0, 0).copy(), scores.copy()];
        let out: Vec<Tensor> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .zip(parts)
                .map(|(c, p)| s.spawn(move || sinkhorn(&p, 0.1, 3, c).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(out[0].size(), vec![0, 3]);
        let diff = (&out[1] - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "max diff {diff}");
    }

    #[test]
    fn loss_rejects_bad_input_with_context() {
        let c = single();
        let a = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        let err = swav_loss(&[a.shallow_clone()], &[], 0.1, 0.05, 3, &c).unwrap_err();
        assert!(err.to_string().contains("two crops"), "{err}");
        let err = swav_loss(&[a.shallow_clone()], &[b], 0.1, 0.05, 3, &c).unwrap_err();
        assert!(err.to_string().contains("crop 1"), "{err}");
        let err = sinkhorn(&a, 0.0, 3, &c).unwrap_err();
        assert!(err.to_string().contains("epsilon"), "{err}");
    }

    #[test]
    fn prototypes_are_unit_rows_and_freeze_window_is_half_open() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = Prototypes::new(&vs.root(), 6, 4);
        tch::no_grad(|| {
            let _ = p.weight.shallow_clone().g_mul_scalar_(3.0);
        });
        let z = l2_normalize(&Tensor::randn([2, 6], (Kind::Float, Device::Cpu)));
        let scores = p.forward(&z);
        assert_eq!(scores.size(), vec![2, 4]);
        for n in rows(&p.weight.norm_scalaropt_dim(2, [1], false).unsqueeze(0)).remove(0) {
            assert!((n - 1.0).abs() < 1e-6, "prototype norm {n}");
        }
        // Cosines of unit vectors.
        assert!(scores.abs().max().double_value(&[]) <= 1.0 + 1e-6);
        assert!(p.weight.requires_grad());

        scores.sum(Kind::Float).backward();
        assert!(p.weight.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(prototypes_frozen(0, 1) && !prototypes_frozen(1, 1) && !prototypes_frozen(0, 0));
    }

    #[test]
    fn queue_returns_the_previous_rows_once_full_and_wraps() {
        let mut q = FeatureQueue::new(3, 2, Device::Cpu).unwrap();
        let batch = |start: i64, n: i64| {
            Tensor::arange_start(start, start + n, (Kind::Float, Device::Cpu))
                .unsqueeze(1)
                .repeat([1, 2])
        };
        let first = |t: &Tensor| rows(t).iter().map(|r| r[0]).collect::<Vec<_>>();
        assert!(q.push(&batch(0, 2)).unwrap().is_none());
        assert!(q.push(&batch(2, 2)).unwrap().is_none()); // fills 2, wraps 3 to row 0
        let got = q.push(&batch(4, 1)).unwrap().expect("full");
        assert_eq!(first(&got), vec![3.0, 1.0, 2.0]);
        // A batch larger than the queue keeps only its last rows.
        let got = q.push(&batch(10, 5)).unwrap().expect("full");
        assert_eq!(first(&got), vec![3.0, 4.0, 2.0]);
        let got = q.push(&batch(20, 0)).unwrap().expect("full");
        let mut sorted = first(&got);
        sorted.sort_by(f64::total_cmp);
        assert_eq!(sorted, vec![12.0, 13.0, 14.0]);
        assert!(q.push(&batch(0, 2).narrow(1, 0, 1)).is_err());
        assert!(FeatureQueue::new(0, 2, Device::Cpu).is_err());
    }
}
