//! Exactly-once bookkeeping of an epoch (with `cluster.min_workers`, where survivors of a
//! failure go on):
//!
//! - [`TrainedSet`]: every sample of the epoch trained in a committed step, by every rank. The
//!   ranks gather each step's sample ids before the step and record them once it committed, so
//!   every survivor knows what a dead rank trained; after a regroup the most advanced
//!   survivor's set is everyone's (`recovery`). A shard leased again skips those samples.
//! - [`OpenShards`]: this rank's leased shards. A shard is reported complete only when every
//!   sample the pipeline took from it was trained in a committed step, so a shard whose
//!   samples were still prefetched (or in the failed step) at a failure goes back to the pool
//!   and its untrained samples are trained later, once.

use super::client::Coordinator;
use contrail_common::audit::{sample_id, SampleRef};
use contrail_data::pipeline::ShardReport;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// The samples of one epoch trained in committed steps (128-bit ids of (shard, key)).
#[derive(Default)]
pub struct TrainedSet {
    epoch: u32,
    ids: HashSet<(i64, i64)>,
}

impl TrainedSet {
    /// Adds the ids of a committed step of `epoch` (a new epoch starts an empty set).
    pub fn record(&mut self, epoch: u32, ids: &[i64]) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.ids.clear();
        }
        self.ids.extend(ids.chunks_exact(2).map(|p| (p[0], p[1])));
    }

    pub fn contains(&self, epoch: u32, shard: &str, key: &str) -> bool {
        let [a, b] = sample_id(shard, key);
        epoch == self.epoch && self.ids.contains(&(a, b))
    }

    /// (epoch, flat ids) to send to the other ranks.
    pub fn export(&self) -> (u32, Vec<i64>) {
        let mut flat = Vec::with_capacity(self.ids.len() * 2);
        for (a, b) in &self.ids {
            flat.extend([*a, *b]);
        }
        (self.epoch, flat)
    }

    /// Replaces the set with another rank's.
    pub fn replace(&mut self, epoch: u32, ids: &[i64]) {
        self.epoch = epoch;
        self.ids = ids.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    }
}

/// A shard this rank leased, until it is reported complete.
struct OpenShard {
    lease_id: u64,
    /// Set when reading failed after all retries: the shard is reported failed.
    error: String,
    /// The pipeline's final counts, once every sample of the shard has left it.
    report: Option<ShardReport>,
    /// Samples of the shard trained in committed steps so far.
    trained: u64,
    /// The latest committed step that trained one of its samples.
    last_step: u64,
}

/// This rank's open leases of one epoch, shared by the reader (which opens them), the feed
/// (which receives the pipeline's reports) and the step hook (which counts trained samples).
pub struct OpenShards {
    rt: tokio::runtime::Handle,
    coord: Coordinator,
    open: Mutex<HashMap<String, OpenShard>>,
}

impl OpenShards {
    pub fn new(rt: tokio::runtime::Handle, coord: Coordinator) -> Self {
        Self {
            rt,
            coord,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn opened(&self, shard: &str, lease_id: u64) {
        self.lock().insert(
            shard.to_string(),
            OpenShard {
                lease_id,
                error: String::new(),
                report: None,
                trained: 0,
                last_step: 0,
            },
        );
    }

    pub fn failed(&self, shard: &str, error: String) {
        if let Some(s) = self.lock().get_mut(shard) {
            s.error = error;
        }
    }

    /// The pipeline is done with `report.shard`.
    pub fn reported(&self, report: ShardReport) {
        let shard = report.shard.clone();
        match self.lock().get_mut(&shard) {
            Some(s) => s.report = Some(report),
            None => {
                tracing::warn!("pipeline reported shard {shard} that this worker never leased");
                return;
            }
        }
        self.complete_if_trained(&shard);
    }

    /// Committed step `step` trained `samples` on this rank.
    pub fn trained(&self, samples: &[SampleRef], step: u64) {
        let mut touched: HashMap<&str, u64> = HashMap::new();
        for s in samples {
            *touched.entry(s.shard.as_str()).or_default() += 1;
        }
        {
            let mut open = self.lock();
            for (shard, n) in &touched {
                if let Some(s) = open.get_mut(*shard) {
                    s.trained += n;
                    s.last_step = s.last_step.max(step);
                }
            }
        }
        for shard in touched.keys() {
            self.complete_if_trained(shard);
        }
    }

    /// Reports `shard` complete once the pipeline is done with it and all its samples that
    /// went into batches were trained.
    fn complete_if_trained(&self, shard: &str) {
        let done = {
            let mut open = self.lock();
            let ready = open
                .get(shard)
                .and_then(|s| s.report.as_ref().map(|r| s.trained >= r.good))
                .unwrap_or(false);
            if ready {
                open.remove(shard)
            } else {
                None
            }
        };
        let Some(s) = done else { return };
        let report = s.report.expect("checked above");
        let mut coord = self.coord.clone();
        self.rt.spawn(async move {
            if let Err(e) = coord
                .complete_shard(s.lease_id, report.good, report.bad, s.error, s.last_step)
                .await
            {
                tracing::warn!("could not report shard {} complete: {e:#}", report.shard);
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OpenShard>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}
