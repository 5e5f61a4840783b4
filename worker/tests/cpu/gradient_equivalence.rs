//! One SimCLR step split over several ranks must produce the parameters of one step on a
//! single process with the whole batch: the gathered-negatives loss, the reduce-scatter of
//! the embedding gradient and the SUM all-reduce together give the exact global gradient.
//!
//! The model uses GroupNorm: with BatchNorm each rank normalises with its own batch
//! statistics, which legitimately changes the result of a split, so only a batch-independent
//! norm can be compared exactly.

use contrail_test_support as support;

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

/// One step with `splits[r]` samples on rank r; `wrap` lets a test alter the collective.
fn run_split<C: Collective>(
    s: &Setup,
    splits: &[i64],
    wrap: impl Fn(dist::local::LocalCollective) -> C,
) -> Vec<RankResult> {
    assert_eq!(splits.iter().sum::<i64>(), s.view1.size()[0]);
    let mut work = Vec::new();
    let mut start = 0;
    for (coll, &b) in LocalGroup::new(splits.len()).into_iter().zip(splits) {
        let model = fresh_copy(&s.initial);
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
