//! Shard leases: which shard of which epoch is pending, leased (to whom, until when), done or
//! failed.
//!
//! Each epoch hands its shards out in `epoch_order(n, seed, epoch)`. A lease that is not
//! renewed before it expires, or whose worker dies, goes back to the *front* of the pending
//! queue so the order stays as close to the deterministic one as the failure allows. Epochs
//! are created when a worker first asks for one, so workers may run ahead into the next epoch
//! while stragglers finish the last.

use crate::error::RpcError;
use contrail_common::auth::hex;
use contrail_common::shards::{epoch_order, ShardStateSnapshot};
use contrail_common::status::ShardCounts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// One outstanding lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub epoch: u32,
    /// Index into the listed shard URLs.
    pub shard: usize,
    pub worker_id: u64,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseGrant {
    pub lease_id: u64,
    pub shard_url: String,
    pub expires_in_ms: u64,
}

/// What a CompleteShard did to the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Done,
    Failed,
    /// The shard was already finished under another lease (it expired and was read twice);
    /// its samples and bad-sample counts are not counted again.
    Duplicate,
}

/// One change to the lease book, as the journal logs it between whole snapshots (see
/// `crate::journal`). Replaying the calls in order on the snapshot's book makes the same
/// changes: every method they name depends only on the book and its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShardOp {
    /// [`ShardBook::lease`], and the lease id it granted (checked on replay).
    Lease {
        worker: u64,
        epoch: u32,
        request: u64,
        /// The coordinator's clock then (the lease's deadline is counted from it).
        at: u64,
        granted: Option<u64>,
    },
    /// [`ShardBook::complete`].
    Complete {
        worker: u64,
        lease: u64,
        samples: u64,
        #[serde(default, skip_serializing_if = "HashMap::is_empty")]
        bad: HashMap<String, u64>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        error: String,
        step: Option<u64>,
    },
    /// Leases returned to the pool (expired, or their worker died or left).
    TakeBack { ids: Vec<u64> },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct EpochShards {
    pending: VecDeque<usize>,
    /// shard index → lease id
    leased: BTreeMap<usize, u64>,
    /// shard index → samples read
    done: BTreeMap<usize, u64>,
    /// shard index → the committed step that trained its last sample (absent: unknown, e.g.
    /// done before a resume)
    #[serde(default)]
    done_at_step: BTreeMap<usize, u64>,
    /// shard index → read error
    failed: BTreeMap<usize, String>,
}

impl EpochShards {
    fn is_finished(&self, shard: usize) -> bool {
        self.done.contains_key(&shard) || self.failed.contains_key(&shard)
    }
}

/// Journaled (see `crate::journal`) without its shard URLs: at 100,000 shards they were
/// most of every journal write. A recovered book takes them from the dataset's listing again,
/// which must match `urls_digest`.
#[derive(Serialize, Deserialize)]
pub struct ShardBook {
    #[serde(skip)]
    urls: Vec<String>,
    num_urls: usize,
    /// SHA-256 of the URL list, in hex.
    urls_digest: String,
    seed: u64,
    lease_ttl_ms: u64,
    epochs: BTreeMap<u32, EpochShards>,
    /// Live leases by id.
    leases: HashMap<u64, Lease>,
    /// Leases that expired or were taken back, kept so a late CompleteShard can still be
    /// matched to its shard (the worker may have read it all just after the deadline).
    orphaned: HashMap<u64, Lease>,
    next_lease_id: u64,
    /// Shard state of the checkpoint being resumed; applied when its epoch is created.
    resume: Option<ShardStateSnapshot>,
    bad_samples: BTreeMap<String, u64>,
    /// worker id → (request id, lease id) of its latest grant: a lease request repeated
    /// after its reply was lost gets the same lease.
    #[serde(default)]
    granted: HashMap<u64, (u64, u64)>,
    /// Epochs below this were finished and dropped from the books (see `epoch_mut`).
    #[serde(default)]
    dropped_below: u32,
    /// Samples of the newest dropped epoch that finished every shard (for `dataset_samples`).
    #[serde(default)]
    dropped_full_samples: Option<u64>,
    /// Changes since the journal last wrote the book (see [`ShardBook::take_log`]).
    #[serde(skip)]
    log: Vec<ShardOp>,
    /// worker id → until when its heartbeats keep its leases alive (a lease expires once both
    /// its own deadline and this have passed): a heartbeat is one insert, not a pass over
    /// every lease. Not journaled: a restarted clock gives every lease a full TTL anyway.
    #[serde(skip)]
    renewed: HashMap<u64, u64>,
}

impl ShardBook {
    pub fn new(
        urls: Vec<String>,
        seed: u64,
        lease_ttl_ms: u64,
        resume: Option<ShardStateSnapshot>,
    ) -> Self {
        let bad_samples = resume
            .as_ref()
            .map(|r| r.bad_samples.clone())
            .unwrap_or_default();
        Self {
            num_urls: urls.len(),
            urls_digest: digest(&urls),
            urls,
            seed,
            lease_ttl_ms,
            epochs: BTreeMap::new(),
            leases: HashMap::new(),
            orphaned: HashMap::new(),
            next_lease_id: 1,
            resume,
            bad_samples,
            granted: HashMap::new(),
            dropped_below: 0,
            dropped_full_samples: None,
            log: Vec::new(),
            renewed: HashMap::new(),
        }
    }

    /// The shard URLs the book indexes into.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Gives a book read from the journal its shard URLs back: `listed` must be the list the
    /// book was made with.
    pub fn attach_urls(&mut self, listed: Vec<String>) -> Result<(), String> {
        if listed.len() != self.num_urls || digest(&listed) != self.urls_digest {
            return Err(format!(
                "data.url now lists {} shards{}, not the {} the journal was written with",
                listed.len(),
                if listed.len() == self.num_urls {
                    " with other names"
                } else {
                    ""
                },
                self.num_urls
            ));
        }
        self.urls = listed;
        Ok(())
    }

    /// A restarted coordinator's clock starts again: every live lease gets a full TTL.
    pub fn restart_clock(&mut self, now_ms: u64) {
        self.renewed.clear();
        for l in self.leases.values_mut() {
            l.expires_at_ms = now_ms + self.lease_ttl_ms;
        }
    }

    pub fn num_shards(&self) -> usize {
        self.urls.len()
    }

    pub fn url(&self, shard: usize) -> &str {
        &self.urls[shard]
    }

    /// The highest epoch any worker has asked for.
    pub fn latest_epoch(&self) -> Option<u32> {
        self.epochs.keys().next_back().copied()
    }

    pub fn bad_samples(&self) -> &BTreeMap<String, u64> {
        &self.bad_samples
    }

    /// The books of `epoch`, created on first use. Creating epoch E drops the finished books
    /// of epochs before E - 1: no rank leases or checkpoints in them any more (ranks reach E
    /// only once E - 1's pool is empty), and kept forever they would grow the journal by the
    /// whole dataset every epoch. None for an epoch already dropped.
    fn epoch_mut(&mut self, epoch: u32) -> Option<&mut EpochShards> {
        if epoch < self.dropped_below {
            return None;
        }
        if !self.epochs.contains_key(&epoch) {
            let book = self.create_epoch(epoch);
            self.epochs.insert(epoch, book);
            self.drop_epochs_before(epoch.saturating_sub(1));
        }
        self.epochs.get_mut(&epoch)
    }

    fn drop_epochs_before(&mut self, keep_from: u32) {
        let n = self.urls.len();
        while let Some(entry) = self.epochs.first_entry() {
            let (e, book) = (*entry.key(), entry.get());
            if e >= keep_from || !book.pending.is_empty() || !book.leased.is_empty() {
                break;
            }
            if book.done.len() + book.failed.len() == n && n > 0 {
                self.dropped_full_samples = Some(book.done.values().sum());
            }
            entry.remove();
            self.orphaned.retain(|_, l| l.epoch != e);
            self.dropped_below = e + 1;
        }
    }

    fn create_epoch(&self, epoch: u32) -> EpochShards {
        let mut book = EpochShards::default();
        if let Some(snap) = self.resume.as_ref().filter(|s| s.epoch == epoch) {
            let index: HashMap<&str, usize> = self
                .urls
                .iter()
                .enumerate()
                .map(|(i, u)| (u.as_str(), i))
                .collect();
            for (url, samples) in &snap.done {
                match index.get(url.as_str()) {
                    Some(&i) => {
                        book.done.insert(i, *samples);
                    }
                    None => tracing::warn!(
                        shard = %url,
                        epoch,
                        "checkpoint lists a finished shard that data.url no longer lists; ignoring it"
                    ),
                }
            }
            for (url, error) in &snap.failed {
                if let Some(&i) = index.get(url.as_str()) {
                    book.failed.insert(i, error.clone());
                }
            }
        }
        book.pending = epoch_order(self.urls.len(), self.seed, epoch)
            .into_iter()
            .filter(|i| !book.is_finished(*i))
            .collect();
        book
    }

    /// Next pending shard of `epoch`, or None when the epoch's pool is empty (other shards
    /// may still be leased: the worker then ends its epoch).
    ///
    /// A repeated `request_id` (non-zero) is answered with the lease it already got, while
    /// that lease is live (the worker retried after losing the reply).
    pub fn lease(
        &mut self,
        worker_id: u64,
        epoch: u32,
        request_id: u64,
        now_ms: u64,
    ) -> Option<LeaseGrant> {
        let grant = self.grant(worker_id, epoch, request_id, now_ms);
        self.log.push(ShardOp::Lease {
            worker: worker_id,
            epoch,
            request: request_id,
            at: now_ms,
            granted: grant.as_ref().map(|g| g.lease_id),
        });
        grant
    }

    /// [`ShardBook::lease`] without logging the call.
    fn grant(
        &mut self,
        worker_id: u64,
        epoch: u32,
        request_id: u64,
        now_ms: u64,
    ) -> Option<LeaseGrant> {
        if let Some(&(req, lease_id)) = self.granted.get(&worker_id) {
            if request_id != 0 && req == request_id {
                if let Some(l) = self.leases.get_mut(&lease_id) {
                    l.expires_at_ms = now_ms + self.lease_ttl_ms;
                    return Some(LeaseGrant {
                        lease_id,
                        shard_url: self.urls[l.shard].clone(),
                        expires_in_ms: self.lease_ttl_ms,
                    });
                }
            }
        }
        let id = self.next_lease_id;
        let ttl = self.lease_ttl_ms;
        let book = self.epoch_mut(epoch)?;
        let shard = book.pending.pop_front()?;
        book.leased.insert(shard, id);
        self.next_lease_id += 1;
        self.leases.insert(
            id,
            Lease {
                id,
                epoch,
                shard,
                worker_id,
                expires_at_ms: now_ms + ttl,
            },
        );
        if request_id != 0 {
            self.granted.insert(worker_id, (request_id, id));
        }
        Some(LeaseGrant {
            lease_id: id,
            shard_url: self.urls[shard].clone(),
            expires_in_ms: ttl,
        })
    }

    /// Heartbeats keep a worker's leases alive.
    pub fn renew(&mut self, worker_id: u64, now_ms: u64) {
        self.renewed.insert(worker_id, now_ms + self.lease_ttl_ms);
    }

    /// Returns every lease past its deadline (and its worker's last renewal) to the pending
    /// pool; returns them for logging.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Lease> {
        let ids: Vec<u64> = self
            .leases
            .values()
            .filter(|l| {
                let renewed = self.renewed.get(&l.worker_id).copied().unwrap_or(0);
                l.expires_at_ms.max(renewed) <= now_ms
            })
            .map(|l| l.id)
            .collect();
        self.take_back(ids)
    }

    /// Returns every lease of `worker_id` to the pending pool (the worker died or left).
    pub fn release_worker(&mut self, worker_id: u64) -> Vec<Lease> {
        let ids: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.worker_id == worker_id)
            .map(|l| l.id)
            .collect();
        self.take_back(ids)
    }

    fn take_back(&mut self, mut ids: Vec<u64>) -> Vec<Lease> {
        if !ids.is_empty() {
            self.log.push(ShardOp::TakeBack { ids: ids.clone() });
        }
        // Lease ids grow along the epoch order, so pushing the newest to the front first
        // leaves the returned shards in their original relative order.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(lease) = self.leases.remove(&id) else {
                continue;
            };
            if let Some(book) = self.epochs.get_mut(&lease.epoch) {
                book.leased.remove(&lease.shard);
                book.pending.push_front(lease.shard);
            }
            self.orphaned.insert(id, lease.clone());
            out.push(lease);
        }
        out.reverse();
        out
    }

    /// Records a finished lease: done with `samples`, or failed when `error` is non-empty.
    /// `step`: the committed step that trained the shard's last sample, when known (see
    /// [`ShardBook::snapshot`]).
    pub fn complete(
        &mut self,
        worker_id: u64,
        lease_id: u64,
        samples: u64,
        bad_samples: &HashMap<String, u64>,
        error: &str,
        step: Option<u64>,
    ) -> Result<(Lease, Completion), RpcError> {
        self.log.push(ShardOp::Complete {
            worker: worker_id,
            lease: lease_id,
            samples,
            bad: bad_samples.clone(),
            error: error.to_string(),
            step,
        });
        let lease = match self
            .leases
            .get(&lease_id)
            .or_else(|| self.orphaned.get(&lease_id))
        {
            Some(l) => l.clone(),
            None => {
                return Err(RpcError::InvalidArgument(format!(
                    "unknown lease id {lease_id} from worker {worker_id}"
                )))
            }
        };
        if lease.worker_id != worker_id {
            return Err(RpcError::InvalidArgument(format!(
                "lease {lease_id} ({}) belongs to worker {}, not worker {worker_id}",
                self.urls[lease.shard], lease.worker_id
            )));
        }
        let was_live = self.leases.remove(&lease_id).is_some();
        self.orphaned.remove(&lease_id);
        let book = self.epochs.get_mut(&lease.epoch).ok_or_else(|| {
            RpcError::Internal(format!(
                "lease {lease_id} names epoch {} that has no books",
                lease.epoch
            ))
        })?;
        if book.is_finished(lease.shard) {
            return Ok((lease, Completion::Duplicate));
        }
        // The shard may have gone back to the pool, or even out again under another lease,
        // after this lease expired; the first completion wins. A live lease's shard is in
        // neither (the scan of the pool is then skipped: it cost O(shards) per completion).
        if !was_live {
            book.pending.retain(|s| *s != lease.shard);
        }
        if let Some(other) = book.leased.remove(&lease.shard) {
            if other != lease_id {
                if let Some(l) = self.leases.remove(&other) {
                    self.orphaned.insert(other, l);
                }
            }
        }
        for (reason, n) in bad_samples {
            *self.bad_samples.entry(reason.clone()).or_default() += n;
        }
        if error.is_empty() {
            book.done.insert(lease.shard, samples);
            if let Some(step) = step {
                book.done_at_step.insert(lease.shard, step);
            }
            Ok((lease, Completion::Done))
        } else {
            book.failed.insert(lease.shard, error.to_string());
            Ok((lease, Completion::Failed))
        }
    }

    pub fn counts(&self, epoch: u32) -> ShardCounts {
        let total = self.urls.len() as u64;
        match self.epochs.get(&epoch) {
            None => {
                // Not created yet: what creating it would give (resume may pre-finish some).
                let book = self.create_epoch(epoch);
                ShardCounts {
                    total,
                    pending: book.pending.len() as u64,
                    leased: 0,
                    done: book.done.len() as u64,
                    failed: book.failed.len() as u64,
                }
            }
            Some(b) => ShardCounts {
                total,
                pending: b.pending.len() as u64,
                leased: b.leased.len() as u64,
                done: b.done.len() as u64,
                failed: b.failed.len() as u64,
            },
        }
    }

    /// The changes logged since the last call (the journal writes them as one delta), leaving
    /// the log empty.
    pub fn take_log(&mut self) -> Vec<ShardOp> {
        std::mem::take(&mut self.log)
    }

    /// Makes the changes `ops` logged, in order, on the book they were logged after (a
    /// recovered snapshot). A lease granted differently than logged means the log does not
    /// belong to this book: an error, never a silently different lease book.
    pub fn replay(&mut self, ops: Vec<ShardOp>) -> Result<(), String> {
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                ShardOp::Lease {
                    worker,
                    epoch,
                    request,
                    at,
                    granted,
                } => {
                    let got = self.grant(worker, epoch, request, at).map(|g| g.lease_id);
                    if got != granted {
                        return Err(format!(
                            "change {i} of the journal's log granted lease {granted:?} to worker \
                             {worker}, but replaying it grants {got:?}"
                        ));
                    }
                }
                ShardOp::Complete {
                    worker,
                    lease,
                    samples,
                    bad,
                    error,
                    step,
                } => {
                    // A completion refused then is refused again; either way the same book.
                    let _ = self.complete(worker, lease, samples, &bad, &error, step);
                }
                ShardOp::TakeBack { ids } => {
                    self.take_back(ids);
                }
            }
        }
        self.log.clear();
        Ok(())
    }

    /// The newest lease `worker_id` still holds, as a URL ("" for none).
    pub fn worker_shard(&self, worker_id: u64) -> &str {
        self.leases
            .values()
            .filter(|l| l.worker_id == worker_id)
            .max_by_key(|l| l.id)
            .map(|l| self.urls[l.shard].as_str())
            .unwrap_or("")
    }

    /// Samples in the whole dataset: exact once every shard of some epoch is finished
    /// (`true`), else extrapolated from the average finished shard (`false`).
    pub fn dataset_samples(&self) -> Option<(u64, bool)> {
        let n = self.urls.len();
        for book in self.epochs.values().rev() {
            if book.done.len() + book.failed.len() == n && n > 0 {
                return Some((book.done.values().sum(), true));
            }
        }
        if let Some(full) = self.dropped_full_samples {
            return Some((full, true));
        }
        let (sum, count) = self
            .epochs
            .values()
            .rev()
            .find(|b| !b.done.is_empty())
            .map(|b| (b.done.values().sum::<u64>(), b.done.len() as u64))?;
        Some(((sum as f64 / count as f64 * n as f64).round() as u64, false))
    }

    /// Checkpoint bookkeeping for `epoch`: finished and failed shards by URL, as of committed
    /// step `at_step` when given: a shard whose last sample was trained at a later step is left
    /// out (its samples are read again on resume, as those of any shard unfinished at the
    /// checkpoint).
    pub fn snapshot(
        &self,
        epoch: u32,
        samples_seen: u64,
        at_step: Option<u64>,
    ) -> ShardStateSnapshot {
        let mut snap = ShardStateSnapshot {
            epoch,
            bad_samples: self.bad_samples.clone(),
            samples_seen,
            ..Default::default()
        };
        let owned;
        let book = match self.epochs.get(&epoch) {
            Some(b) => b,
            None => {
                owned = self.create_epoch(epoch);
                &owned
            }
        };
        for (i, n) in &book.done {
            let later = match (at_step, book.done_at_step.get(i)) {
                (Some(at), Some(done)) => *done > at,
                _ => false,
            };
            if !later {
                snap.done.insert(self.urls[*i].clone(), *n);
            }
        }
        for (i, e) in &book.failed {
            snap.failed.insert(self.urls[*i].clone(), e.clone());
        }
        snap
    }
}

fn digest(urls: &[String]) -> String {
    let mut h = Sha256::new();
    for u in urls {
        h.update(u.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("memory://t/shard-{i:03}.tar"))
            .collect()
    }

    fn no_bad() -> HashMap<String, u64> {
        HashMap::new()
    }

    #[test]
    fn leases_follow_the_epoch_order_then_exhaust() {
        let mut b = ShardBook::new(urls(6), 42, 1000, None);
        let expected: Vec<String> = epoch_order(6, 42, 3)
            .into_iter()
            .map(|i| urls(6)[i].clone())
            .collect();
        let got: Vec<String> = (0..6)
            .map(|k| {
                b.lease(1 + k % 2, 3, 0, 0)
                    .expect("pending shard")
                    .shard_url
            })
            .collect();
        assert_eq!(got, expected);
        assert!(b.lease(1, 3, 0, 0).is_none(), "epoch 3 must be exhausted");
        // Another epoch is independent and shuffled differently.
        let first_e4 = b.lease(1, 4, 0, 0).unwrap().shard_url;
        assert_eq!(first_e4, urls(6)[epoch_order(6, 42, 4)[0]]);
        let c = b.counts(3);
        assert_eq!((c.total, c.pending, c.leased, c.done), (6, 0, 6, 0));
    }

    #[test]
    fn expired_lease_returns_to_the_front_and_late_completion_still_counts() {
        let mut b = ShardBook::new(urls(4), 1, 100, None);
        let g1 = b.lease(7, 0, 0, 0).unwrap();
        let g2 = b.lease(8, 0, 0, 50).unwrap();
        b.renew(8, 90); // worker 8 heartbeats, worker 7 does not
        let expired = b.expire(100);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, g1.lease_id);
        assert_eq!(b.counts(0).pending, 3);
        // The expired shard is handed out next.
        let g3 = b.lease(8, 0, 0, 120).unwrap();
        assert_eq!(g3.shard_url, g1.shard_url);
        // Worker 7 finishes anyway: first completion wins, worker 8's copy is a duplicate.
        let (_, c) = b.complete(7, g1.lease_id, 10, &no_bad(), "", None).unwrap();
        assert_eq!(c, Completion::Done);
        let (_, c) = b.complete(8, g3.lease_id, 10, &no_bad(), "", None).unwrap();
        assert_eq!(c, Completion::Duplicate);
        let counts = b.counts(0);
        assert_eq!((counts.pending, counts.leased, counts.done), (2, 1, 1));
        assert!(b.worker_shard(8) == g2.shard_url);
    }

    #[test]
    fn completion_checks_owner_and_lease_id() {
        let mut b = ShardBook::new(urls(2), 0, 100, None);
        let g = b.lease(1, 0, 0, 0).unwrap();
        let e = b
            .complete(2, g.lease_id, 5, &no_bad(), "", None)
            .unwrap_err();
        assert!(e.to_string().contains("belongs to worker 1"), "{e}");
        let e = b.complete(1, 999, 5, &no_bad(), "", None).unwrap_err();
        assert!(e.to_string().contains("unknown lease id 999"), "{e}");
    }

    #[test]
    fn bad_samples_and_failures_are_recorded_once() {
        let mut b = ShardBook::new(urls(3), 0, 100, None);
        let g1 = b.lease(1, 0, 0, 0).unwrap();
        let g2 = b.lease(1, 0, 0, 0).unwrap();
        let bad: HashMap<String, u64> =
            [("decode".to_string(), 2), ("missing_key".into(), 1)].into();
        b.complete(1, g1.lease_id, 8, &bad, "", None).unwrap();
        let (_, c) = b
            .complete(1, g2.lease_id, 0, &bad, "HTTP 403 on GET", None)
            .unwrap();
        assert_eq!(c, Completion::Failed);
        assert_eq!(b.bad_samples()["decode"], 4);
        assert_eq!(b.bad_samples()["missing_key"], 2);
        let snap = b.snapshot(0, 8, None);
        assert_eq!(snap.done.get(&g1.shard_url), Some(&8));
        assert_eq!(
            snap.failed.get(&g2.shard_url).map(String::as_str),
            Some("HTTP 403 on GET")
        );
        let c = b.counts(0);
        assert_eq!(c.pending + c.leased + c.done + c.failed, c.total);
        assert_eq!((c.done, c.failed, c.pending), (1, 1, 1));
    }

    #[test]
    fn dataset_size_is_estimated_then_exact() {
        let mut b = ShardBook::new(urls(4), 0, 100, None);
        assert_eq!(b.dataset_samples(), None);
        let g = b.lease(1, 0, 0, 0).unwrap();
        b.complete(1, g.lease_id, 10, &no_bad(), "", None).unwrap();
        assert_eq!(b.dataset_samples(), Some((40, false)));
        let sizes = [20u64, 30, 40];
        for n in sizes {
            let g = b.lease(1, 0, 0, 0).unwrap();
            b.complete(1, g.lease_id, n, &no_bad(), "", None).unwrap();
        }
        assert_eq!(b.dataset_samples(), Some((100, true)));
    }

    #[test]
    fn finished_epochs_before_the_previous_one_are_dropped() {
        let mut b = ShardBook::new(urls(3), 0, 100, None);
        let finish_epoch = |b: &mut ShardBook, e: u32| {
            while let Some(g) = b.lease(1, e, 0, 0) {
                b.complete(1, g.lease_id, 5, &no_bad(), "", None).unwrap();
            }
        };
        finish_epoch(&mut b, 0);
        finish_epoch(&mut b, 1);
        assert_eq!(b.epochs.keys().copied().collect::<Vec<_>>(), [0, 1]);
        // A shard of epoch 2 still out keeps epoch 2 when epoch 3 starts.
        let out = b.lease(1, 2, 0, 0).unwrap();
        finish_epoch(&mut b, 2);
        let g3 = b.lease(2, 3, 0, 0).unwrap();
        assert_eq!(b.epochs.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert!(
            b.lease(1, 0, 0, 0).is_none(),
            "a dropped epoch is never handed out again"
        );
        assert_eq!(b.dataset_samples(), Some((15, true)));
        b.complete(1, out.lease_id, 5, &no_bad(), "", None).unwrap();
        b.complete(2, g3.lease_id, 5, &no_bad(), "", None).unwrap();
        finish_epoch(&mut b, 3);
        b.lease(1, 4, 0, 0).unwrap();
        assert_eq!(b.epochs.keys().copied().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(b.counts(3).done, 3);
    }

    #[test]
    fn resume_skips_done_shards_of_the_resumed_epoch_only() {
        let all = urls(5);
        let order = epoch_order(5, 9, 2);
        let mut snap = ShardStateSnapshot {
            epoch: 2,
            ..Default::default()
        };
        snap.done.insert(all[order[0]].clone(), 11);
        snap.done.insert(all[order[3]].clone(), 12);
        snap.done.insert("memory://t/gone.tar".into(), 5); // no longer listed
        snap.bad_samples.insert("decode".into(), 3);
        let mut b = ShardBook::new(all.clone(), 9, 100, Some(snap));
        assert_eq!(b.bad_samples()["decode"], 3);
        let c = b.counts(2);
        assert_eq!((c.total, c.pending, c.done), (5, 3, 2));
        let mut got = Vec::new();
        while let Some(g) = b.lease(1, 2, 0, 0) {
            got.push(g.shard_url);
        }
        let expected: Vec<String> = [1, 2, 4].iter().map(|k| all[order[*k]].clone()).collect();
        assert_eq!(got, expected);
        // The next epoch starts from scratch.
        assert_eq!(b.counts(3).pending, 5);
    }

    #[test]
    fn a_snapshot_as_of_a_step_leaves_out_shards_finished_later() {
        let mut b = ShardBook::new(urls(4), 0, 100, None);
        let g: Vec<LeaseGrant> = (0..3).map(|_| b.lease(1, 0, 0, 0).unwrap()).collect();
        b.complete(1, g[0].lease_id, 5, &no_bad(), "", Some(10))
            .unwrap();
        b.complete(1, g[1].lease_id, 6, &no_bad(), "", Some(12))
            .unwrap();
        // Done without a step (a completion from an older worker): counted at any step.
        b.complete(1, g[2].lease_id, 7, &no_bad(), "", None)
            .unwrap();
        let at = |step| {
            let mut done: Vec<String> = b.snapshot(0, 0, step).done.keys().cloned().collect();
            done.sort();
            done
        };
        let mut all = vec![
            g[0].shard_url.clone(),
            g[1].shard_url.clone(),
            g[2].shard_url.clone(),
        ];
        all.sort();
        assert_eq!(at(None), all);
        assert_eq!(at(Some(12)), all);
        let mut by_11 = vec![g[0].shard_url.clone(), g[2].shard_url.clone()];
        by_11.sort();
        assert_eq!(at(Some(11)), by_11);
        assert_eq!(at(Some(9)), vec![g[2].shard_url.clone()]);
    }

    #[test]
    fn replaying_the_log_on_the_book_it_followed_makes_the_same_book() {
        let mut b = ShardBook::new(urls(8), 3, 100, None);
        let g: Vec<LeaseGrant> = (0..3).map(|w| b.lease(w, 0, 0, 0).unwrap()).collect();
        b.complete(0, g[0].lease_id, 5, &no_bad(), "", Some(2))
            .unwrap();
        let snapshot = serde_json::to_vec(&b).unwrap();
        b.take_log();

        // After the snapshot: leases (one retried), a failure, an expiry (worker 1's lease
        // at 100 ms, not renewed), a completion after that expiry, a worker released.
        let a = b.lease(0, 0, 9, 50).unwrap();
        assert_eq!(b.lease(0, 0, 9, 60).unwrap().lease_id, a.lease_id);
        b.renew(2, 90);
        b.renew(0, 90);
        assert_eq!(b.expire(150).len(), 1);
        b.complete(1, g[1].lease_id, 4, &no_bad(), "", None)
            .unwrap();
        b.complete(0, a.lease_id, 0, &no_bad(), "unreadable", None)
            .unwrap();
        let c = b.lease(2, 0, 0, 160).unwrap();
        assert_eq!(b.release_worker(2).len(), 2);
        b.lease(0, 0, 0, 170).unwrap();
        let log = b.take_log();
        assert_eq!(log.len(), 8, "{log:?}");
        assert!(c.lease_id > a.lease_id);

        let mut back: ShardBook = serde_json::from_slice(&snapshot).unwrap();
        back.attach_urls(urls(8)).unwrap();
        back.replay(log).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&b).unwrap()
        );
        assert!(back.take_log().is_empty());
    }

    #[test]
    fn a_heartbeat_keeps_every_lease_of_its_worker_alive() {
        let mut b = ShardBook::new(urls(4), 3, 100, None);
        b.lease(1, 0, 0, 0).unwrap();
        b.lease(1, 0, 0, 10).unwrap();
        b.lease(2, 0, 0, 0).unwrap();
        b.renew(1, 80);
        // Worker 2's lease ran out at 100; worker 1's live until 180.
        assert_eq!(
            b.expire(150)
                .iter()
                .map(|l| l.worker_id)
                .collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(b.expire(180).len(), 2);
    }

    #[test]
    fn releasing_a_worker_returns_its_leases_in_order() {
        let mut b = ShardBook::new(urls(5), 3, 1000, None);
        let a = b.lease(1, 0, 0, 0).unwrap();
        let _ = b.lease(2, 0, 0, 0).unwrap();
        let c = b.lease(1, 0, 0, 0).unwrap();
        let back = b.release_worker(1);
        assert_eq!(
            back.iter().map(|l| l.id).collect::<Vec<_>>(),
            vec![a.lease_id, c.lease_id]
        );
        assert_eq!(b.lease(3, 0, 0, 0).unwrap().shard_url, a.shard_url);
        assert_eq!(b.lease(3, 0, 0, 0).unwrap().shard_url, c.shard_url);
        assert_eq!(b.worker_shard(1), "");
    }
}
