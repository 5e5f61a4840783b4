//! The coordinator's state machine: one method per RPC, with time passed in as
//! milliseconds so tests can drive expiry and timeouts without sleeping.
//!
//! Job states: `waiting_for_workers` → `running` (world complete) → `finished` (every rank
//! left finished) or `failed` (a rank died, reported an error, or left early, and
//! `cluster.min_workers` does not let the survivors regroup).
//!
//! The whole book is journaled (`crate::journal`): every method that changes what a restarted
//! coordinator must know calls `touch`, and the RPCs whose answer a worker acts on wait for
//! the journal to hold the change before they reply.

use crate::error::RpcError;
use crate::experts::ExpertBook;
use crate::leases::{Completion, ShardBook, ShardOp};
use crate::membership::{Membership, NodeSlot, Worker};
use crate::progress::{reported_seconds, JobProgress};
use crate::tensorboard::{expert_scalars, step_scalars, MAX_PENDING_SCALARS};
use contrail_common::checkpoint::CheckpointMeta;
use contrail_common::config::JobConfig;
use contrail_common::proto;
use contrail_common::status::{EvalPoint, JobState, StatusReport, WorkerLiveness, WorkerStatus};
use contrail_common::tensorboard::Scalars;
use serde::{Deserialize, Serialize};

/// The checkpoint a job resumes from, as told to every worker at rendezvous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Checkpoint directory URL.
    pub dir: String,
    pub step: u64,
    pub epoch: u32,
}

#[derive(Serialize, Deserialize)]
pub struct JobBook {
    /// Taken from the job file again when a journal is recovered.
    #[serde(skip)]
    cfg: JobConfig,
    job_toml: String,
    state: JobState,
    reason: String,
    members: Membership,
    shards: ShardBook,
    progress: JobProgress,
    resume: Option<ResumePoint>,
    /// Expert placement and router load; None when MoE is off.
    experts: Option<ExpertBook>,
    /// Counts changes worth journaling (this coordinator's, not journaled itself).
    #[serde(skip)]
    changes: u64,
    /// A change outside the lease book since the journal last wrote the whole book: the next
    /// write is whole. Changes to the lease book alone go to its log (`ShardBook::take_log`).
    #[serde(skip)]
    snapshot_due: bool,
    /// Step reports since the journal last wrote the whole book: written whole within
    /// `journal::LAZY_WRITE_MS` (no RPC waits for them).
    #[serde(skip)]
    lazy_due: bool,
    /// Since when fewer than `cluster.min_workers` are left, waiting for replacements.
    #[serde(default)]
    short_since_ms: Option<u64>,
    /// Why the members must roll back to the latest checkpoint (an MoE worker died); the
    /// coordinator reads the checkpoint and then calls [`JobBook::apply_rollback`].
    #[serde(default)]
    rollback_due: Option<String>,
    /// The generation formed by the latest rollback: its rendezvous replies say `rollback`.
    #[serde(default)]
    rollback_generation: Option<u64>,
    /// Every rollback so far, for `/status`.
    #[serde(default)]
    rollbacks: Vec<String>,
    /// The newest generation that lost a member: heartbeats of that generation or older tell
    /// their members to abort the collective in progress (`HeartbeatReply.peer_lost`).
    #[serde(default)]
    lost_in_generation: Option<u64>,
    /// Samples per epoch from the dataset's `dataset.json` (`crate::manifest`), when it has one.
    #[serde(default)]
    manifest_samples: Option<u64>,
    /// Scalars not yet written to the TensorBoard event file (`log.tensorboard`; kept only
    /// when it is set). Not journaled: a restarted coordinator starts a new event file.
    #[serde(skip)]
    scalars: std::collections::VecDeque<Scalars>,
}

impl JobBook {
    /// Samples per epoch from the dataset's manifest (see `crate::manifest`).
    pub fn set_manifest_samples(&mut self, samples: Option<u64>) {
        self.manifest_samples = samples;
    }

    /// `shard_urls` is the listed dataset; `resume` the latest checkpoint, if any.
    pub fn new(
        cfg: JobConfig,
        job_toml: String,
        shard_urls: Vec<String>,
        resume: Option<(String, CheckpointMeta)>,
    ) -> Self {
        let (resume_point, snapshot, progress) = match resume {
            Some((dir, meta)) => (
                Some(ResumePoint {
                    dir,
                    step: meta.step,
                    epoch: meta.epoch,
                }),
                Some(meta.shard_state.clone()),
                JobProgress::resumed(meta.step, meta.epoch, meta.shard_state.samples_seen),
            ),
            None => (None, None, JobProgress::default()),
        };
        let experts = ExpertBook::new(
            &cfg.moe,
            cfg.cluster.world_size,
            resume_point.as_ref().map_or(0, |r| r.step),
        );
        Self {
            experts,
            members: Membership::new(cfg.cluster.world_size),
            shards: ShardBook::new(
                shard_urls,
                cfg.train.seed,
                cfg.cluster.lease_ttl_ms,
                snapshot,
            ),
            progress,
            resume: resume_point,
            state: JobState::WaitingForWorkers,
            reason: String::new(),
            cfg,
            job_toml,
            changes: 0,
            snapshot_due: true,
            lazy_due: false,
            short_since_ms: None,
            rollback_due: None,
            rollback_generation: None,
            rollbacks: Vec::new(),
            lost_in_generation: None,
            manifest_samples: None,
            scalars: std::collections::VecDeque::new(),
        }
    }

    /// A journaled book, with the lease-book changes logged after it, taken over by a
    /// restarted coordinator. Refused when the job file or the listed dataset changed since
    /// it was written. Every worker and lease gets a fresh timeout on this coordinator's
    /// clock.
    pub fn recovered(
        mut self,
        cfg: JobConfig,
        job_toml: &str,
        shard_urls: Vec<String>,
        log: Vec<ShardOp>,
        now_ms: u64,
    ) -> Result<Self, String> {
        if self.job_toml != job_toml {
            return Err(
                "the job's config differs from the one the journal was written with".into(),
            );
        }
        self.shards.attach_urls(shard_urls)?;
        // The log's changes happened on the old coordinator's clock, as the snapshot's.
        self.shards.replay(log)?;
        self.cfg = cfg;
        if self.short_since_ms.is_some() {
            self.short_since_ms = Some(now_ms);
        }
        self.members.restart_clock(now_ms);
        self.shards.restart_clock(now_ms);
        Ok(self)
    }

    /// Changes worth journaling so far; grows on every one.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Notes a change the journal must hold, outside the lease book.
    fn touch(&mut self) {
        self.changes += 1;
        self.snapshot_due = true;
    }

    /// Notes a change of the lease book alone (logged by the book itself).
    fn touch_shards(&mut self) {
        self.changes += 1;
    }

    /// Notes a step report: the journal holds it within `journal::LAZY_WRITE_MS`.
    fn touch_lazily(&mut self) {
        self.changes += 1;
        self.lazy_due = true;
    }

    /// Whether the journal's next write must be the whole book: a change outside the lease
    /// book is waiting, or step reports are and `lazy_elapsed` (the last whole write is
    /// `LAZY_WRITE_MS` old).
    pub fn snapshot_due(&self, lazy_elapsed: bool) -> bool {
        self.snapshot_due || (self.lazy_due && lazy_elapsed)
    }

    /// The next journal write is the whole book (the coordinator is about to exit).
    pub fn journal_whole(&mut self) {
        self.touch();
    }

    /// The whole book was just encoded for the journal: its log is part of it.
    pub fn encoded_whole(&mut self) {
        self.snapshot_due = false;
        self.lazy_due = false;
        self.shards.take_log();
    }

    /// The lease-book changes since the journal's last write, for a delta.
    pub fn take_shard_log(&mut self) -> Vec<ShardOp> {
        self.shards.take_log()
    }

    pub fn state(&self) -> JobState {
        self.state
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn generation(&self) -> u64 {
        self.members.generation
    }

    fn fail(&mut self, reason: String) {
        if self.state.is_terminal() {
            return;
        }
        tracing::error!(%reason, "job failed");
        self.state = JobState::Failed;
        self.reason = reason;
        self.touch();
    }

    /// The job fails because its membership changed (a member was lost): a new generation
    /// fences the old one's requests, and the job fails with `reason`.
    fn fail_membership(&mut self, reason: String) {
        self.members.generation += 1;
        self.fail(reason);
    }

    fn require_running(&self) -> Result<(), RpcError> {
        match self.state {
            JobState::Running => Ok(()),
            JobState::WaitingForWorkers => Err(RpcError::FailedPrecondition(format!(
                "the rendezvous is not complete ({} of {} workers registered)",
                self.members.workers.len(),
                self.members.world_size
            ))),
            JobState::Finished => Err(RpcError::FailedPrecondition("the job has finished".into())),
            JobState::Failed => Err(RpcError::FailedPrecondition(format!(
                "the job failed: {}",
                self.reason
            ))),
        }
    }

    /// Fencing first (a dead or stale worker hears why it is refused, even after the job
    /// failed), then the job must be running. Any admitted request counts as a sign of life.
    fn admit(
        &mut self,
        worker_id: u64,
        generation: u64,
        now_ms: u64,
    ) -> Result<&mut Worker, RpcError> {
        let dead = self
            .members
            .get(worker_id)
            .is_some_and(|w| w.liveness == WorkerLiveness::Dead);
        if !dead && self.state.is_terminal() {
            // A survivor's generation is stale too; the job's reason is the useful answer.
            self.require_running()?;
        }
        self.members.check(worker_id, generation, false)?;
        self.require_running()?;
        let w = self.members.get_mut(worker_id).ok_or_else(|| {
            RpcError::Internal(format!("worker {worker_id} vanished while being admitted"))
        })?;
        w.last_seen_ms = now_ms;
        Ok(w)
    }

    /// Housekeeping on the clock: expired leases go back to the pool, silent workers die.
    pub fn tick(&mut self, now_ms: u64) {
        let expired = self.shards.expire(now_ms);
        if !expired.is_empty() {
            self.touch();
        }
        for lease in expired {
            tracing::warn!(
                shard = %self.shards.url(lease.shard),
                epoch = lease.epoch,
                worker = lease.worker_id,
                "lease expired without renewal; the shard is back in the pool"
            );
        }
        // After a failure, silent workers are still declared dead so their leases return to
        // the pool and status shows which worker is gone; the first failure stays the reason.
        if !matches!(self.state, JobState::Running | JobState::Failed) {
            return;
        }
        let timeout = self.cfg.cluster.worker_timeout_ms;
        let grace = 2 * self.cfg.cluster.heartbeat_ms;
        let silent = self.members.silent(now_ms, timeout, grace);
        if !silent.is_empty() {
            let mut reasons = Vec::new();
            for id in &silent {
                let Some(w) = self.members.get_mut(*id) else {
                    continue;
                };
                if w.liveness != WorkerLiveness::Alive {
                    continue; // taken out with its node already
                }
                let silent_ms = now_ms.saturating_sub(w.last_seen_ms);
                w.liveness = WorkerLiveness::Dead;
                w.reason = match w.suspected_at_ms {
                    Some(at) if silent_ms <= timeout => format!(
                        "a peer lost its connection to it, and it sent no heartbeat in the {} ms since",
                        now_ms.saturating_sub(at)
                    ),
                    _ => format!(
                        "no heartbeat for {silent_ms} ms (cluster.worker_timeout_ms = {timeout})"
                    ),
                };
                reasons.push(format!(
                    "{} stopped sending heartbeats ({})",
                    w.describe(),
                    w.reason
                ));
                reasons.extend(self.take_out_node_of(*id));
            }
            let returned: usize = silent
                .iter()
                .map(|id| self.shards.release_worker(*id).len())
                .sum();
            self.lose_member(
                format!(
                    "{}; {returned} shard lease(s) returned to the pool",
                    reasons.join("; ")
                ),
                now_ms,
            );
        }
        // A replacement that died while waiting to join must not be taken into a generation.
        for id in self.members.silent_waiting(now_ms, timeout) {
            if let Some(w) = self.members.get_mut(id) {
                w.liveness = WorkerLiveness::Dead;
                w.reason = format!("went silent while waiting to join (no call for {timeout} ms)");
                tracing::warn!(worker = %w.describe(), "a waiting replacement went silent; it will not join");
            }
            for note in self.take_out_node_of(id) {
                tracing::warn!("{note}");
            }
            self.touch();
        }
        self.check_short(now_ms);
    }

    /// A node is one failure domain: the alive workers on `id`'s node (which just died or
    /// failed) are declared dead with it, their leases returned, so the whole node leaves in
    /// one regroup. Returns a note for each.
    fn take_out_node_of(&mut self, id: u64) -> Vec<String> {
        let Some(lost) = self.members.get(id).map(Worker::describe) else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        for mate in self.members.node_mates(id) {
            let returned = self.shards.release_worker(mate).len();
            if let Some(w) = self.members.get_mut(mate) {
                w.liveness = WorkerLiveness::Dead;
                w.reason = format!("its node lost {lost}");
                notes.push(format!(
                    "{} leaves with its node ({}), {returned} shard lease(s) returned to the pool",
                    w.describe(),
                    w.slot.node
                ));
            }
        }
        notes
    }

    /// A member died or failed: the survivors regroup as the next generation when
    /// `cluster.min_workers` allows it, else the job fails with `reason`.
    fn lose_member(&mut self, reason: String, now_ms: u64) {
        self.touch();
        if self.state != JobState::Running {
            self.members.generation += 1;
            tracing::warn!("{reason}");
            return;
        }
        self.lost_in_generation = Some(self.members.generation);
        let min = self.cfg.cluster.min_workers as usize;
        let left = self.members.alive_members();
        if min == 0 {
            self.fail_membership(reason);
            return;
        }
        let wait = self.cfg.cluster.replacement_wait_ms;
        if left + self.members.waiting() < min {
            if left == 0 || wait == 0 {
                self.fail_membership(format!(
                    "{reason}; {left} worker(s) left, fewer than cluster.min_workers = {min}"
                ));
                return;
            }
            // The survivors wait in their regroup call; `tick` regroups once replacements
            // make up the numbers, or fails the job after `replacement_wait_ms`.
            tracing::warn!(
                "{reason}; {left} worker(s) left, fewer than cluster.min_workers = {min}: \
                 waiting up to {wait} ms (cluster.replacement_wait_ms) for replacements"
            );
            self.short_since_ms.get_or_insert(now_ms);
            return;
        }
        self.regroup(&reason, "the survivors regroup and train on");
    }

    /// The members of `generation` cannot agree on an MoE state (an expert survives only a
    /// step behind): every member rolls back to the latest checkpoint. Every member reports
    /// it; the first report counts.
    pub fn request_rollback(
        &mut self,
        worker_id: u64,
        generation: u64,
        reason: &str,
    ) -> Result<(), RpcError> {
        let w = self.members.check(worker_id, generation, true)?;
        let who = w.describe();
        if w.rank.is_none() {
            return Err(RpcError::FailedPrecondition(format!(
                "{who} asked for a rollback but is not a member of the job"
            )));
        }
        if self.experts.is_none() {
            return Err(RpcError::InvalidArgument(format!(
                "{who} asked for a rollback, but the job has no MoE blocks"
            )));
        }
        if self.state != JobState::Running
            || generation != self.members.generation
            || self.rollback_due.is_some()
        {
            return Ok(());
        }
        self.touch();
        let reason = format!("{who} reports that generation {generation} {reason}");
        tracing::warn!("{reason}: every member rolls back to the latest checkpoint");
        self.rollback_due = Some(reason);
        Ok(())
    }

    /// Whether the members wait for a rollback to the latest checkpoint.
    pub fn rollback_due(&self) -> bool {
        self.rollback_due.is_some() && self.state == JobState::Running
    }

    /// Rolls the job back to `latest` (the newest checkpoint under `checkpoint.url`, or why
    /// there is none): the shard book and progress return to the checkpoint, the alive
    /// members form the next generation with a fresh expert placement, and their rendezvous
    /// replies say `rollback`. Without a checkpoint the job fails.
    pub fn apply_rollback(&mut self, latest: Result<(String, CheckpointMeta), String>) {
        let Some(reason) = self.rollback_due.take() else {
            return;
        };
        if self.state != JobState::Running {
            return;
        }
        self.touch();
        let (dir, meta) = match latest {
            Ok(found) => found,
            Err(why) => {
                self.fail_membership(format!("{reason}; no checkpoint to roll back to: {why}"));
                return;
            }
        };
        // The job must be valid on the workers left (e.g. the global batch must divide).
        let mut resized = self.cfg.clone();
        resized.cluster.world_size = self.members.alive_members() as u32;
        if let Err(e) = resized.validate_resized() {
            self.fail_membership(format!(
                "{reason}; cannot roll back with {} workers: {e}",
                resized.cluster.world_size
            ));
            return;
        }
        let c = &self.cfg;
        self.shards = ShardBook::new(
            self.shards.urls().to_vec(),
            c.train.seed,
            c.cluster.lease_ttl_ms,
            Some(meta.shard_state.clone()),
        );
        self.progress
            .roll_back(meta.step, meta.epoch, meta.shard_state.samples_seen);
        // Replacements join at the members' next step boundary, taking the rolled-back state
        // from them like any replacement.
        self.members.regroup_taking(false);
        self.experts = ExpertBook::new(&c.moe, self.members.world_size, meta.step);
        self.resume = Some(ResumePoint {
            dir: dir.clone(),
            step: meta.step,
            epoch: meta.epoch,
        });
        let g = self.members.generation;
        self.rollback_generation = Some(g);
        let note = format!(
            "{reason}; generation {g} ({} workers) rolled back to {dir} (epoch {}, step {})",
            self.members.world_size, meta.epoch, meta.step
        );
        tracing::warn!("{note}");
        self.rollbacks.push(note);
    }

    /// Below `cluster.min_workers`: regroups once enough replacements registered, or fails
    /// the job when none came within `cluster.replacement_wait_ms`.
    fn check_short(&mut self, now_ms: u64) {
        let Some(since) = self.short_since_ms else {
            return;
        };
        if self.state != JobState::Running {
            self.short_since_ms = None;
            return;
        }
        let min = self.cfg.cluster.min_workers as usize;
        let (left, waiting) = (self.members.alive_members(), self.members.waiting());
        if left > 0 && left + waiting >= min {
            self.short_since_ms = None;
            self.regroup(
                &format!("{waiting} replacement(s) make up cluster.min_workers = {min}"),
                "the survivors and the replacements regroup",
            );
        } else if left == 0 || now_ms.saturating_sub(since) > self.cfg.cluster.replacement_wait_ms {
            self.short_since_ms = None;
            self.fail_membership(format!(
                "{left} worker(s) left, fewer than cluster.min_workers = {min}, and no \
                 replacement made up the numbers within {} ms (cluster.replacement_wait_ms)",
                self.cfg.cluster.replacement_wait_ms
            ));
        }
    }

    /// Starts the next generation with the alive members (and any waiting replacement),
    /// logging `cause; plan`. Every member restarts its data feed then, so what it held goes
    /// back to the pool. An MoE job keeps every expert's surviving replicas and gives each
    /// replacement one; when an expert has none left, the members roll back to the latest
    /// checkpoint instead (they wait in their regroup call while it is read).
    fn regroup(&mut self, cause: &str, plan: &str) {
        self.touch();
        let mut why = format!("{cause}; {plan}");
        if let Some(x) = &mut self.experts {
            // The survivors keep their ranks' order, so the i-th alive member becomes rank i.
            let survivors = self.members.alive_ranks();
            if let Err(lost) = x.regroup(&survivors, self.members.waiting()) {
                tracing::warn!("{cause}; {lost}: every member rolls back to the latest checkpoint");
                self.rollback_due = Some(format!("{cause}; {lost}"));
                return;
            }
            why = format!(
                "{why}; every expert keeps a live replica (expert placement v{})",
                x.placement().version
            );
        }
        let members = self.members.regroup();
        let returned: usize = members
            .iter()
            .map(|id| self.shards.release_worker(*id).len())
            .sum();
        tracing::warn!(
            generation = self.members.generation,
            workers = members.len(),
            returned,
            "{why}"
        );
    }

    /// A worker registers with its collective address and its node slot; `instance` is its
    /// process's random id (0: none), so the same instance registering again (its first reply
    /// was lost) gets the same worker id. Returns (worker id, generation).
    pub fn register(
        &mut self,
        req: &proto::RegisterRequest,
        now_ms: u64,
    ) -> Result<(u64, u64), RpcError> {
        let (host, address, instance) = (&req.host, &req.collective_address, req.instance);
        if let Some(w) = self.members.by_instance(instance) {
            return Ok((w.id, self.members.generation));
        }
        let slot = NodeSlot::of(req)?;
        let per_node = self.cfg.cluster.local_ranks;
        if per_node > 0 && slot.local_ranks != per_node {
            return Err(RpcError::InvalidArgument(format!(
                "node {:?} runs {} rank(s), but the job's nodes run {per_node} each \
                 (cluster.local_ranks); start it with --local-ranks {per_node}",
                req.node, slot.local_ranks
            )));
        }
        if self.state.is_terminal() {
            self.require_running()?;
        }
        self.touch();
        if self.state == JobState::Running && self.cfg.cluster.min_workers > 0 {
            let id = self.members.add_replacement(
                host,
                address,
                instance,
                slot,
                now_ms,
                self.cfg.cluster.world_size,
            )?;
            tracing::warn!(
                worker = id,
                %host,
                %address,
                "a replacement registered; it joins when the members regroup at their next step"
            );
            return Ok((id, self.members.generation));
        }
        let id = self.members.add(host, address, instance, slot, now_ms)?;
        tracing::info!(
            worker = id,
            %host,
            %address,
            registered = self.members.workers.len(),
            world_size = self.members.world_size,
            "worker registered"
        );
        if self.members.is_complete() {
            self.state = JobState::Running;
            self.touch();
            tracing::info!(
                generation = self.members.generation,
                "rendezvous complete; job running"
            );
        }
        Ok((id, self.members.generation))
    }

    /// The rendezvous reply once the world is complete; None while still waiting.
    /// `after_generation` > 0: a survivor regrouping, which waits for a newer generation.
    pub fn rendezvous(
        &mut self,
        worker_id: u64,
        generation: u64,
        after_generation: u64,
        now_ms: u64,
    ) -> Result<Option<proto::RendezvousReply>, RpcError> {
        self.rendezvous_reporting(worker_id, generation, after_generation, None, now_ms)
    }

    /// [`JobBook::rendezvous`] with the rank (of the caller's generation) whose connection
    /// failed: if that worker sends no heartbeat within two heartbeat periods, it is dead.
    pub fn rendezvous_reporting(
        &mut self,
        worker_id: u64,
        generation: u64,
        after_generation: u64,
        suspect_rank: Option<u32>,
        now_ms: u64,
    ) -> Result<Option<proto::RendezvousReply>, RpcError> {
        if let Some(rank) = suspect_rank {
            if after_generation > 0 && after_generation == self.members.generation {
                if let Some(w) = self
                    .members
                    .workers
                    .iter_mut()
                    .find(|w| w.rank == Some(rank) && w.id != worker_id)
                {
                    w.suspected_at_ms.get_or_insert(now_ms);
                }
            }
        }
        let regrouping = after_generation > 0;
        let terminal = self.state.is_terminal();
        // A replacement registered in an older generation than the one that takes it in.
        let waiting = self
            .members
            .get(worker_id)
            .is_some_and(|w| w.joined_running);
        self.members
            .check(worker_id, generation, regrouping || waiting)?
            .last_seen_ms = now_ms;
        if regrouping && self.members.generation <= after_generation {
            if terminal {
                self.require_running()?;
            }
            // Below min_workers, `tick` decides when the replacements make up the numbers;
            // a pending rollback forms the next generation first (the replacements after it).
            if self.members.waiting() == 0
                || self.state != JobState::Running
                || self.short_since_ms.is_some()
                || self.rollback_due.is_some()
            {
                return Ok(None);
            }
            // A member stopped at a step boundary to let a replacement in.
            self.regroup("a replacement joins", "the members regroup");
            if self.members.generation <= after_generation {
                // An MoE expert lost its last replica: a rollback comes first.
                return Ok(None);
            }
        }
        let current = self.members.generation;
        let w = self
            .members
            .get(worker_id)
            .ok_or_else(|| RpcError::NotFound(format!("unknown worker id {worker_id}")))?;
        if regrouping && w.rank.is_none() {
            return Err(RpcError::FailedPrecondition(format!(
                "{} is not a member of generation {current}",
                w.describe()
            )));
        }
        let Some(rank) = w.rank else {
            if self.state.is_terminal() {
                self.require_running()?;
            }
            return Ok(None);
        };
        // A replacement takes its state from the members, not from the checkpoint.
        let joining = w.joined_running;
        let resume = self.resume.clone().filter(|_| !joining);
        let rollback = !joining && self.rollback_generation == Some(current);
        Ok(Some(proto::RendezvousReply {
            rank,
            world_size: self.members.world_size,
            peers: self.members.linked_peers(rank, self.cfg.moe.enabled()),
            job_config_toml: self.job_toml.clone(),
            generation: current,
            resume_checkpoint: resume.as_ref().map(|r| r.dir.clone()).unwrap_or_default(),
            resume_step: resume.as_ref().map_or(0, |r| r.step),
            resume_epoch: resume.as_ref().map_or(0, |r| r.epoch),
            placement: self.experts.as_ref().map(|x| x.placement().into()),
            joining,
            rollback,
            dataset_samples: self.manifest_samples.unwrap_or(0),
        }))
    }

    pub fn heartbeat(
        &mut self,
        req: &proto::HeartbeatRequest,
        now_ms: u64,
    ) -> Result<proto::HeartbeatReply, RpcError> {
        let w = self.members.check(req.worker_id, req.generation, true)?;
        w.last_seen_ms = now_ms;
        // Alive after all: a peer's report about it was wrong (or about an old connection).
        w.suspected_at_ms = None;
        w.step = w.step.max(req.step);
        let member = w.rank.is_some();
        let regroup = member && self.members.waiting() > 0;
        let peer_lost = member
            && self
                .lost_in_generation
                .is_some_and(|lost| req.generation <= lost);
        let stop = match self.state {
            JobState::Failed => Some(self.reason.clone()),
            JobState::Finished => Some("the job has finished".to_string()),
            // A member of a stale generation is a survivor about to regroup.
            _ if req.generation != self.members.generation && !member => Some(format!(
                "generation {} is stale (current {})",
                req.generation, self.members.generation
            )),
            _ => None,
        };
        if stop.is_none() {
            self.shards.renew(req.worker_id, now_ms);
        }
        Ok(proto::HeartbeatReply {
            stop: stop.is_some(),
            reason: stop.unwrap_or_default(),
            regroup,
            peer_lost,
        })
    }

    pub fn lease(
        &mut self,
        req: &proto::LeaseRequest,
        now_ms: u64,
    ) -> Result<proto::LeaseReply, RpcError> {
        self.admit(req.worker_id, req.generation, now_ms)?;
        let grant = self
            .shards
            .lease(req.worker_id, req.epoch, req.request_id, now_ms);
        self.touch_shards();
        Ok(match grant {
            Some(g) => proto::LeaseReply {
                exhausted: false,
                shard_url: g.shard_url,
                lease_id: g.lease_id,
                expires_in_ms: g.expires_in_ms,
            },
            None => proto::LeaseReply {
                exhausted: true,
                ..Default::default()
            },
        })
    }

    pub fn complete(
        &mut self,
        req: &proto::CompleteRequest,
        now_ms: u64,
    ) -> Result<Completion, RpcError> {
        let who = self
            .admit(req.worker_id, req.generation, now_ms)?
            .describe();
        self.touch_shards();
        let (lease, outcome) = self.shards.complete(
            req.worker_id,
            req.lease_id,
            req.samples,
            &req.bad_samples,
            &req.error,
            (req.step > 0).then_some(req.step),
        )?;
        let url = self.shards.url(lease.shard);
        match outcome {
            Completion::Done => {
                tracing::debug!(shard = %url, epoch = lease.epoch, samples = req.samples, "shard done")
            }
            Completion::Failed => tracing::warn!(
                shard = %url,
                epoch = lease.epoch,
                worker = %who,
                error = %req.error,
                "shard failed to read; it is skipped this epoch"
            ),
            Completion::Duplicate => tracing::info!(
                shard = %url,
                epoch = lease.epoch,
                "shard finished twice (its first lease expired); counted once"
            ),
        }
        Ok(outcome)
    }

    /// Records a step. Rank 0's reply carries a new expert placement while one is pending
    /// (the hand-over protocol is described at `StepReply` in contrail.proto).
    pub fn report_step(
        &mut self,
        req: &proto::StepReport,
        now_ms: u64,
    ) -> Result<proto::StepReply, RpcError> {
        let w = self.admit(req.worker_id, req.generation, now_ms)?;
        let rank = w.rank.unwrap_or(u32::MAX);
        // Rank 0's expert counts are checked before anything is recorded, so a malformed
        // report is refused whole. Other ranks' counts are not read (rank 0's are global).
        if let (0, Some(x)) = (rank, &self.experts) {
            x.check(&req.expert_load).map_err(|e| {
                RpcError::InvalidArgument(format!("step {} report of rank 0: {e}", req.step))
            })?;
        }
        if let Some(w) = self.members.get_mut(req.worker_id) {
            w.step = w.step.max(req.step);
        }
        self.touch_lazily();
        self.progress.report(
            rank,
            req.epoch,
            req.step,
            req.loss,
            req.global_samples,
            req.learning_rate,
            req.step_seconds,
            now_ms,
        );
        if rank == 0 {
            let mut values = step_scalars(req);
            values.extend(req.expert_load.iter().flat_map(expert_scalars));
            self.record_scalars(req.step, values);
        }
        let mut reply = proto::StepReply::default();
        if let (0, Some(x)) = (rank, &mut self.experts) {
            x.report(req.step, &req.expert_load, req.placement_version);
            if let Some((placement, apply_at_step)) = x.pending() {
                reply.placement = Some(placement);
                reply.apply_at_step = apply_at_step;
            }
        }
        Ok(reply)
    }

    /// Records rank 0's round of online evaluation; other ranks never send one.
    pub fn report_eval(&mut self, req: &proto::EvalReport, now_ms: u64) -> Result<(), RpcError> {
        let w = self.admit(req.worker_id, req.generation, now_ms)?;
        if w.rank != Some(0) {
            return Err(RpcError::InvalidArgument(format!(
                "{} sent an evaluation; only rank 0 reports them",
                w.describe()
            )));
        }
        let voted = req.error.is_empty();
        for (name, v) in [("knn_top1", req.knn_top1), ("knn_top5", req.knn_top5)] {
            if voted && !(0.0..=1.0).contains(&v) {
                return Err(RpcError::InvalidArgument(format!(
                    "evaluation at step {}: {name} = {v} is not a fraction in [0, 1]",
                    req.step
                )));
            }
        }
        // The CLIP measurements, when the round took them.
        let optional = [
            ("zeroshot_top1", req.zeroshot_top1),
            ("zeroshot_top5", req.zeroshot_top5),
            ("image_to_text_r1", req.image_to_text_r1),
            ("text_to_image_r1", req.text_to_image_r1),
            ("retrieval_mean_recall", req.retrieval_mean_recall),
        ];
        for (name, v) in optional {
            if let Some(v) = v.filter(|v| !(0.0..=1.0).contains(v)) {
                return Err(RpcError::InvalidArgument(format!(
                    "evaluation at step {}: {name} = {v} is not a fraction in [0, 1]",
                    req.step
                )));
            }
        }
        let [zs1, zs5, i2t, t2i, mean_recall] = optional.map(|(_, v)| v);
        let point = EvalPoint {
            step: req.step,
            epoch: req.epoch,
            knn_top1: voted.then_some(req.knn_top1),
            knn_top5: voted.then_some(req.knn_top5),
            bank_samples: req.bank_samples,
            test_samples: req.test_samples,
            skipped: req.skipped,
            seconds: reported_seconds(req.seconds),
            error: req.error.clone(),
            zeroshot_top1: zs1,
            zeroshot_top5: zs5,
            image_to_text_r1: i2t,
            text_to_image_r1: t2i,
            retrieval_mean_recall: mean_recall,
        };
        match point.knn_top1 {
            Some(top1) => tracing::info!(step = point.step, top1, "held-out kNN"),
            None => {
                tracing::warn!(step = point.step, error = %point.error, "evaluation did not vote")
            }
        }
        let values = [
            ("eval/knn_top1", point.knn_top1),
            ("eval/knn_top5", point.knn_top5),
            ("eval/zeroshot_top1", zs1),
            ("eval/zeroshot_top5", zs5),
            ("eval/image_to_text_r1", i2t),
            ("eval/text_to_image_r1", t2i),
            ("eval/retrieval_mean_recall", mean_recall),
        ]
        .into_iter()
        .filter_map(|(tag, v)| Some((tag.to_string(), v?)))
        .collect();
        self.record_scalars(point.step, values);
        self.progress.eval_history.push(point);
        self.touch();
        Ok(())
    }

    /// Keeps one step's scalars for the TensorBoard writer when `log.tensorboard` is set.
    fn record_scalars(&mut self, step: u64, values: Vec<(String, f64)>) {
        if self.cfg.log.tensorboard.is_empty() || values.is_empty() {
            return;
        }
        // A writer that cannot keep up (storage down) must not grow the books without bound.
        if self.scalars.len() >= MAX_PENDING_SCALARS {
            self.scalars.pop_front();
        }
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.scalars.push_back(Scalars {
            step,
            wall_time,
            values,
        });
    }

    /// The scalars recorded since the last call, oldest first (`crate::Coordinator`'s
    /// TensorBoard writer).
    pub fn take_scalars(&mut self) -> Vec<Scalars> {
        std::mem::take(&mut self.scalars).into()
    }

    /// The epoch whose shard state a checkpoint of the latest step belongs to.
    fn checkpoint_epoch(&self) -> u32 {
        self.progress.epoch
    }

    /// The shard state for a checkpoint (JSON): now, or as of committed step `at` = (epoch,
    /// step) for a checkpoint whose shard state is fetched after the fact.
    pub fn shard_state(
        &mut self,
        worker_id: u64,
        generation: u64,
        at: Option<(u32, u64)>,
        now_ms: u64,
    ) -> Result<String, RpcError> {
        // A survivor may have regrouped since the step it checkpoints: let it ask.
        self.members.check(worker_id, generation, at.is_some())?;
        self.admit(worker_id, self.members.generation, now_ms)?;
        let epoch = at.map_or(self.checkpoint_epoch(), |(e, _)| e);
        let snap = self
            .shards
            .snapshot(epoch, self.progress.samples_seen, at.map(|(_, s)| s));
        serde_json::to_string(&snap)
            .map_err(|e| RpcError::Internal(format!("encoding shard state: {e}")))
    }

    pub fn leave(&mut self, req: &proto::LeaveRequest, now_ms: u64) -> Result<(), RpcError> {
        // A survivor of a failure still carries the old generation; let it leave.
        let w = self.members.check(req.worker_id, req.generation, true)?;
        w.last_seen_ms = now_ms;
        let who = w.describe();
        let ranked = w.rank.is_some();
        if ranked {
            w.liveness = WorkerLiveness::Left;
            w.reason = req.error.clone();
        }
        self.touch();
        if !ranked {
            // Left before the world formed: it never had a rank, so just forget it.
            self.members.workers.retain(|w| w.id != req.worker_id);
            tracing::info!(worker = %who, "worker left before the rendezvous completed");
            return Ok(());
        }
        let returned = self.shards.release_worker(req.worker_id).len();
        if !req.error.is_empty() || !req.finished {
            let why = if req.error.is_empty() {
                format!("{who} left before the job finished")
            } else {
                format!("{who} failed: {}", req.error)
            };
            let mut notes = vec![why];
            notes.extend(self.take_out_node_of(req.worker_id));
            self.lose_member(notes.join("; "), now_ms);
        } else {
            if returned > 0 {
                tracing::warn!(worker = %who, returned, "worker left finished while holding leases");
            }
            tracing::info!(worker = %who, "worker finished");
            // Workers lost in a regroup have no rank any more: the members decide.
            let all_left = self
                .members
                .workers
                .iter()
                .filter(|w| w.rank.is_some())
                .all(|w| w.liveness == WorkerLiveness::Left);
            if all_left && self.state == JobState::Running {
                self.state = JobState::Finished;
                tracing::info!(
                    step = self.progress.step,
                    "every worker finished; job finished"
                );
            }
        }
        Ok(())
    }

    pub fn status(&self, now_ms: u64) -> StatusReport {
        let epoch = self
            .shards
            .latest_epoch()
            .unwrap_or(self.progress.epoch)
            .max(self.progress.epoch);
        let dataset = self
            .manifest_samples
            .or_else(|| self.shards.dataset_samples().map(|(n, _)| n));
        let total = self.progress.total_steps_estimate(&self.cfg.train, dataset);
        let mut workers: Vec<WorkerStatus> = self
            .members
            .workers
            .iter()
            .map(|w| WorkerStatus {
                worker_id: w.id,
                rank: w.rank,
                node: w.slot.node.clone(),
                local_rank: w.slot.local_rank,
                host: w.host.clone(),
                address: w.address.clone(),
                state: w.liveness,
                last_heartbeat_ms: now_ms.saturating_sub(w.last_seen_ms),
                shard: self.shards.worker_shard(w.id).to_string(),
                step: w.step,
            })
            .collect();
        workers.sort_by_key(|w| (w.rank.unwrap_or(u32::MAX), w.worker_id));
        StatusReport {
            state: self.state,
            reason: self.reason.clone(),
            generation: self.members.generation,
            world_size: self.members.world_size,
            epoch,
            step: self.progress.step,
            total_steps_estimate: total,
            samples_seen: self.progress.samples_seen,
            loss: self.progress.loss,
            learning_rate: self.progress.learning_rate,
            samples_per_sec: self.progress.samples_per_sec(),
            eta_seconds: if self.state.is_terminal() {
                None
            } else {
                self.progress.eta_seconds(total)
            },
            uptime_seconds: now_ms as f64 / 1000.0,
            workers,
            shards: self.shards.counts(epoch),
            bad_samples: self.shards.bad_samples().clone(),
            loss_history: self.progress.loss_history.points().to_vec(),
            experts: self.experts.as_ref().map(ExpertBook::status),
            eval_history: self.progress.eval_history.points().to_vec(),
            rollbacks: self.rollbacks.clone(),
            // Filled in by the coordinator, which owns the journal writer.
            journal: None,
        }
    }
}
