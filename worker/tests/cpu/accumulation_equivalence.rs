//! A step accumulated over K micro-batches with cached embeddings must produce the parameters
//! and loss of one plain step over the concatenated batch, on one rank and split over ranks:
//! the loss sees all micro_batch × K × world_size samples as negatives, and the per-micro-batch
//! re-forwards add up to the full gradient.
//!
//! The model uses GroupNorm: with BatchNorm each micro-batch is normalised with its own
//! statistics, which legitimately changes the result, so only a batch-independent norm can be
//! compared exactly.

use contrail_test_support as support;

use contrail_worker::dist::local::{LocalCollective, LocalGroup};
use contrail_worker::dist::{self, Collective};
use contrail_worker::model::ContrastiveModel;
use contrail_worker::optim::Sgd;
use contrail_worker::train::step::{simclr_accumulated_step, simclr_train_step};
use support::{fresh_copy, max_abs_diff, setup, RankResult, Setup};
use tch::Tensor;

const TEMPERATURE: f64 = 0.2;
// Large enough that a missing or wrongly scaled gradient moves parameters far beyond the
// tolerance.
const LR: f64 = 0.5;
const MOMENTUM: f64 = 0.9;
const WEIGHT_DECAY: f64 = 1e-3;
const TOLERANCE: f64 = 1e-5;
const SAMPLES: i64 = 8;

/// One plain (unaccumulated) step over the whole batch on a single rank: the reference.
fn plain_single_process(s: &Setup) -> RankResult {
    let coll = LocalGroup::new(1).remove(0);
    let model = fresh_copy(&s.initial);
    let mut opt = Sgd::new(model.named_parameters(), MOMENTUM, WEIGHT_DECAY);
    let out = simclr_train_step(&model, &mut opt, &s.view1, &s.view2, TEMPERATURE, LR, &coll)
        .unwrap_or_else(|e| panic!("plain step: {e:#}"));
    (model.named_parameters(), out.loss, out.global_samples)
}

/// One accumulated step: rank r gets micro-batches of sizes `plan[r]`, taken from the batch
/// in order; `wrap` lets a test alter the collective.
fn run_accumulated<C: Collective>(
    s: &Setup,
    plan: &[Vec<i64>],
    wrap: impl Fn(LocalCollective) -> C,
) -> Vec<RankResult> {
    assert_eq!(plan.iter().flatten().sum::<i64>(), SAMPLES, "{plan:?}");
    let mut work = Vec::new();
    let mut start = 0;
    for (coll, sizes) in LocalGroup::new(plan.len()).into_iter().zip(plan) {
        let model = fresh_copy(&s.initial);
        let opt = Sgd::new(model.named_parameters(), MOMENTUM, WEIGHT_DECAY);
        let mut micro_batches = Vec::new();
        for &b in sizes {
            micro_batches.push((
                s.view1.narrow(0, start, b).copy(),
                s.view2.narrow(0, start, b).copy(),
            ));
            start += b;
        }
        work.push((wrap(coll), model, opt, micro_batches));
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .into_iter()
            .map(|(coll, model, mut opt, micro_batches)| {
                scope.spawn(move || {
                    let out = simclr_accumulated_step(
                        &model,
                        &mut opt,
                        &micro_batches,
                        TEMPERATURE,
                        LR,
                        &coll,
                    )
                    .unwrap_or_else(|e| panic!("rank {}: {e:#}", coll.rank()));
                    (model.named_parameters(), out.loss, out.global_samples)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Deep copies: `named_parameters` shares storage with the model, so it cannot serve as a
/// "before" picture.
fn snapshot(m: &ContrastiveModel) -> Vec<(String, Tensor)> {
    m.named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

/// Every rank of every plan must match the plain single-process step, and replicas must be
/// bit-identical.
fn assert_plans_match_reference(s: &Setup, plans: &[Vec<Vec<i64>>]) {
    let (reference, reference_loss, _) = plain_single_process(s);
    // The step moved the weights at all (otherwise the comparisons prove nothing).
    let (moved, _) = max_abs_diff(&reference, &s.initial.named_parameters());
    assert!(
        moved > 1e-3,
        "plain step barely changed parameters ({moved})"
    );
    for plan in plans {
        let ranks = run_accumulated(s, plan, |c| c);
        for (rank, (params, loss, samples)) in ranks.iter().enumerate() {
            assert_eq!(*samples, SAMPLES, "plan {plan:?} rank {rank}");
            assert!(
                (loss - reference_loss).abs() < 1e-6,
                "plan {plan:?} rank {rank}: loss {loss} vs plain step {reference_loss}"
            );
            let (diff, name) = max_abs_diff(params, &reference);
            assert!(
                diff <= TOLERANCE,
                "plan {plan:?} rank {rank}: max |Δ| {diff} at {name}"
            );
        }
        let (diff, name) = max_abs_diff(&ranks[0].0, &ranks[ranks.len() - 1].0);
        assert_eq!(diff, 0.0, "plan {plan:?}: replicas differ at {name}");
    }
}

#[test]
fn one_worker_accumulation_equals_plain_step_on_whole_batch() {
    let s = setup(23, SAMPLES);
    assert_plans_match_reference(
        &s,
        &[
            vec![vec![2, 2, 2, 2]],
            // Uneven sizes and an empty micro-batch in the middle.
            vec![vec![3, 0, 1, 4]],
            vec![vec![0, 8]],
            vec![vec![8]],
        ],
    );
}

#[test]
fn two_worker_accumulation_equals_one_worker_with_global_batch() {
    let s = setup(23, SAMPLES);
    assert_plans_match_reference(
        &s,
        &[
            vec![vec![2, 2], vec![2, 2]],
            vec![vec![1, 3], vec![4, 0]],
            vec![vec![0, 5], vec![2, 1]],
            // A rank with no samples at all still joins every collective.
            vec![vec![0, 0], vec![6, 2]],
            vec![vec![], vec![3, 5]],
        ],
    );
}

/// A collective that zeroes the embedding gradient of one micro-batch's rows after the
/// reduce-scatter: exactly what skipping that micro-batch's backward would do.
struct DropMicroBatchGrad {
    inner: LocalCollective,
    /// (offset within the rank's view-1 half, rows, samples on the rank).
    drop: (i64, i64, i64),
}

impl Collective for DropMicroBatchGrad {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> dist::Result<()> {
        self.inner.all_reduce_sum(tensor)
    }
    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> dist::Result<Tensor> {
        self.inner.all_gather(local, counts)
    }
    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> dist::Result<Tensor> {
        let out = self.inner.reduce_scatter_sum(full, counts)?;
        let (at, n, b) = self.drop;
        let _ = out.narrow(0, at, n).zero_();
        let _ = out.narrow(0, b + at, n).zero_();
        Ok(out)
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> dist::Result<()> {
        self.inner.broadcast(tensor, root)
    }
    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> dist::Result<(Tensor, Vec<i64>)> {
        self.inner.all_to_all(input, send_counts)
    }
    fn barrier(&self) -> dist::Result<()> {
        self.inner.barrier()
    }
}

#[test]
fn comparison_detects_a_dropped_micro_batch_backward() {
    let s = setup(23, SAMPLES);
    let (reference, reference_loss, _) = plain_single_process(&s);
    // Two ranks (one rank skips its collectives): micro-batch 1 of [2, 2] holds rows 2..4 of
    // each view half (4 samples per rank).
    let ranks = run_accumulated(&s, &[vec![2, 2], vec![2, 2]], |inner| DropMicroBatchGrad {
        inner,
        drop: (2, 2, SAMPLES / 2),
    });
    let (params, loss, _) = &ranks[0];
    // The loss is computed before the backward, so only the parameters can reveal it.
    assert!((loss - reference_loss).abs() < 1e-6);
    let (diff, name) = max_abs_diff(params, &reference);
    assert!(
        diff > 100.0 * TOLERANCE,
        "dropping a micro-batch's gradient changed parameters by only {diff} (at {name}): the \
         equivalence test would not notice a missing backward"
    );
}

#[test]
fn bad_micro_batch_is_reported_by_index() {
    let s = setup(23, SAMPLES);
    let coll = LocalGroup::new(1).remove(0);
    let model = fresh_copy(&s.initial);
    let mut opt = Sgd::new(model.named_parameters(), MOMENTUM, WEIGHT_DECAY);
    let micro_batches = vec![
        (s.view1.narrow(0, 0, 2), s.view2.narrow(0, 0, 2)),
        // Views of different sizes.
        (s.view1.narrow(0, 2, 3), s.view2.narrow(0, 2, 2)),
    ];
    let before = snapshot(&model);
    let e = simclr_accumulated_step(&model, &mut opt, &micro_batches, TEMPERATURE, LR, &coll)
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("micro-batch 1"), "{msg}");
    assert!(msg.contains("rank 0"), "{msg}");
    let (diff, _) = max_abs_diff(&model.named_parameters(), &before);
    assert_eq!(diff, 0.0, "a rejected step must not touch parameters");
}

#[test]
fn no_samples_anywhere_is_a_no_op() {
    let s = setup(23, SAMPLES);
    let plan: Vec<Vec<(Tensor, Tensor)>> = vec![
        vec![],
        vec![(s.view1.narrow(0, 0, 0), s.view2.narrow(0, 0, 0))],
    ];
    std::thread::scope(|scope| {
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .zip(plan)
            .map(|(coll, micro_batches)| {
                let model = fresh_copy(&s.initial);
                let before = snapshot(&s.initial);
                scope.spawn(move || {
                    let mut opt = Sgd::new(model.named_parameters(), MOMENTUM, WEIGHT_DECAY);
                    let out = simclr_accumulated_step(
                        &model,
                        &mut opt,
                        &micro_batches,
                        TEMPERATURE,
                        LR,
                        &coll,
                    )
                    .unwrap();
                    assert_eq!((out.loss, out.global_samples), (0.0, 0));
                    let (diff, _) = max_abs_diff(&model.named_parameters(), &before);
                    assert_eq!(diff, 0.0);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}
