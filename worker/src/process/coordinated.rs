//! The training loop's hooks, backed by the coordinator: progress reports, checkpoints, heartbeats
//! and the per-epoch data feed, all through the coordinator.

use super::audit::AuditLog;
use super::client::{Assignment, Coordinator, HeartbeatAnswer};
use super::evaluation::{round_line, OnlineEval};
use super::feed::{CaptionTokens, EpochFeed, FeedLinks};
use super::ledger::{OpenShards, TrainedSet};
use super::HeartbeatState;
use crate::dist::Collective;
use crate::model::{BuildOptions, ContrastiveModel};
use crate::optim::Optimizer;
use crate::tokenize::Tokenizer;
use crate::train::checkpoint::{tensors_to_safetensors, write_checkpoint};
use crate::train::trainer::{BatchSource, StepEvent, StepIds, TrainHooks};
use anyhow::{Context, Result};
use contrail_common::audit::SampleRef;
use contrail_common::checkpoint::CheckpointMeta;
use contrail_common::experts::ExpertPlacement;
use contrail_common::proto;
use contrail_common::shards::ShardStateSnapshot;
use contrail_common::JobConfig;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Heartbeats until aborted. A stop order from the coordinator, a refusal (this worker was
/// declared dead, or a coordinator restarted without a journal does not know it), or a
/// coordinator that stays unreachable for `give_up_after` (`cluster.coordinator_timeout_ms`)
/// is recorded in `progress.stop` for the training thread. While the coordinator is
/// unreachable (restarting) training goes on.
pub async fn heartbeat_loop(
    mut coord: Coordinator,
    progress: Arc<HeartbeatState>,
    every: Duration,
    give_up_after: Duration,
) {
    // Every rank's rendezvous answers at once: beating from then on would send the whole
    // world's heartbeats in the same few milliseconds of every period. A random phase spreads
    // them over the period (the first beat is at most one period late, well inside
    // cluster.worker_timeout_ms, which exceeds two).
    tokio::time::sleep(every.mul_f64(random_phase())).await;
    let mut last_ok = Instant::now();
    loop {
        let step = progress.step.load(Ordering::Relaxed);
        let shard = progress.shard.lock().map(|s| s.clone()).unwrap_or_default();
        let stop = match coord.heartbeat(step, "training", &shard).await {
            Ok(HeartbeatAnswer {
                stop: Some(reason), ..
            }) => Some(format!("the coordinator stopped the job: {reason}")),
            Ok(answer) => {
                last_ok = Instant::now();
                let generation = answer.generation;
                if answer.regroup {
                    progress.regroup.store(generation + 1, Ordering::SeqCst);
                }
                if let (true, Some(coll)) = (answer.peer_lost, progress.collective.get()) {
                    // A silent peer (a lost node) is otherwise waited for until the
                    // collective times out.
                    coll.interrupt(
                        generation,
                        &format!(
                            "the coordinator reports a member of generation {generation} lost"
                        ),
                    );
                }
                None
            }
            Err(e) if !super::client::unreachable(&e) => Some(format!(
                "the coordinator at {} refused this worker's heartbeat: {}",
                coord.endpoint,
                e.message()
            )),
            Err(e) if last_ok.elapsed() > give_up_after => Some(format!(
                "the coordinator at {} has not answered for {:?} \
                 (cluster.coordinator_timeout_ms): {}",
                coord.endpoint,
                last_ok.elapsed(),
                e.message()
            )),
            Err(e) => {
                tracing::debug!("heartbeat failed (will retry): {}", e.message());
                None
            }
        };
        if let (Some(reason), Ok(mut s)) = (stop, progress.stop.lock()) {
            s.get_or_insert(reason);
        }
        tokio::time::sleep(every).await;
    }
}

/// A random fraction of a period, in [0, 1).
fn random_phase() -> f64 {
    contrail_common::auth::random_bytes::<8>().map_or(0.5, |b| {
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    })
}

pub struct CoordinatedHooks<'a> {
    rt: &'a tokio::runtime::Runtime,
    coord: Coordinator,
    cfg: &'a JobConfig,
    rank: usize,
    world_size: usize,
    progress: Arc<HeartbeatState>,
    last_log: Instant,
    samples_since_log: i64,
    captions: Option<CaptionTokens>,
    model_builder: ModelBuilder,
    /// Rank 0: the newest expert placement the coordinator's step replies carried.
    offered: Arc<Mutex<Option<ExpertPlacement>>>,
    /// `[eval]`: the rank's shares and (rank 0) the rounds so far.
    online_eval: OnlineEval,
    coll: Arc<dyn Collective>,
    /// `[audit]`: what this rank trained, step by step.
    audit: Option<AuditLog>,
    /// The epoch of the last committed step (where a regroup resumes).
    last_epoch: u32,
    /// The current epoch's leased shards (completed once their samples are trained).
    open_shards: Option<Arc<OpenShards>>,
    /// `cluster.min_workers`: every sample of the epoch trained in a committed step.
    trained: Arc<Mutex<TrainedSet>>,
    /// Rank 0: the checkpoint(s) waiting for an unreachable coordinator's shard state.
    unwritten_checkpoint: Option<tokio::task::JoinHandle<Result<()>>>,
    /// Samples per epoch from the dataset's manifest (the coordinator's rendezvous reply; 0:
    /// none).
    dataset_samples: u64,
}

/// A checkpoint's bytes and metadata, waiting only for the shard state.
struct PendingCheckpoint {
    url: String,
    s3_endpoint: String,
    keep: u32,
    meta: CheckpointMeta,
    model_bytes: Vec<u8>,
    optim_bytes: Vec<u8>,
}

impl PendingCheckpoint {
    /// Writes it with the coordinator's shard state `json`; returns the directory URL.
    async fn write(self, json: &str) -> Result<String> {
        let shard_state: ShardStateSnapshot =
            serde_json::from_str(json).context("parsing the coordinator's shard state")?;
        let meta = CheckpointMeta {
            shard_state,
            ..self.meta
        };
        write_checkpoint(
            &self.url,
            &self.s3_endpoint,
            self.keep,
            &meta,
            self.model_bytes,
            self.optim_bytes,
        )
        .await
    }
}

/// What building the job's model takes besides the config (to rebuild it for a new expert
/// placement).
pub struct ModelBuilder {
    pub tokenizer: Option<Arc<dyn Tokenizer>>,
    pub device: tch::Device,
    pub coll: Arc<dyn Collective>,
}

impl<'a> CoordinatedHooks<'a> {
    pub fn new(
        rt: &'a tokio::runtime::Runtime,
        coord: Coordinator,
        cfg: &'a JobConfig,
        asg: &Assignment,
        progress: Arc<HeartbeatState>,
        captions: Option<CaptionTokens>,
        model_builder: ModelBuilder,
    ) -> Result<Self> {
        let audit = AuditLog::new(cfg, asg.rank, coord.generation())?;
        Ok(Self {
            rt,
            coord,
            cfg,
            rank: asg.rank,
            world_size: asg.world_size,
            progress,
            last_log: Instant::now(),
            samples_since_log: 0,
            captions,
            online_eval: OnlineEval::new(cfg),
            coll: model_builder.coll.clone(),
            model_builder,
            offered: Arc::new(Mutex::new(None)),
            audit,
            last_epoch: asg.resume_epoch,
            open_shards: None,
            trained: Arc::default(),
            unwritten_checkpoint: None,
            dataset_samples: asg.dataset_samples,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The samples of the epoch trained so far (kept with `cluster.min_workers`).
    pub fn trained_set(&self) -> &Mutex<TrainedSet> {
        &self.trained
    }

    /// The epoch of the last step this rank committed.
    pub fn last_epoch(&self) -> u32 {
        self.last_epoch
    }

    /// After a regroup (new rank 0): the audit copies generation `old`'s recent records of
    /// every other rank (a dead rank's may not have been written), and notes that `old`
    /// committed through `step`, so records of a later step (which never committed) are not
    /// counted.
    pub fn audit_regroup(&mut self, old: u64, step: u64) -> Result<()> {
        match &mut self.audit {
            Some(audit) => {
                audit.write_copies(self.rt, old)?;
                audit.write_commit_point(self.rt, old, step)
            }
            None => Ok(()),
        }
    }

    /// After a rollback to a checkpoint of `epoch`: what was trained since is forgotten
    /// (samples of shards unfinished at the checkpoint are read again), and a placement
    /// offered for the old membership is dropped.
    pub fn rolled_back(&mut self, epoch: u32) {
        self.trained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(epoch, &[]);
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.last_epoch = epoch;
    }

    /// Forgets a replacement's request to regroup (the regroup now under way serves it).
    pub fn clear_regroup_request(&self) {
        self.progress.regroup.store(0, Ordering::SeqCst);
    }

    /// The job's model with its experts placed by `placement`.
    pub fn model_for(&self, placement: ExpertPlacement) -> Result<ContrastiveModel> {
        let b = &self.model_builder;
        let opts = BuildOptions {
            tokenizer: b.tokenizer.as_deref(),
            experts: Some((b.coll.clone(), Some(placement))),
        };
        ContrastiveModel::build(self.cfg, b.device, opts)
    }

    /// After a regroup: this worker's rank and world in the new generation.
    pub fn set_membership(&mut self, asg: &Assignment) {
        self.rank = asg.rank;
        self.world_size = asg.world_size;
        self.dataset_samples = asg.dataset_samples;
        if let Some(audit) = &mut self.audit {
            audit.set_membership(asg.rank, asg.generation);
        }
    }

    /// Waits for a checkpoint still waiting for the coordinator (rank 0: at the end, or once
    /// it is done) and returns how writing it went.
    pub fn finish_checkpoints(&mut self) -> Result<()> {
        match self.unwritten_checkpoint.take() {
            Some(task) => self
                .rt
                .block_on(task)
                .context("the checkpoint task")?
                .context("writing a checkpoint after the coordinator came back"),
            None => Ok(()),
        }
    }

    /// Writes the audit records not yet written (see [`AuditLog::flush`]).
    pub fn flush_audit(&mut self) -> Result<()> {
        match &mut self.audit {
            Some(a) => a.flush(self.rt),
            None => Ok(()),
        }
    }

    /// Rank 0 after training: the trained model's held-out kNN next to the first round's.
    pub fn eval_summary(&self) -> Option<String> {
        self.online_eval.summary()
    }
}

impl TrainHooks for CoordinatedHooks<'_> {
    fn epoch_source(&mut self, epoch: u32) -> Result<Box<dyn BatchSource>> {
        let open = Arc::new(OpenShards::new(
            self.rt.handle().clone(),
            self.coord.clone(),
        ));
        self.open_shards = Some(open.clone());
        let links = FeedLinks {
            progress: self.progress.clone(),
            open,
            trained: self.trained.clone(),
        };
        Ok(Box::new(EpochFeed::start(
            self.rt.handle().clone(),
            self.coord.clone(),
            self.cfg,
            self.rank,
            epoch,
            links,
            self.captions.clone(),
            self.model_builder.device,
        )?))
    }

    fn dataset_samples(&self) -> Option<u64> {
        (self.dataset_samples > 0).then_some(self.dataset_samples)
    }

    fn regroup_requested(&self) -> bool {
        // Only a request about the generation this worker trains in: a heartbeat reply sent
        // before the last regroup may arrive after it.
        self.progress.regroup.load(Ordering::SeqCst) == self.coord.generation() + 1
    }

    fn before_step(
        &mut self,
        epoch: u32,
        step: u64,
        samples: &[SampleRef],
        all: Option<&StepIds>,
    ) -> Result<()> {
        match &mut self.audit {
            Some(audit) => audit.record(self.rt, epoch, step, samples, all),
            None => Ok(()),
        }
    }

    fn record_trained(&mut self, epoch: u32, ids: &StepIds) {
        self.trained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(epoch, &ids.flat);
    }

    fn after_step(&mut self, ev: &StepEvent) -> Result<()> {
        self.progress.step.store(ev.step, Ordering::Relaxed);
        self.last_epoch = ev.epoch;
        if let Some(open) = &self.open_shards {
            open.trained(&ev.samples, ev.step);
        }

        // Fire and forget: a slow coordinator must not slow the step loop.
        let mut coord = self.coord.clone();
        let report = proto::StepReport {
            epoch: ev.epoch,
            step: ev.step,
            loss: ev.loss,
            global_samples: ev.global_samples as u64,
            learning_rate: ev.lr,
            step_seconds: ev.step_seconds,
            expert_load: expert_load_report(&ev.expert_load),
            placement_version: ev.placement_version,
            ..Default::default()
        };
        let offered = (self.rank == 0).then(|| self.offered.clone());
        self.rt.spawn(async move {
            match coord.report_step(report).await {
                Ok(reply) => {
                    // Only rank 0's replies carry a new placement; it passes it on in-band.
                    if let (Some(slot), Some(p)) = (offered, reply.placement.as_ref()) {
                        let p = ExpertPlacement::from(p);
                        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                        if slot.as_ref().is_none_or(|old| old.version < p.version) {
                            *slot = Some(p);
                        }
                    }
                }
                Err(e) => tracing::debug!("step report failed: {e:#}"),
            }
        });
        self.samples_since_log += ev.global_samples;
        if let (0, Some(loss)) = (
            self.rank,
            ev.loss
                .filter(|_| ev.step.is_multiple_of(self.cfg.train.log_every)),
        ) {
            let secs = self.last_log.elapsed().as_secs_f64().max(1e-9);
            println!(
                "epoch {:>3} step {:>6}  loss {:.4}  lr {:.4}  {:.1} samples/s ({} workers)",
                ev.epoch,
                ev.step,
                loss,
                ev.lr,
                self.samples_since_log as f64 / secs,
                self.world_size
            );
            if let Some(line) = expert_load_line(&ev.expert_load) {
                println!("{line}");
            }
            self.last_log = Instant::now();
            self.samples_since_log = 0;
        }
        Ok(())
    }

    fn checkpoint(
        &mut self,
        model: &ContrastiveModel,
        opt: &dyn Optimizer,
        epoch: u32,
        step: u64,
    ) -> Result<()> {
        let ck = &self.cfg.checkpoint;
        if ck.url.is_empty() {
            return Ok(());
        }
        let (variables, optim) = (model.named_variables(), opt.state_tensors());
        // Experts live on several ranks: all of them take part in collecting every expert.
        let (variables, optim) = match model.moe() {
            Some(rt) => rt
                .full_state(variables, optim)
                .context("collecting the experts for the checkpoint")?,
            None => (variables, optim),
        };
        if self.rank != 0 {
            return Ok(());
        }
        let model_bytes = tensors_to_safetensors(&variables)?;
        let optim_bytes = tensors_to_safetensors(&optim)?;
        let pending = PendingCheckpoint {
            url: ck.url.clone(),
            s3_endpoint: self.cfg.data.s3_endpoint.clone(),
            keep: ck.keep,
            meta: CheckpointMeta {
                step,
                epoch,
                world_size: self.world_size as u32,
                shard_state: ShardStateSnapshot::default(),
                config_toml: self.cfg.to_toml(),
                created_unix_ms: contrail_common::auth::unix_ms(),
                run: self.coord.run_id.clone(),
            },
            model_bytes,
            optim_bytes,
        };
        // The shard state as of this step comes from the coordinator. One that does not
        // answer (it is restarting) does not hold training up: the checkpoint is finished in
        // the background once it does, in order after any earlier one.
        let first_try = Duration::from_secs(2);
        if self
            .unwritten_checkpoint
            .as_ref()
            .is_some_and(|t| t.is_finished())
        {
            self.finish_checkpoints()?;
        }
        let earlier = self.unwritten_checkpoint.take();
        let answer = match earlier {
            Some(_) => None,
            None => Some(
                self.rt
                    .block_on(self.coord.shard_state_json_at(epoch, step, first_try)),
            ),
        };
        match answer {
            Some(Ok(json)) => {
                let dir = self.rt.block_on(pending.write(&json))?;
                println!("checkpoint written: {dir}");
            }
            Some(Err(s)) if !super::client::unreachable(&s) => {
                return Err(
                    anyhow::Error::new(s).context("fetching the shard state for a checkpoint")
                );
            }
            _ => {
                println!(
                    "checkpoint of step {step}: waiting for the coordinator's shard state; \
                     training goes on and the checkpoint is written once it answers"
                );
                let coord = self.coord.clone();
                self.unwritten_checkpoint = Some(self.rt.spawn(async move {
                    if let Some(earlier) = earlier {
                        earlier.await.context("an earlier checkpoint's task")??;
                    }
                    let json = coord
                        .shard_state_json_at(epoch, step, coord.outage())
                        .await
                        .map_err(|s| {
                            anyhow::Error::new(s).context(format!(
                                "fetching the shard state for the checkpoint of step {step}"
                            ))
                        })?;
                    let dir = pending.write(&json).await?;
                    println!("checkpoint written: {dir} (after the coordinator answered again)");
                    Ok(())
                }));
            }
        }
        Ok(())
    }

    fn stop_reason(&self) -> Option<String> {
        self.progress.stop_reason()
    }

    fn evaluate(&mut self, model: &ContrastiveModel, epoch: u32, step: u64) -> Result<()> {
        let Some(point) =
            self.online_eval
                .round(self.rt, model, self.coll.as_ref(), epoch, step)?
        else {
            return Ok(());
        };
        println!("{}", round_line(&point));
        let report = proto::EvalReport {
            epoch,
            step,
            knn_top1: point.knn_top1.unwrap_or(f64::NAN),
            knn_top5: point.knn_top5.unwrap_or(f64::NAN),
            bank_samples: point.bank_samples,
            test_samples: point.test_samples,
            skipped: point.skipped,
            seconds: point.seconds,
            error: point.error.clone(),
            zeroshot_top1: point.zeroshot_top1,
            zeroshot_top5: point.zeroshot_top5,
            image_to_text_r1: point.image_to_text_r1,
            text_to_image_r1: point.text_to_image_r1,
            retrieval_mean_recall: point.retrieval_mean_recall,
            ..Default::default()
        };
        // The round is in the log either way; a lost report only leaves /status short.
        if let Err(e) = self.rt.block_on(self.coord.report_eval(report)) {
            tracing::warn!("could not report the evaluation at step {step}: {e:#}");
        }
        Ok(())
    }

    fn offered_placement(&mut self) -> Option<ExpertPlacement> {
        self.offered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn build_model(&mut self, placement: ExpertPlacement) -> Result<ContrastiveModel> {
        self.model_for(placement)
    }
}

/// The step's expert load as the coordinator takes it (blocks in model order; counts are never
/// negative).
fn expert_load_report(load: &[crate::moe::BlockLoad]) -> Vec<proto::ExpertLoad> {
    load.iter()
        .enumerate()
        .map(|(b, l)| proto::ExpertLoad {
            block: b as u32,
            routed: l.routed.iter().map(|&r| r.max(0) as u64).collect(),
            dropped: l.dropped.max(0) as u64,
        })
        .collect()
}

/// `moe step load: block 0 max/mean 1.42 dropped 3.1%, block 1 ...` for the step, or None
/// without MoE blocks.
fn expert_load_line(load: &[crate::moe::BlockLoad]) -> Option<String> {
    if load.is_empty() {
        return None;
    }
    let blocks: Vec<String> = load
        .iter()
        .enumerate()
        .map(|(b, l)| {
            let routed: Vec<f64> = l.routed.iter().map(|&r| r as f64).collect();
            let total: f64 = routed.iter().sum();
            let dropped = if total > 0.0 {
                100.0 * l.dropped as f64 / total
            } else {
                0.0
            };
            format!(
                "block {b} max/mean {:.2} dropped {dropped:.1}%",
                contrail_common::experts::max_mean_ratio(&routed)
            )
        })
        .collect();
    Some(format!("moe step load: {}", blocks.join(", ")))
}
