//! Training progress from ReportStep: step, loss, throughput and the ETA.
//!
//! Every rank reports every step; the step is the highest reported, while loss, learning rate
//! and sample counts come from rank 0 only (its loss is already the global loss, and counting
//! `global_samples` once per step keeps `samples_seen` exact).

use contrail_common::config::TrainConfig;
use contrail_common::status::EvalPoint;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Steps kept for the throughput estimate: long enough to smooth per-step noise, short enough
/// to follow a change in speed within a minute.
const RATE_WINDOW: usize = 20;
/// Bound on `loss_history`; older points are thinned, never the newest.
pub const LOSS_HISTORY_CAP: usize = 512;

#[derive(Debug, Clone, Copy)]
struct StepSample {
    step: u64,
    at_ms: u64,
    samples: u64,
    seconds: f64,
}

/// (step, loss) pairs over the whole run in bounded memory: when full, every other point is
/// dropped and only every `stride`-th new point is kept from then on.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LossHistory {
    points: Vec<(u64, f64)>,
    stride: u64,
    since_kept: u64,
}

impl LossHistory {
    pub fn push(&mut self, step: u64, loss: f64) {
        let stride = self.stride.max(1);
        self.since_kept += 1;
        if self.since_kept < stride && !self.points.is_empty() {
            return;
        }
        self.since_kept = 0;
        self.points.push((step, loss));
        if self.points.len() > LOSS_HISTORY_CAP {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride = stride * 2;
        }
    }

    pub fn points(&self) -> &[(u64, f64)] {
        &self.points
    }
}

/// A duration a worker reported, as a usable number: negative or non-finite ones count as 0.
pub fn reported_seconds(s: f64) -> f64 {
    if s.is_finite() {
        s.max(0.0)
    } else {
        0.0
    }
}

/// Bound on the evaluation history; past it the oldest rounds after the first are dropped
/// (the first is the baseline a run is compared with).
pub const EVAL_HISTORY_CAP: usize = 1024;

/// Rounds of online evaluation in the order they were reported.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EvalHistory {
    points: Vec<EvalPoint>,
}

impl EvalHistory {
    /// Records a round; a repeated report of a step (a retried RPC) replaces the earlier one.
    pub fn push(&mut self, point: EvalPoint) {
        if let Some(last) = self.points.last_mut() {
            if last.step == point.step {
                *last = point;
                return;
            }
        }
        self.points.push(point);
        if self.points.len() > EVAL_HISTORY_CAP {
            self.points.remove(1);
        }
    }

    pub fn points(&self) -> &[EvalPoint] {
        &self.points
    }
}

/// Journaled without the throughput window (its times belong to the coordinator that
/// measured them).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JobProgress {
    pub step: u64,
    pub epoch: u32,
    pub samples_seen: u64,
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    /// Highest step whose samples were counted (reports may repeat after a retry).
    counted_step: u64,
    #[serde(skip)]
    window: VecDeque<StepSample>,
    pub loss_history: LossHistory,
    pub eval_history: EvalHistory,
    /// First step reported in each epoch, to measure steps per epoch.
    epoch_first_step: BTreeMap<u32, u64>,
    /// The epoch of the first report this coordinator saw; its first step is not the epoch's
    /// real first step when the job resumed mid-epoch.
    first_seen_epoch: Option<u32>,
}

impl JobProgress {
    /// Starts from a checkpoint's step, epoch and sample count (all zero for a fresh job).
    pub fn resumed(step: u64, epoch: u32, samples_seen: u64) -> Self {
        Self {
            step,
            epoch,
            samples_seen,
            counted_step: step,
            ..Default::default()
        }
    }

    /// Back to a checkpoint's step, epoch and sample count (an automatic rollback); the loss
    /// and evaluation histories stay.
    pub fn roll_back(&mut self, step: u64, epoch: u32, samples_seen: u64) {
        self.step = step;
        self.epoch = epoch;
        self.samples_seen = samples_seen;
        self.counted_step = step;
        self.window.clear();
    }

    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &mut self,
        rank: u32,
        epoch: u32,
        step: u64,
        loss: Option<f64>,
        global_samples: u64,
        learning_rate: f64,
        step_seconds: f64,
        now_ms: u64,
    ) {
        self.step = self.step.max(step);
        self.epoch = self.epoch.max(epoch);
        self.first_seen_epoch.get_or_insert(epoch);
        let first = self.epoch_first_step.entry(epoch).or_insert(step);
        *first = (*first).min(step);
        if rank != 0 || step <= self.counted_step {
            return;
        }
        self.counted_step = step;
        self.samples_seen += global_samples;
        // Workers read the loss back only every train.log_every steps.
        if let Some(loss) = loss {
            self.loss = Some(loss);
            // A NaN loss is worth seeing in the status, but it must not poison the history.
            if loss.is_finite() {
                self.loss_history.push(step, loss);
            }
        }
        self.learning_rate = Some(learning_rate);
        self.window.push_back(StepSample {
            step,
            at_ms: now_ms,
            samples: global_samples,
            seconds: reported_seconds(step_seconds),
        });
        while self.window.len() > RATE_WINDOW {
            self.window.pop_front();
        }
    }

    /// Seconds per step over the recent window: the workers' own step timings when they sent
    /// them, else the coordinator's clock between reports.
    fn seconds_per_step(&self) -> Option<f64> {
        let n = self.window.len();
        let reported: f64 = self.window.iter().map(|s| s.seconds).sum();
        if n > 0 && reported > 0.0 {
            return Some(reported / n as f64);
        }
        let (first, last) = (self.window.front()?, self.window.back()?);
        let steps = last.step.saturating_sub(first.step);
        (steps > 0 && last.at_ms > first.at_ms)
            .then(|| (last.at_ms - first.at_ms) as f64 / 1000.0 / steps as f64)
    }

    pub fn samples_per_sec(&self) -> Option<f64> {
        let spp = self.seconds_per_step()?;
        let n = self.window.len() as f64;
        let samples: u64 = self.window.iter().map(|s| s.samples).sum();
        (spp > 0.0).then(|| samples as f64 / n / spp)
    }

    /// Steps per epoch measured from two consecutive epoch starts this coordinator saw.
    fn measured_steps_per_epoch(&self) -> Option<u64> {
        let first_seen = self.first_seen_epoch?;
        self.epoch_first_step
            .iter()
            .rev()
            .zip(self.epoch_first_step.iter().rev().skip(1))
            .find(|((e_next, _), (e, _))| **e > first_seen && **e_next == **e + 1)
            .map(|((_, s_next), (_, s))| s_next - s)
    }

    /// Total steps of the job: `train.max_steps` when set (capped by the epochs), else
    /// epochs × steps per epoch, measured or from the dataset size (`dataset_samples`).
    pub fn total_steps_estimate(
        &self,
        train: &TrainConfig,
        dataset_samples: Option<u64>,
    ) -> Option<u64> {
        let per_epoch = self.measured_steps_per_epoch().or_else(|| {
            let samples = dataset_samples?;
            // Workers train the last partial batch too (the epoch ends when every rank is
            // empty), so at least ceil(samples / global_batch) steps; uneven tails add a few.
            Some(samples.div_ceil(train.global_batch.max(1)).max(1))
        });
        let by_epochs = per_epoch
            .map(|p| p * u64::from(train.epochs))
            .filter(|_| train.epochs > 0);
        let total = match (train.max_steps, by_epochs) {
            (0, b) => b,
            (m, Some(b)) => Some(m.min(b)),
            (m, None) => Some(m),
        }?;
        Some(total.max(self.step))
    }

    pub fn eta_seconds(&self, total_steps: Option<u64>) -> Option<f64> {
        let remaining = total_steps?.saturating_sub(self.step);
        Some(remaining as f64 * self.seconds_per_step()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(global_batch: u64, epochs: u32, max_steps: u64) -> TrainConfig {
        TrainConfig {
            global_batch,
            micro_batch: global_batch,
            epochs,
            max_steps,
            ..Default::default()
        }
    }

    #[test]
    fn step_is_the_max_and_samples_come_from_rank_zero_once() {
        let mut p = JobProgress::default();
        p.report(1, 0, 1, Some(9.0), 64, 0.1, 0.5, 100);
        assert_eq!((p.step, p.samples_seen, p.loss), (1, 0, None));
        p.report(0, 0, 1, Some(2.0), 64, 0.1, 0.5, 110);
        p.report(0, 0, 1, Some(2.0), 64, 0.1, 0.5, 120); // repeated report
        p.report(1, 0, 3, Some(9.0), 64, 0.1, 0.5, 130);
        assert_eq!((p.step, p.samples_seen, p.loss), (3, 64, Some(2.0)));
        p.report(0, 0, 2, Some(1.5), 64, 0.2, 0.5, 140);
        assert_eq!((p.step, p.samples_seen), (3, 128));
        assert_eq!(p.learning_rate, Some(0.2));
        // A step whose loss the workers did not read (not a logged step) keeps the latest.
        p.report(0, 0, 4, None, 64, 0.2, 0.5, 150);
        assert_eq!((p.step, p.samples_seen, p.loss), (4, 192, Some(1.5)));
        assert_eq!(p.loss_history.points().last(), Some(&(2, 1.5)));
        // 64 samples per 0.5 s step.
        assert!((p.samples_per_sec().unwrap() - 128.0).abs() < 1e-9);
    }

    #[test]
    fn wall_clock_is_used_without_step_timings() {
        let mut p = JobProgress::default();
        for s in 1..=5 {
            p.report(0, 0, s, Some(1.0), 10, 0.1, 0.0, s * 200);
        }
        // 4 steps in 800 ms → 0.2 s per step → 50 samples/s.
        assert!((p.samples_per_sec().unwrap() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn total_steps_prefers_measured_epochs_then_dataset_size() {
        let mut p = JobProgress::default();
        let t = train(10, 3, 0);
        assert_eq!(p.total_steps_estimate(&t, None), None);
        // 95 samples in batches of 10: 10 steps per epoch (the last one holds 5).
        assert_eq!(p.total_steps_estimate(&t, Some(95)), Some(30));
        // Epoch 0 is the first seen (may be partial), so epochs 1→2 give the measurement.
        p.report(0, 0, 1, Some(1.0), 10, 0.1, 1.0, 0);
        p.report(0, 1, 5, Some(1.0), 10, 0.1, 1.0, 0);
        assert_eq!(p.total_steps_estimate(&t, Some(95)), Some(30));
        p.report(0, 2, 12, Some(1.0), 10, 0.1, 1.0, 0);
        assert_eq!(p.total_steps_estimate(&t, Some(95)), Some(21));
        // 3 reports at 1 s each; 21 - 12 steps remain.
        assert_eq!(p.eta_seconds(Some(21)), Some(9.0));
        // max_steps caps the epoch estimate, and stands alone without one.
        assert_eq!(
            p.total_steps_estimate(&train(10, 3, 15), Some(95)),
            Some(15)
        );
        assert_eq!(p.total_steps_estimate(&train(10, 0, 40), None), Some(40));
    }

    #[test]
    fn loss_history_stays_bounded_and_spans_the_run() {
        let mut h = LossHistory::default();
        for s in 1..=10_000u64 {
            h.push(s, s as f64);
        }
        let pts = h.points();
        assert!(pts.len() <= LOSS_HISTORY_CAP, "{}", pts.len());
        assert!(pts.len() >= LOSS_HISTORY_CAP / 4, "{}", pts.len());
        assert_eq!(pts[0].0, 1);
        assert!(pts.last().unwrap().0 > 9_900, "{:?}", pts.last());
        assert!(pts.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn eval_history_keeps_the_baseline_and_replaces_retries() {
        let at = |step: u64, top1: f64| EvalPoint {
            step,
            knn_top1: Some(top1),
            ..Default::default()
        };
        let mut h = EvalHistory::default();
        h.push(at(0, 0.1));
        h.push(at(10, 0.2));
        h.push(at(10, 0.3));
        assert_eq!(h.points().len(), 2);
        assert_eq!(h.points()[1].knn_top1, Some(0.3));
        for s in 2..5000u64 {
            h.push(at(s * 10, 0.5));
        }
        assert_eq!(h.points().len(), EVAL_HISTORY_CAP);
        assert_eq!(h.points()[0].step, 0);
        assert_eq!(h.points().last().unwrap().step, 49_990);
    }
}
