//! One SimCLR step split over several ranks must produce the parameters of one step on a
//! single process with the whole batch: the gathered-negatives loss, the reduce-scatter of
//! the embedding gradient and the SUM all-reduce together give the exact global gradient.
//!
//! The model uses GroupNorm: with BatchNorm each rank normalises with its own batch
//! statistics, which legitimately changes the result of a split, so only a batch-independent
//! norm can be compared exactly.

use contrail_test_support as support;

use contrail_worker::dist::grad_sync::GradSync;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::{self, Collective};
use contrail_worker::objective::nt_xent_loss;
use contrail_worker::optim::{Optimizer, Sgd};
use contrail_worker::train::step::simclr_train_step;
use support::{fresh_copy, max_abs_diff, setup, RankResult, Setup};
use tch::Tensor;

const TEMPERATURE: f64 = 0.2;
// Large enough that a wrongly scaled gradient moves parameters far beyond the tolerance.
const LR: f64 = 0.5;
const MOMENTUM: f64 = 0.9;
const WEIGHT_DECAY: f64 = 1e-3;
const TOLERANCE: f64 = 1e-5;

/// One step with `splits[r]` samples on rank r (gradients summed as the default
/// [`GradSync`] says: overlapped with backward); `wrap` lets a test alter the collective.
fn run_split<C: Collective>(
    s: &Setup,
    splits: &[i64],
    wrap: impl Fn(dist::local::LocalCollective) -> C,
) -> Vec<RankResult> {
    run_split_with(s, splits, GradSync::default(), wrap)
}

fn run_split_with<C: Collective>(
    s: &Setup,
    splits: &[i64],
    sync: GradSync,
    wrap: impl Fn(dist::local::LocalCollective) -> C,
) -> Vec<RankResult> {
    assert_eq!(splits.iter().sum::<i64>(), s.view1.size()[0]);
    let mut work = Vec::new();
    let mut start = 0;
    for (coll, &b) in LocalGroup::new(splits.len()).into_iter().zip(splits) {
        let mut model = fresh_copy(&s.initial);
        model.set_grad_sync(sync);
        let opt = Sgd::new(model.named_parameters(), MOMENTUM, WEIGHT_DECAY);
        let v1 = s.view1.narrow(0, start, b).copy();
        let v2 = s.view2.narrow(0, start, b).copy();
        work.push((wrap(coll), model, opt, v1, v2));
        start += b;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .into_iter()
            .map(|(coll, model, mut opt, v1, v2)| {
                scope.spawn(move || {
                    let out = simclr_train_step(&model, &mut opt, &v1, &v2, TEMPERATURE, LR, &coll)
                        .unwrap_or_else(|e| panic!("rank {}: {e:#}", coll.rank()));
                    (model.named_parameters(), out.loss, out.global_samples)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn single_process(s: &Setup) -> RankResult {
    run_split(s, &[s.view1.size()[0]], |c| c).remove(0)
}

#[test]
fn single_rank_step_equals_plain_autograd_sgd() {
    let s = setup(17, 4);
    let (params, loss, samples) = single_process(&s);
    assert_eq!(samples, 4);

    // The same step by hand: NT-Xent of the two views' embeddings, backward, one SGD update
    // (first step: momentum buffer = g + wd·p).
    let m = fresh_copy(&s.initial);
    let z = m.forward_t(&Tensor::cat(&[&s.view1, &s.view2], 0), true);
    let expected_loss = nt_xent_loss(&z.narrow(0, 0, 4), &z.narrow(0, 4, 4), TEMPERATURE);
    expected_loss.backward();
    let expected: Vec<(String, Tensor)> = m
        .named_parameters()
        .into_iter()
        .map(|(n, p)| {
            let update = (p.grad() + &p * WEIGHT_DECAY) * LR;
            (n, p.detach() - update)
        })
        .collect();
    let loss_diff = (loss - expected_loss.double_value(&[])).abs();
    assert!(
        loss_diff < 1e-6,
        "loss {loss} vs autograd {}",
        expected_loss.double_value(&[])
    );
    let (diff, name) = max_abs_diff(&params, &expected);
    assert!(diff <= TOLERANCE, "max |Δ| {diff} at {name}");
    // The step moved the weights at all (otherwise the comparisons prove nothing).
    let (moved, _) = max_abs_diff(&params, &s.initial.named_parameters());
    assert!(moved > 1e-3, "step barely changed parameters ({moved})");
}

#[test]
fn split_steps_match_single_process() {
    let s = setup(17, 4);
    let (reference, reference_loss, _) = single_process(&s);
    for splits in [
        vec![2, 2],
        vec![3, 1],
        vec![4, 0],
        vec![0, 4],
        vec![1, 0, 3],
    ] {
        let ranks = run_split(&s, &splits, |c| c);
        for (rank, (params, loss, samples)) in ranks.iter().enumerate() {
            assert_eq!(*samples, 4, "split {splits:?} rank {rank}");
            assert!(
                (loss - reference_loss).abs() < 1e-6,
                "split {splits:?} rank {rank}: loss {loss} vs single process {reference_loss}"
            );
            let (diff, name) = max_abs_diff(params, &reference);
            assert!(
                diff <= TOLERANCE,
                "split {splits:?} rank {rank}: max |Δ| {diff} at {name}"
            );
        }
        // Every rank applies the same all-reduced gradient, so replicas stay bit-identical.
        let (diff, name) = max_abs_diff(&ranks[0].0, &ranks[ranks.len() - 1].0);
        assert_eq!(diff, 0.0, "split {splits:?}: replicas differ at {name}");
    }
}

#[test]
fn overlapped_small_buckets_match_single_process_and_the_reduction_after_backward() {
    let s = setup(17, 4);
    let (reference, _, _) = single_process(&s);
    // 4 KiB buckets: the test ResNet's gradients split into many, launched during backward.
    for splits in [vec![2, 2], vec![1, 0, 3]] {
        let mut runs = Vec::new();
        for overlap in [true, false] {
            let sync = GradSync {
                overlap,
                bucket_bytes: 4096,
                bf16: false,
            };
            let ranks = run_split_with(&s, &splits, sync, |c| c);
            for (rank, (params, _, _)) in ranks.iter().enumerate() {
                let (diff, name) = max_abs_diff(params, &reference);
                assert!(
                    diff <= TOLERANCE,
                    "overlap {overlap}, split {splits:?} rank {rank}: max |Δ| {diff} at {name}"
                );
            }
            runs.push(ranks);
        }
        // The same sums whichever way they were scheduled: the in-process backend adds in
        // rank order, so the parameters are bit-identical.
        let (diff, name) = max_abs_diff(&runs[0][0].0, &runs[1][0].0);
        assert_eq!(diff, 0.0, "split {splits:?}: overlap changed {name}");
    }
}

#[test]
fn bf16_gradient_sums_stay_within_their_rounding_of_float32() {
    let s = setup(17, 4);
    let (reference, _, _) = single_process(&s);
    let initial = s.initial.named_parameters();
    let moved = max_abs_diff(&reference, &initial).0;
    // ‖a − b‖₂ over every parameter.
    let l2 = |a: &[(String, Tensor)], b: &[(String, Tensor)]| -> f64 {
        a.iter()
            .zip(b)
            .map(|((_, x), (_, y))| (x - y).square().sum(tch::Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt()
    };
    let update = l2(&reference, &initial);
    for overlap in [true, false] {
        let sync = GradSync {
            overlap,
            bucket_bytes: 4096,
            bf16: true,
        };
        let ranks = run_split_with(&s, &[2, 2], sync, |c| c);
        let (diff, name) = max_abs_diff(&ranks[0].0, &reference);
        // bfloat16 keeps 8 significant bits: each rank's gradient and each partial sum is
        // rounded by at most 2^-9 of its size, so the whole update is off by about that
        // (bound: 2^-7 of its norm); one element can be off by more where the ranks'
        // gradients cancel (bound: 2^-4 of the largest single move).
        let relative = l2(&ranks[0].0, &reference) / update;
        assert!(
            relative <= 2f64.powi(-7),
            "overlap {overlap}: bf16 sums changed the update by {relative:.2e} of its norm"
        );
        assert!(
            diff <= moved * 2f64.powi(-4),
            "overlap {overlap}: bf16 sums moved {name} by {diff} from float32 (largest update {moved})"
        );
        // And they really were rounded: bit-identical results would mean float32 travelled.
        assert!(
            diff > 0.0,
            "overlap {overlap}: bf16 gave exactly the float32 result"
        );
        let (between, at) = max_abs_diff(&ranks[0].0, &ranks[1].0);
        assert_eq!(between, 0.0, "overlap {overlap}: replicas differ at {at}");
    }
}

/// A collective whose all-reduce averages instead of summing (the usual DDP habit).
struct MeanAllReduce(dist::local::LocalCollective);

impl Collective for MeanAllReduce {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> dist::Result<()> {
        self.0.all_reduce_sum(tensor)?;
        *tensor /= self.world_size() as f64;
        Ok(())
    }
    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> dist::Result<Tensor> {
        self.0.all_gather(local, counts)
    }
    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> dist::Result<Tensor> {
        self.0.reduce_scatter_sum(full, counts)
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> dist::Result<()> {
        self.0.broadcast(tensor, root)
    }
    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> dist::Result<(Tensor, Vec<i64>)> {
        self.0.all_to_all(input, send_counts)
    }
    fn barrier(&self) -> dist::Result<()> {
        self.0.barrier()
    }
}

#[test]
fn comparison_detects_mean_instead_of_sum() {
    let s = setup(17, 4);
    let (reference, _, _) = single_process(&s);
    let ranks = run_split(&s, &[2, 2], MeanAllReduce);
    let (diff, name) = max_abs_diff(&ranks[0].0, &reference);
    assert!(
        diff > 100.0 * TOLERANCE,
        "halving the gradient changed parameters by only {diff} (at {name}): the equivalence test \
         would not notice a scaling bug"
    );
}

#[test]
fn optimizer_state_names_follow_parameters() {
    let s = setup(17, 2);
    let opt = Sgd::new(s.initial.named_parameters(), MOMENTUM, WEIGHT_DECAY);
    let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"momentum.layer1.0.conv1.weight".to_string()),
        "{names:?}"
    );
    assert_eq!(names.len(), s.initial.named_parameters().len());
}
