//! The coordinator's status report: served as JSON at `GET /status`, read back by
//! `contrail status`, and rendered for people by [`text::render_status_text`] (the
//! coordinator prints it when a job ends, `contrail status` on every refresh).

pub mod text;

pub use text::{node_count, render_status_text};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Where the job is in its life. Serialized in snake_case (`"waiting_for_workers"`, ...).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Fewer than `cluster.world_size` workers have registered.
    #[default]
    WaitingForWorkers,
    Running,
    /// Every worker left after finishing.
    Finished,
    /// A worker died or reported an error; `StatusReport::reason` says which.
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::WaitingForWorkers => "waiting_for_workers",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
        }
    }

    /// Finished or failed: nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Finished | JobState::Failed)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Liveness of one worker as the coordinator sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerLiveness {
    Alive,
    /// Silent for longer than `cluster.worker_timeout_ms`.
    Dead,
    /// Sent Leave (finished or with an error).
    Left,
}

impl WorkerLiveness {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerLiveness::Alive => "alive",
            WorkerLiveness::Dead => "dead",
            WorkerLiveness::Left => "left",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: u64,
    /// None until the rendezvous completes.
    pub rank: Option<u32>,
    /// The node worker it runs under (`contrail worker --local-ranks N`); its ranks are
    /// contiguous and leave together.
    #[serde(default)]
    pub node: String,
    /// Its index on that node (0 .. N - 1).
    #[serde(default)]
    pub local_rank: u32,
    pub host: String,
    /// The worker's collective address (host:port).
    pub address: String,
    pub state: WorkerLiveness,
    /// Milliseconds since the coordinator last heard from this worker.
    pub last_heartbeat_ms: u64,
    /// URL of the shard the worker most recently leased and still holds, or "".
    pub shard: String,
    pub step: u64,
}

/// Shard counts of one epoch; `pending + leased + done + failed == total`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardCounts {
    pub total: u64,
    pub pending: u64,
    pub leased: u64,
    pub done: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub state: JobState,
    /// Why the job failed (names the rank and address), or "" while it is healthy.
    pub reason: String,
    pub generation: u64,
    pub world_size: u32,
    pub epoch: u32,
    /// Optimizer steps completed (the highest step any rank reported).
    pub step: u64,
    /// Steps the whole job will take; None until it can be estimated (no shard finished yet).
    pub total_steps_estimate: Option<u64>,
    pub samples_seen: u64,
    /// Rank 0's loss at the latest step; None before the first step.
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub samples_per_sec: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// Seconds since the coordinator started.
    pub uptime_seconds: f64,
    pub workers: Vec<WorkerStatus>,
    /// Shards of the current epoch.
    pub shards: ShardCounts,
    /// Samples skipped as bad input since the job started, by reason.
    pub bad_samples: BTreeMap<String, u64>,
    /// Recent (step, loss) pairs, thinned evenly so the whole run fits in a bounded list.
    pub loss_history: Vec<(u64, f64)>,
    /// Mixture-of-experts routing and placement; None when MoE is off.
    #[serde(default)]
    pub experts: Option<ExpertStatus>,
    /// Rounds of online evaluation (`[eval]`), oldest first; empty when it is off.
    #[serde(default)]
    pub eval_history: Vec<EvalPoint>,
    /// Automatic rollbacks to the latest checkpoint (an MoE worker died), oldest first.
    #[serde(default)]
    pub rollbacks: Vec<String>,
    /// The coordinator's journal writes; None without a journal.
    #[serde(default)]
    pub journal: Option<JournalStatus>,
}

/// What writing the coordinator's journal has cost so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JournalStatus {
    /// Writes: snapshots of the whole book and deltas of the lease book's changes.
    pub writes: u64,
    /// Size of the latest write.
    pub last_write_bytes: u64,
    /// Of the writes, those of the whole book, and the latest one's size.
    #[serde(default)]
    pub snapshots: u64,
    #[serde(default)]
    pub last_snapshot_bytes: u64,
    /// Time encoding snapshots (the RPCs wait for the books' lock meanwhile) and deltas, summed.
    pub encode_seconds_total: f64,
    /// Time writing to the store, summed, and the longest single write.
    pub write_seconds_total: f64,
    pub write_seconds_max: f64,
}

/// One round of online evaluation: held-out weighted kNN on the encoder's features, and for
/// CLIP jobs zero-shot and retrieval in the joint embedding space.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalPoint {
    /// Steps the evaluated model had trained (0: the initial model).
    pub step: u64,
    pub epoch: u32,
    /// Fractions in [0, 1]; None when the round could not vote (`error` says why).
    pub knn_top1: Option<f64>,
    pub knn_top5: Option<f64>,
    pub bank_samples: u64,
    pub test_samples: u64,
    /// Samples skipped (undecodable, unlabelled) over both sets.
    pub skipped: u64,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// CLIP jobs with `eval.classes`: zero-shot accuracy of the held-out images (fractions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeroshot_top1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeroshot_top5: Option<f64>,
    /// CLIP jobs with `eval.retrieval`: R@1 over the held-out image–caption pairs, each way,
    /// and the mean of R@1/5/10 over both directions (OpenCLIP's mean recall).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_to_text_r1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_to_image_r1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval_mean_recall: Option<f64>,
}

/// The MoE blocks' load (from rank 0's per-step router counts) and where their experts live.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExpertStatus {
    /// Version of the placement the coordinator has adopted (1 is the initial spread).
    pub placement_version: u64,
    /// The newest version rank 0 reported running with; below `placement_version` while a
    /// new placement is on its way to the workers.
    pub acknowledged_version: u64,
    /// Placements adopted after the initial one.
    pub rebalances: u64,
    /// Steps in the recent window the loads below are measured over (at most
    /// `moe.rebalance_every_steps`).
    pub window_steps: u64,
    pub blocks: Vec<ExpertBlockStatus>,
}

/// One MoE block. Fractions and ratios cover the recent window; before any report the loads
/// are empty and the ratios 1.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExpertBlockStatus {
    /// Position in model order (`ExpertLoad.block`).
    pub block: u32,
    /// Which layer it is: "vit 3", "text 0".
    pub label: String,
    /// Share of the block's assignments each expert received (sums to 1).
    pub load: Vec<f64>,
    /// max / mean of the expert loads: 1 is perfectly even routing, E means one expert took
    /// everything.
    pub load_max_mean: f64,
    /// max / mean of the expected worker loads under the current placement (an expert's load
    /// split evenly over its replicas): what a rebalance compares against its threshold.
    pub worker_load_max_mean: f64,
    /// Share of the assignments dropped for exceeding an expert's capacity.
    pub dropped_fraction: f64,
    /// Assignments (routed, before drops) in the window and since the coordinator started.
    pub window_assignments: u64,
    pub total_assignments: u64,
    /// `holders[e]`: the ranks holding a replica of expert e.
    pub holders: Vec<Vec<u32>>,
}

/// The first and the latest rounds of `history` that voted (the baseline and the newest
/// measurement), or None before any did.
pub fn voted_rounds(history: &[EvalPoint]) -> Option<(&EvalPoint, &EvalPoint)> {
    let voted = |p: &&EvalPoint| p.knn_top1.is_some();
    Some((
        history.iter().find(voted)?,
        history.iter().rev().find(voted)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_as_the_documented_strings() {
        for s in [
            JobState::WaitingForWorkers,
            JobState::Running,
            JobState::Finished,
            JobState::Failed,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(
            serde_json::to_string(&WorkerLiveness::Dead).unwrap(),
            format!("\"{}\"", WorkerLiveness::Dead.as_str())
        );
    }

    #[test]
    fn report_round_trips_through_json() {
        let mut r = StatusReport {
            state: JobState::Running,
            step: 7,
            loss: Some(1.5),
            loss_history: vec![(1, 2.0), (7, 1.5)],
            ..Default::default()
        };
        r.bad_samples.insert("decode".into(), 3);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"state\":\"running\""), "{json}");
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn report_without_experts_still_parses() {
        let mut v = serde_json::to_value(StatusReport::default()).unwrap();
        v.as_object_mut().unwrap().remove("experts").unwrap();
        let back: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back.experts, None);
        let r = StatusReport {
            experts: Some(ExpertStatus {
                placement_version: 2,
                blocks: vec![ExpertBlockStatus {
                    load: vec![0.75, 0.25],
                    holders: vec![vec![0], vec![1]],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
