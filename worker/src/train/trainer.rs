//! The training loop: epochs of steps, with in-band agreement on where an epoch ends.
//!
//! Before every step each rank contributes its local batch size to an all-gather. When the sum
//! is zero, every rank sees it in the same collective and the epoch ends everywhere at once; a
//! rank that ran out of data earlier keeps entering each step's collectives with zero rows. This
//! is what makes the webdataset/OpenCLIP "uneven shards" hang impossible, and it trains every
//! sample of the epoch exactly once (no rank drops its tail to match the others).

use crate::dist::{all_gather_counts, all_gather_step_plan, Collective};
use crate::model::ContrastiveModel;
use crate::objective::StepObjective;
use crate::optim::{lr_at, scaled_peak_lr, Optimizer};
use crate::train::rebalance::{agree_on_placement, move_experts};
use crate::train::step::{train_step_queued, StepClock};
use anyhow::{bail, Context, Result};
use contrail_common::audit::SampleRef;
use contrail_common::experts::ExpertPlacement;
use contrail_common::JobConfig;
use std::time::Instant;
use tch::Tensor;

/// One rank's share of a step, `b` samples (b may be 0), the pair that
/// `ContrastiveModel::embed_pair` embeds.
pub struct LocalBatch {
    /// `b × 3 × S × S` images (the first augmented view).
    pub images: Tensor,
    /// The second view (`b × 3 × S × S`) for image objectives; `b × context_length` caption
    /// tokens for CLIP.
    pub pair: Tensor,
    /// Which samples these are, row for row (empty where nobody asks: tests, benchmarks).
    pub samples: Vec<SampleRef>,
}

/// Where a rank's batches come from in one epoch.
pub trait BatchSource {
    /// The next local batch, or `None` when this rank has no more data this epoch.
    fn next_batch(&mut self) -> Result<Option<LocalBatch>>;
}

/// What the loop tells the outside world after each step.
pub struct StepEvent {
    pub epoch: u32,
    pub step: u64,
    /// The global-batch loss where the loop read it back: every `train.log_every` steps and
    /// the first step (None otherwise; see `train_step_queued`).
    pub loss: Option<f64>,
    pub global_samples: i64,
    pub lr: f64,
    pub step_seconds: f64,
    /// MoE blocks: the step's expert load over all ranks (empty without MoE).
    pub expert_load: Vec<crate::moe::BlockLoad>,
    /// Version of the expert placement the step ran with (0 without MoE).
    pub placement_version: u64,
    /// The samples this rank trained in the step (for the audit).
    pub samples: Vec<SampleRef>,
}

/// Hooks the loop calls; the worker runtime implements them with coordinator RPCs.
pub trait TrainHooks {
    /// A fresh batch source for `epoch` on this rank.
    fn epoch_source(&mut self, epoch: u32) -> Result<Box<dyn BatchSource>>;
    /// Called after every step; an error stops training.
    fn after_step(&mut self, event: &StepEvent) -> Result<()>;
    /// Called when a checkpoint is due (every `checkpoint.every_steps`, and at the end).
    fn checkpoint(
        &mut self,
        model: &ContrastiveModel,
        opt: &dyn Optimizer,
        epoch: u32,
        step: u64,
    ) -> Result<()>;
    /// Why training must stop now (e.g. the coordinator declared the job failed), if it must.
    fn stop_reason(&self) -> Option<String>;
    /// Samples in one epoch when the dataset says so before it is read (its manifest): the
    /// learning-rate schedule then spans the run from step 0.
    fn dataset_samples(&self) -> Option<u64> {
        None
    }
    /// A new member waits to join: stop at this step boundary with [`RegroupRequested`].
    fn regroup_requested(&self) -> bool {
        false
    }
    /// With `cluster.min_workers`: the ids of every sample all ranks trained in a step of
    /// `epoch` that just committed.
    fn record_trained(&mut self, _epoch: u32, _ids: &StepIds) {}
    /// Just before step `step` of `epoch` trains `samples` on this rank (it may still fail):
    /// the audit writes its record here, so a rank that dies cannot take a committed step's
    /// record with it. With `cluster.min_workers`, `all` holds every rank's sample ids of the
    /// step (so a survivor can write the records a dead rank had not written yet).
    fn before_step(
        &mut self,
        _epoch: u32,
        _step: u64,
        _samples: &[SampleRef],
        _all: Option<&StepIds>,
    ) -> Result<()> {
        Ok(())
    }
    /// Called when an online evaluation is due (`[eval]`: before the first step with
    /// `at_start`, every `every_steps`, and when training ends), on every rank at the same
    /// step: the ranks embed their shares together. `step` is the steps `model` has trained.
    fn evaluate(&mut self, _model: &ContrastiveModel, _epoch: u32, _step: u64) -> Result<()> {
        Ok(())
    }
    /// Rank 0: the newest expert placement the coordinator has adopted (the loop switches to
    /// it if it is newer than the one in force). Other ranks and jobs without MoE: None.
    fn offered_placement(&mut self) -> Option<ExpertPlacement> {
        None
    }
    /// The job's model on `placement` (freshly initialised; the loop loads the state).
    fn build_model(&mut self, _placement: ExpertPlacement) -> Result<ContrastiveModel> {
        bail!("this training loop cannot rebuild its model for a new expert placement")
    }
}

/// Training stopped at a step boundary because the membership is about to change (a
/// replacement joins); the caller regroups and calls [`train`] again.
#[derive(Debug, thiserror::Error)]
#[error("stopped after step {step} to let a new worker join")]
pub struct RegroupRequested {
    pub step: u64,
}

/// Where training starts (a fresh job, or a checkpoint).
#[derive(Debug, Clone, Copy, Default)]
pub struct StartPoint {
    pub epoch: u32,
    pub step: u64,
}

pub struct TrainSummary {
    pub steps: u64,
    pub epochs_completed: u32,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
}

/// Runs epochs until `train.epochs` are done or `train.max_steps` is reached.
pub fn train(
    cfg: &JobConfig,
    model: &mut ContrastiveModel,
    opt: &mut Box<dyn Optimizer>,
    objective: &mut dyn StepObjective,
    coll: &dyn Collective,
    hooks: &mut dyn TrainHooks,
    start: StartPoint,
) -> Result<TrainSummary> {
    let t = &cfg.train;
    let mut step = start.step;
    let mut epoch = start.epoch;
    let mut summary = TrainSummary {
        steps: 0,
        epochs_completed: 0,
        first_loss: None,
        last_loss: None,
    };
    // The cosine schedule spans max_steps (if set), else epochs × steps per epoch: estimated
    // from the dataset's manifest as ceil(samples / global batch) until an epoch has been seen
    // whole, then the observed count; without a manifest it holds the peak after warm-up
    // until then. Every rank counts the same steps, so every rank computes the same rate.
    let estimated_steps_per_epoch = hooks
        .dataset_samples()
        .map(|n| n.div_ceil(t.global_batch.max(1)));
    let mut steps_per_epoch: Option<u64> = None;
    let max_steps_reached = |s: u64| t.max_steps > 0 && s >= t.max_steps;
    // A resumed job's checkpoint already holds its starting state.
    let mut last_checkpoint: Option<u64> = (start.step > 0).then_some(start.step);
    let peak_lr = scaled_peak_lr(&cfg.optim, t.global_batch);
    let accumulation = t.accumulation_steps(cfg.cluster.world_size) as usize;
    // Survivors of a failure resume from what every rank trained (`cluster.min_workers`).
    let track_samples = cfg.cluster.min_workers > 0;
    let ev = &cfg.eval;
    let mut last_eval: Option<u64> = None;
    if ev.enabled() && ev.at_start {
        hooks.evaluate(model, epoch, step)?;
        last_eval = Some(step);
    }

    // The latest step's loss, unread, with its (epoch, step).
    let mut last_loss: Option<(Tensor, u32, u64)> = None;
    'epochs: loop {
        if (t.epochs > 0 && epoch >= t.epochs) || max_steps_reached(step) {
            break;
        }
        // A resumed epoch is partly done already, so its step count says nothing.
        let partial_epoch = start.step > 0 && epoch == start.epoch;
        let mut steps_this_epoch = 0u64;
        {
            let mut source = hooks.epoch_source(epoch)?;
            loop {
                if let Some(reason) = hooks.stop_reason() {
                    bail!("stopping at step {step}: {reason}");
                }
                let started = Instant::now();
                // Up to K micro-batches make one step; a rank whose data ran out brings fewer
                // (or none) and still enters every collective.
                let mut micro: Vec<(Tensor, Tensor)> = Vec::with_capacity(accumulation);
                let mut samples = Vec::new();
                while micro.len() < accumulation {
                    match source.next_batch()? {
                        // Micro-batches stay in host memory until the step uploads them.
                        Some(b) => {
                            samples.extend(b.samples);
                            micro.push((b.images, b.pair));
                        }
                        None => break,
                    }
                }
                let local: i64 = micro.iter().map(|(v1, _)| v1.size()[0]).sum();
                // Ranks hear of a waiting replacement at different times; they stop together.
                // The batches drawn for this step are not trained, so their shards go back
                // to the pool at the regroup (and re-leases skip what was trained).
                let (counts, regroup) =
                    all_gather_step_plan(coll, local, hooks.regroup_requested())?;
                if regroup {
                    return Err(RegroupRequested { step }.into());
                }
                if counts.iter().sum::<i64>() == 0 {
                    break;
                }
                // Gathered before the step and recorded once it committed, so every rank knows
                // what every other trained even if one dies in the next collective.
                let step_ids = if track_samples {
                    Some(gather_sample_ids(coll, &samples)?)
                } else {
                    None
                };
                hooks.before_step(epoch, step + 1, &samples, step_ids.as_ref())?;
                let total = match (t.max_steps, steps_per_epoch.or(estimated_steps_per_epoch)) {
                    (m, _) if m > 0 => m,
                    (_, Some(spe)) => spe * u64::from(t.epochs.max(1)),
                    (_, None) => 0,
                };
                let lr = lr_at(step, total, peak_lr, cfg.optim.warmup_steps);
                let clock = StepClock {
                    step,
                    total_steps: total,
                };
                let outcome = train_step_queued(
                    model,
                    opt.as_mut(),
                    objective,
                    &micro,
                    lr,
                    coll,
                    &counts,
                    clock,
                )?;
                step += 1;
                steps_this_epoch += 1;
                summary.steps += 1;
                if let Some(ids) = &step_ids {
                    hooks.record_trained(epoch, ids);
                }
                // Reading the loss makes the host wait for the GPU to finish the step, so it
                // is read where it is shown (every train.log_every steps, and the first), and
                // the last one once training stops.
                let shown = step.is_multiple_of(t.log_every.max(1)) || summary.first_loss.is_none();
                let loss = shown.then(|| outcome.read_loss());
                if let Some(loss) = loss {
                    summary.first_loss.get_or_insert(loss);
                    check_finite(loss, epoch, step)?;
                }
                last_loss = Some((outcome.loss_tensor(), epoch, step));
                hooks.after_step(&StepEvent {
                    epoch,
                    step,
                    loss,
                    global_samples: outcome.global_samples,
                    lr,
                    step_seconds: started.elapsed().as_secs_f64(),
                    placement_version: model.moe().map_or(0, |m| m.placement().version),
                    expert_load: outcome.expert_load,
                    samples,
                })?;
                let every = cfg.checkpoint.every_steps;
                if every > 0 && step.is_multiple_of(every) && !max_steps_reached(step) {
                    hooks.checkpoint(model, opt.as_ref(), epoch, step)?;
                    last_checkpoint = Some(step);
                }
                if ev.enabled()
                    && ev.every_steps > 0
                    && step.is_multiple_of(ev.every_steps)
                    && !max_steps_reached(step)
                {
                    hooks.evaluate(model, epoch, step)?;
                    last_eval = Some(step);
                }
                if cfg.moe.rebalance && coll.world_size() > 1 {
                    switch_placement_if_offered(cfg, model, opt, hooks, coll, step)?;
                }
                if max_steps_reached(step) {
                    break 'epochs;
                }
            }
        }
        if steps_per_epoch.is_none() && !partial_epoch {
            steps_per_epoch = Some(steps_this_epoch);
        }
        epoch += 1;
        summary.epochs_completed += 1;
    }
    if let Some((loss, at_epoch, at_step)) = last_loss {
        let loss = loss.double_value(&[0]);
        check_finite(loss, at_epoch, at_step)?;
        summary.last_loss = Some(loss);
    }
    // The final state, unless the last periodic checkpoint (or the one resumed from, when
    // nothing was left to train) already holds it.
    if last_checkpoint != Some(step) {
        hooks.checkpoint(model, opt.as_ref(), epoch, step)?;
    }
    // The trained model, unless the last round already measured it.
    if ev.enabled() && last_eval != Some(step) {
        hooks.evaluate(model, epoch, step)?;
    }
    Ok(summary)
}

/// A loss that is not a number stops training (seen when it is read: at a logged step, or
/// the last).
fn check_finite(loss: f64, epoch: u32, step: u64) -> Result<()> {
    if !loss.is_finite() {
        bail!("loss became {loss} at step {step} (epoch {epoch})");
    }
    Ok(())
}

/// Every rank's sample ids of one step (`common::audit::sample_id`).
pub struct StepIds {
    /// `[a0, b0, a1, b1, …]`, in rank order.
    pub flat: Vec<i64>,
    /// How many samples each rank has in `flat`.
    pub counts: Vec<i64>,
}

impl StepIds {
    /// Rank `rank`'s sample ids.
    pub fn of_rank(&self, rank: usize) -> Vec<[i64; 2]> {
        let start: i64 = self.counts[..rank].iter().sum();
        let end = start + self.counts[rank];
        self.flat[2 * start as usize..2 * end as usize]
            .chunks_exact(2)
            .map(|p| [p[0], p[1]])
            .collect()
    }
}

/// Every rank's sample ids of this step.
fn gather_sample_ids(coll: &dyn Collective, samples: &[SampleRef]) -> Result<StepIds> {
    let flat: Vec<i64> = samples
        .iter()
        .flat_map(|s| contrail_common::audit::sample_id(&s.shard, &s.key))
        .collect();
    let rows = flat.len() as i64 / 2;
    let counts = all_gather_counts(coll, rows)?;
    let local = Tensor::from_slice(&flat).view([rows, 2]);
    let all = coll
        .all_gather(&local, &counts)
        .context("gathering the step's sample ids")?;
    let flat = Vec::<i64>::try_from(all.flatten(0, -1)).context("reading the sample ids")?;
    Ok(StepIds { flat, counts })
}

/// Between steps: every rank learns from rank 0 whether the coordinator adopted a newer
/// expert placement, and if so all move their experts to it now.
fn switch_placement_if_offered(
    cfg: &JobConfig,
    model: &mut ContrastiveModel,
    opt: &mut Box<dyn Optimizer>,
    hooks: &mut dyn TrainHooks,
    coll: &dyn Collective,
    step: u64,
) -> Result<()> {
    let Some(rt) = model.moe() else {
        return Ok(());
    };
    let offer = if coll.rank() == 0 {
        hooks.offered_placement()
    } else {
        None
    };
    let Some(placement) = agree_on_placement(rt, offer, coll)? else {
        return Ok(());
    };
    let (from, to) = (rt.placement().version, placement.version);
    move_experts(model, opt, placement, &cfg.optim, &mut |p| {
        hooks.build_model(p)
    })
    .with_context(|| format!("moving the experts to placement v{to} after step {step}"))?;
    if coll.rank() == 0 {
        println!("expert placement v{from} -> v{to} after step {step}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::local::LocalGroup;
    use std::time::Duration;

    /// Hands out a fixed list of local batch sizes per epoch.
    struct Sizes(std::vec::IntoIter<i64>, i64);
    impl BatchSource for Sizes {
        fn next_batch(&mut self) -> Result<Option<LocalBatch>> {
            Ok(self.0.next().map(|b| {
                let v = Tensor::rand([b, 3, self.1, self.1], (tch::Kind::Float, tch::Device::Cpu));
                LocalBatch {
                    images: v.shallow_clone(),
                    pair: v.flip([3]),
                    samples: Vec::new(),
                }
            }))
        }
    }

    #[derive(Default)]
    struct Record {
        sizes: Vec<i64>,
        steps: Vec<(u32, u64, i64)>,
        checkpoints: Vec<u64>,
        evaluations: Vec<(u32, u64)>,
        lrs: Vec<f64>,
        manifest_samples: Option<u64>,
    }
    impl TrainHooks for Record {
        fn epoch_source(&mut self, _epoch: u32) -> Result<Box<dyn BatchSource>> {
            Ok(Box::new(Sizes(self.sizes.clone().into_iter(), 8)))
        }
        fn after_step(&mut self, ev: &StepEvent) -> Result<()> {
            self.steps.push((ev.epoch, ev.step, ev.global_samples));
            self.lrs.push(ev.lr);
            Ok(())
        }
        fn dataset_samples(&self) -> Option<u64> {
            self.manifest_samples
        }
        fn checkpoint(
            &mut self,
            _: &ContrastiveModel,
            _: &dyn Optimizer,
            _: u32,
            step: u64,
        ) -> Result<()> {
            self.checkpoints.push(step);
            Ok(())
        }
        fn stop_reason(&self) -> Option<String> {
            None
        }
        fn evaluate(&mut self, _: &ContrastiveModel, epoch: u32, step: u64) -> Result<()> {
            self.evaluations.push((epoch, step));
            Ok(())
        }
    }

    /// Trains `cfg` from `start` on one rank of `coll`, reading batches of `sizes` each epoch;
    /// returns the summary and what the hooks saw.
    fn train_rank(
        cfg: &JobConfig,
        coll: &dyn Collective,
        sizes: &[i64],
        start: StartPoint,
    ) -> (TrainSummary, Record) {
        tch::manual_seed(0);
        let mut model =
            ContrastiveModel::build(cfg, tch::Device::Cpu, crate::model::BuildOptions::default())
                .unwrap();
        let mut opt = model.optimizer(&cfg.optim);
        let mut hooks = Record {
            sizes: sizes.to_vec(),
            ..Default::default()
        };
        let mut objective = crate::objective::build_objective(cfg);
        let summary = train(
            cfg,
            &mut model,
            &mut opt,
            objective.as_mut(),
            coll,
            &mut hooks,
            start,
        )
        .unwrap();
        (summary, hooks)
    }

    /// Trains `cfg` on one thread per rank (in-process collective), rank r reading batches of
    /// the sizes `per_rank[r]` each epoch; returns what each rank's hooks saw.
    fn train_ranks(cfg: &JobConfig, per_rank: &[Vec<i64>]) -> Vec<Record> {
        let group = LocalGroup::with_timeout(per_rank.len(), Duration::from_secs(30));
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .zip(per_rank)
                .map(|(coll, sizes)| {
                    s.spawn(move || {
                        let (summary, hooks) = train_rank(cfg, &coll, sizes, StartPoint::default());
                        assert_eq!(summary.epochs_completed, cfg.train.epochs);
                        hooks
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn tiny_config(world: u32) -> JobConfig {
        let mut cfg = JobConfig::default();
        cfg.cluster.world_size = world;
        cfg.train.micro_batch = 4;
        cfg.train.global_batch = 4 * u64::from(world);
        cfg.train.epochs = 2;
        cfg.data.image_size = 8;
        cfg.model.layers = vec![1];
        cfg.model.width = 8;
        cfg.model.projector_hidden = 16;
        cfg.model.projector_out = 8;
        cfg.checkpoint.every_steps = 2;
        cfg
    }

    /// With the dataset's size known up front the cosine decays from the first epoch on
    /// (ceil(10 / 4) = 3 steps per epoch, 6 in all); without it the rate holds its peak until
    /// an epoch was seen whole, then follows the same curve.
    #[test]
    fn the_schedule_spans_the_run_from_step_0_when_the_dataset_size_is_known() {
        let mut cfg = tiny_config(1);
        cfg.optim.warmup_steps = 0;
        let coll = LocalGroup::new(1).remove(0);
        let run = |manifest: Option<u64>| {
            tch::manual_seed(0);
            let mut model = ContrastiveModel::build(
                &cfg,
                tch::Device::Cpu,
                crate::model::BuildOptions::default(),
            )
            .unwrap();
            let mut opt = model.optimizer(&cfg.optim);
            let mut hooks = Record {
                sizes: vec![4, 4, 2],
                manifest_samples: manifest,
                ..Default::default()
            };
            let mut objective = crate::objective::build_objective(&cfg);
            let start = StartPoint::default();
            train(
                &cfg,
                &mut model,
                &mut opt,
                objective.as_mut(),
                &coll,
                &mut hooks,
                start,
            )
            .unwrap();
            hooks.lrs
        };
        let peak = scaled_peak_lr(&cfg.optim, cfg.train.global_batch);
        let known = run(Some(10));
        let want: Vec<f64> = (0..6).map(|s| lr_at(s, 6, peak, 0)).collect();
        assert_eq!(known, want);
        assert!(known[1] < known[0] && known[2] < known[1], "{known:?}");
        let unknown = run(None);
        assert_eq!(unknown[..3], [peak; 3]);
        assert_eq!(unknown[3..], want[3..]);
    }

    /// Rank 0 has three batches per epoch (the last one partial), rank 1 only one: both ranks
    /// run the same three steps, the epoch ends together, and every sample is trained once.
    #[test]
    fn uneven_data_ends_the_epoch_together_without_dropping_samples() {
        let cfg = tiny_config(2);
        let per_rank = [vec![4i64, 4, 2], vec![3i64]];
        let results = train_ranks(&cfg, &per_rank);
        let expected: Vec<(u32, u64, i64)> = vec![
            (0, 1, 4 + 3),
            (0, 2, 4),
            (0, 3, 2),
            (1, 4, 4 + 3),
            (1, 5, 4),
            (1, 6, 2),
        ];
        for (rank, r) in results.iter().enumerate() {
            assert_eq!(r.steps, expected, "rank {rank}");
            // every_steps = 2; the final state is step 6, already written.
            assert_eq!(r.checkpoints, vec![2, 4, 6], "rank {rank}");
        }
    }

    /// With K = 2 micro-batches per step, each step takes two batches from every rank that
    /// still has them; the epoch ends together as before.
    #[test]
    fn accumulation_takes_k_micro_batches_per_step() {
        let mut cfg = tiny_config(2);
        cfg.train.global_batch = 16; // 2 ranks × micro_batch 4 × K 2
        cfg.model.norm = contrail_common::config::NormKind::Group;
        cfg.model.projector_hidden = 64;
        let per_rank = [vec![4i64, 4, 4, 2], vec![3i64]];
        let results = train_ranks(&cfg, &per_rank);
        let expected: Vec<(u32, u64, i64)> =
            vec![(0, 1, 8 + 3), (0, 2, 6), (1, 3, 8 + 3), (1, 4, 6)];
        for (rank, r) in results.iter().enumerate() {
            assert_eq!(r.steps, expected, "rank {rank}");
        }
    }

    #[test]
    fn max_steps_stops_mid_epoch() {
        let mut cfg = tiny_config(1);
        cfg.train.max_steps = 2;
        let coll = LocalGroup::new(1).pop().unwrap();
        let (summary, hooks) = train_rank(&cfg, &coll, &[4, 4, 4], StartPoint::default());
        assert_eq!(summary.steps, 2);
        assert_eq!(summary.epochs_completed, 0);
        assert_eq!(hooks.steps.len(), 2);
        // The regular checkpoint at step 2 is skipped in favour of the final one.
        assert_eq!(hooks.checkpoints, vec![2]);
    }

    /// Resuming from a checkpoint that already reached max_steps trains nothing and does not
    /// write that checkpoint again.
    #[test]
    fn resuming_a_finished_job_trains_and_writes_nothing() {
        let mut cfg = tiny_config(1);
        cfg.train.max_steps = 2;
        let coll = LocalGroup::new(1).pop().unwrap();
        let (summary, hooks) =
            train_rank(&cfg, &coll, &[4, 4, 4], StartPoint { epoch: 0, step: 2 });
        assert_eq!(summary.steps, 0);
        assert!(hooks.steps.is_empty());
        assert!(hooks.checkpoints.is_empty(), "{:?}", hooks.checkpoints);
    }

    /// Online evaluation runs before the first step, every `every_steps` and once more at
    /// the end (not twice when the last periodic round already measured the final model),
    /// on every rank at the same steps; without `[eval]` never.
    #[test]
    fn evaluations_run_at_start_periodically_and_at_the_end() {
        let mut cfg = tiny_config(2);
        cfg.eval.url = "memory://held-out".into();
        cfg.eval.every_steps = 2;
        cfg.eval.k = 1;
        // 3 steps per epoch, 2 epochs: rounds at 0, 2, 4 and the final 6 (also a multiple).
        let results = train_ranks(&cfg, &[vec![4, 4, 2], vec![3]]);
        for r in &results {
            assert_eq!(r.evaluations, vec![(0, 0), (0, 2), (1, 4), (1, 6)]);
        }
        cfg.eval.every_steps = 4;
        cfg.eval.at_start = false;
        let results = train_ranks(&cfg, &[vec![4, 4, 2], vec![3]]);
        // The epoch counter has moved past the last epoch when the final round runs.
        assert_eq!(results[0].evaluations, vec![(1, 4), (2, 6)]);
        cfg.eval.url.clear();
        let results = train_ranks(&cfg, &[vec![4, 4, 2], vec![3]]);
        assert!(results[0].evaluations.is_empty());
    }
}
