//! A worker process from start to exit: register, rendezvous, connect the collective, train,
//! report, leave.
//!
//! Training runs on the calling thread (tch is synchronous); the caller's tokio runtime
//! carries the coordinator RPCs, the heartbeat task and the shard readers.

pub mod audit;
pub mod client;
mod coordinated;
pub mod device;
pub mod evaluation;
pub mod feed;
mod ledger;
pub mod node;
mod recovery;
mod resume_note;

pub use coordinated::heartbeat_loop;

use crate::dist::regroup::Regroupable;
use crate::dist::tcp::{TcpCollective, Topology};
use crate::dist::Collective;
use crate::model::init_weights::listing;
use crate::model::{BuildOptions, ContrastiveModel};
use crate::objective::build_objective;
use crate::optim;
use crate::tokenize::{ByteTokenizer, HfTokenizer, Tokenizer};
use crate::train::checkpoint::{read_checkpoint, safetensors_to_tensors};
use crate::train::trainer::{train, StartPoint};
use anyhow::{Context, Result};
use client::Coordinator;
use contrail_common::auth::JobToken;
use contrail_common::config::{ObjectiveKind, TokenizerSource};
use contrail_common::JobConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// gRPC endpoint of the coordinator, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Address the collective backend listens on (port 0 picks a free one).
    pub collective_bind: String,
    /// How long to keep trying to reach the coordinator at start-up.
    pub connect_wait: Duration,
    /// libtorch intra-op threads; 0 keeps libtorch's default.
    pub torch_threads: i32,
    /// The job's token: proves this worker to the coordinator and to its peers.
    pub token: JobToken,
    /// Its place on its node (the node worker that started it).
    pub node: node::NodeRank,
}

/// State shared between the training thread and the heartbeat task.
#[derive(Default)]
pub struct HeartbeatState {
    pub step: AtomicU64,
    pub shard: Mutex<String>,
    /// Set when the coordinator tells this worker to stop, or it can no longer be reached.
    pub stop: Mutex<Option<String>>,
    /// A replacement waits to join: the members of generation `regroup - 1` regroup at the
    /// next step boundary (0: no request).
    pub regroup: AtomicU64,
    /// The regroupable collective (once built): a heartbeat that hears of a lost member
    /// interrupts the collective in progress.
    pub collective: std::sync::OnceLock<Arc<Regroupable>>,
}

impl HeartbeatState {
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.lock().map(|s| s.clone()).unwrap_or(None)
    }
}

/// One worker from registration to leaving, training on this thread; `rt` (a multi-thread
/// runtime, as `Coordinator::serve` takes its listeners) carries everything asynchronous.
pub fn run_worker(rt: &tokio::runtime::Runtime, opts: &WorkerOptions) -> Result<()> {
    if opts.torch_threads > 0 {
        tch::set_num_threads(opts.torch_threads);
    }
    let bootstrap = TcpCollective::bind(&opts.collective_bind)
        .with_context(|| {
            format!(
                "binding the collective listener on {}",
                opts.collective_bind
            )
        })?
        .with_token(opts.token.clone());
    let collective_addr = bootstrap
        .local_addr()
        .context("reading the collective listener's address")?
        .to_string();
    let mut coord = rt.block_on(Coordinator::register(
        &opts.coordinator,
        &collective_addr,
        Some(&opts.node),
        opts.connect_wait,
        Some(opts.token.clone()),
    ))?;
    let asg = rt.block_on(coord.rendezvous())?;
    let cfg = JobConfig::from_toml(&asg.job_toml)
        .context("the coordinator sent a job config this worker rejects")?;
    tracing::info!(
        rank = asg.rank,
        world = asg.world_size,
        node = %opts.node.node,
        local_rank = opts.node.local_rank,
        collective = %collective_addr,
        "joined the job"
    );
    let progress = Arc::new(HeartbeatState::default());
    progress.step.store(asg.resume_step, Ordering::Relaxed);
    let outage = Duration::from_millis(cfg.cluster.coordinator_timeout_ms);
    coord.set_outage(outage);
    let heartbeat = rt.spawn(coordinated::heartbeat_loop(
        coord.clone(),
        progress.clone(),
        Duration::from_millis(cfg.cluster.heartbeat_ms),
        outage,
    ));

    let result = (|| -> Result<()> {
        let gpus = tch::Cuda::device_count().max(0) as usize;
        let device = device::choose_device(cfg.cluster.device, opts.node.gpu, gpus)?;
        let nccl = device::use_nccl(cfg.cluster.backend, device)?;
        let timeout = Duration::from_millis(cfg.cluster.collective_timeout_ms);
        let transport = device::transport(nccl, device, timeout)?;
        // Recovery (cluster.min_workers) rebuilds the mesh in place: a new TCP mesh and, with
        // NCCL, a new communicator (the old one aborted).
        let recoverable = cfg.cluster.min_workers > 0;
        // Only MoE's token exchange needs a link between every pair of ranks; everything
        // else (and an NCCL job's side channel) runs on ring neighbours: O(1) sockets a rank.
        let topology = if cfg.moe.enabled() {
            Topology::Mesh
        } else {
            Topology::Ring
        };
        let bootstrap = bootstrap
            .with_generation(coord.generation())
            .with_topology(topology);
        // Shared: the MoE blocks of the model exchange tokens through it too.
        let r = if recoverable && asg.joining {
            // A replacement forms its first generation like a survivor forms the next one
            // (`train_rank`), so a member dying meanwhile only means another try.
            Regroupable::unconnected(bootstrap, asg.rank, asg.world_size, transport)
        } else {
            let tcp = bootstrap
                .connect(asg.rank, asg.peers.clone(), timeout)
                .context("connecting to the other workers")?;
            Regroupable::new(tcp, transport).with_context(|| {
                format!(
                    "rank {}: setting up the collective ({transport:?})",
                    asg.rank
                )
            })?
        };
        let r = Arc::new(r);
        let coll: Arc<dyn Collective> = r.clone();
        if recoverable {
            let _ = progress.collective.set(r.clone());
        }
        let regroup = recoverable.then_some(r);
        tracing::info!(
            rank = asg.rank,
            ?device,
            backend = if nccl { "nccl" } else { "tcp" },
            "collective ready"
        );
        let link = Link {
            coll: &coll,
            regroup: regroup.as_deref(),
        };
        train_rank(rt, &mut coord, &cfg, &asg, link, device, &progress)
    })();

    heartbeat.abort();
    let leave = match &result {
        Ok(()) => rt.block_on(coord.leave(true, String::new())),
        Err(e) => rt.block_on(coord.leave(false, format!("rank {}: {e:#}", asg.rank))),
    };
    if let Err(e) = leave {
        tracing::warn!("could not tell the coordinator this worker is leaving: {e:#}");
    }
    result
}

/// The collective a rank trains with, and (with `cluster.min_workers`) the handle that
/// rebuilds it after a failure.
#[derive(Clone, Copy)]
struct Link<'a> {
    coll: &'a Arc<dyn Collective>,
    regroup: Option<&'a Regroupable>,
}

fn train_rank(
    rt: &tokio::runtime::Runtime,
    coord: &mut Coordinator,
    cfg: &JobConfig,
    asg: &client::Assignment,
    link: Link<'_>,
    device: tch::Device,
    progress: &Arc<HeartbeatState>,
) -> Result<()> {
    let coll = link.coll;
    // Same seed on every rank: identical initial parameters without a broadcast.
    tch::manual_seed(cfg.train.seed as i64);
    let captions = caption_tokens(rt, cfg)?;
    let opts = BuildOptions {
        tokenizer: captions.as_ref().map(|c| c.tokenizer.as_ref()),
        experts: Some((coll.clone(), asg.placement.clone())),
    };
    let mut model = ContrastiveModel::build(cfg, device, opts)?;
    if !cfg.model.init_weights.is_empty() && asg.resume_checkpoint.is_empty() {
        let url = &cfg.model.init_weights;
        let bytes = fetch_bytes(rt, url, &cfg.data.s3_endpoint)
            .with_context(|| format!("reading model.init_weights {url}"))?;
        let tensors = safetensors_to_tensors(&bytes)
            .with_context(|| format!("model.init_weights {url} is not a safetensors file"))?;
        let plan = model
            .load_initial(&tensors, cfg.model.init_partial)
            .with_context(|| format!("loading model.init_weights {url}"))?;
        if asg.rank == 0 {
            println!(
                "initial weights from {url}: {} tensors loaded into {}{}",
                plan.pairs.len(),
                plan.destination(),
                plan.mapping_note()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            );
            if !plan.missing.is_empty() {
                println!(
                    "  missing (model.init_partial: kept their initialisation): {}",
                    listing(&plan.missing)
                );
            }
            println!(
                "  heads kept their initialisation: {}",
                listing(&plan.heads_kept)
            );
            println!(
                "  tensors of the file that match no variable: {}",
                listing(&plan.unexpected)
            );
        }
    }
    // Before the optimizer exists, so its state takes the weights' layout.
    model.set_compute(device::choose_compute(cfg, device)?);
    model.set_grad_sync(grad_sync(cfg));
    let mut opt = model.job_optimizer(cfg);
    let mut start = StartPoint::default();
    if !asg.resume_checkpoint.is_empty() {
        load_checkpoint(rt, cfg, &mut model, opt.as_mut(), &asg.resume_checkpoint)?;
        start = StartPoint {
            epoch: asg.resume_epoch,
            step: asg.resume_step,
        };
        if asg.rank == 0 {
            println!(
                "resumed from {} (epoch {}, step {})",
                asg.resume_checkpoint, start.epoch, start.step
            );
            match read_meta(rt, cfg, &asg.resume_checkpoint) {
                Ok(meta) => println!(
                    "{}",
                    resume_note::resume_note(
                        &meta,
                        &coord.run_id,
                        &cfg.to_toml(),
                        contrail_common::auth::unix_ms()
                    )
                ),
                Err(e) => println!("  (its meta.json could not be read: {e:#})"),
            }
            let t = &cfg.train;
            if (t.epochs > 0 && start.epoch >= t.epochs)
                || (t.max_steps > 0 && start.step >= t.max_steps)
            {
                println!(
                    "that checkpoint already completed this job's train.epochs / train.max_steps: \
                     nothing to train (raise them, or point checkpoint.url elsewhere to start over)"
                );
            }
        }
    }
    let rebuild = coordinated::ModelBuilder {
        tokenizer: captions.as_ref().map(|c| c.tokenizer.clone()),
        device,
        coll: coll.clone(),
    };
    let mut hooks = coordinated::CoordinatedHooks::new(
        rt,
        coord.clone(),
        cfg,
        asg,
        progress.clone(),
        captions,
        rebuild,
    )?;
    let mut objective = build_objective(cfg);
    let mut run_cfg = cfg.clone();
    if let (true, Some(regroup)) = (asg.joining, link.regroup) {
        // A replacement: the members' state, step and trained samples, over the new mesh.
        let (joined, epoch, step) = form_generation(
            rt,
            coord,
            cfg,
            regroup,
            coll.as_ref(),
            (&mut model, &mut opt, &hooks),
            (0, 0),
            Attempt::First(asg.clone()),
        )
        .context("taking the running job's state from its members")?;
        progress.step.store(step, Ordering::Relaxed);
        run_cfg = recovery::resized(cfg, joined.world_size)?;
        hooks.set_membership(&joined);
        eprintln!(
            "rank {}: joined the running job at epoch {epoch} step {step} ({} workers)",
            joined.rank, joined.world_size
        );
        start = StartPoint { epoch, step };
    }
    let summary = loop {
        let result = train(
            &run_cfg,
            &mut model,
            &mut opt,
            objective.as_mut(),
            coll.as_ref(),
            &mut hooks,
            start,
        );
        let (Err(e), Some(regroup)) = (&result, link.regroup) else {
            break result;
        };
        if !recovery::is_peer_failure(e) {
            break result;
        }
        // The steps this rank committed stay in its audit; then the survivors regroup.
        hooks.flush_audit()?;
        let last = (hooks.last_epoch(), progress.step.load(Ordering::Relaxed));
        eprintln!("rank {}: {e:#}; regrouping", hooks.rank());
        let old_generation = coord.generation();
        let (next, epoch, step) = form_generation(
            rt,
            coord,
            cfg,
            regroup,
            coll.as_ref(),
            (&mut model, &mut opt, &hooks),
            last,
            Attempt::After(format!("{e:#}"), recovery::failed_peer(e)),
        )?;
        progress.step.store(step, Ordering::Relaxed);
        run_cfg = recovery::resized(cfg, next.world_size)?;
        if next.rollback {
            // An MoE worker died with its experts: the model is built again for the new
            // placement and every member takes the checkpoint's state.
            let placement = next
                .placement
                .clone()
                .context("the coordinator sent a rollback without an expert placement")?;
            model = hooks.model_for(placement)?;
            model.set_compute(device::choose_compute(cfg, device)?);
            model.set_grad_sync(grad_sync(cfg));
            opt = model.job_optimizer(cfg);
            load_checkpoint(rt, cfg, &mut model, opt.as_mut(), &next.resume_checkpoint)?;
            hooks.rolled_back(epoch);
            if next.rank == 0 {
                println!(
                    "rolled back to {} (epoch {epoch}, step {step}) with {} workers: a worker \
                     holding experts died",
                    next.resume_checkpoint, next.world_size
                );
            }
        }
        if next.rank == 0 {
            hooks
                .audit_regroup(old_generation, step)
                .context("writing the audit's commit point")?;
        }
        hooks.set_membership(&next);
        if next.rank == 0 {
            println!(
                "regrouped as generation {} with {} workers; training on from epoch {epoch} \
                 step {step}",
                next.generation, next.world_size
            );
        }
        start = StartPoint { epoch, step };
    };
    // The steps since the last part were committed too: the audit keeps them even when
    // training failed afterwards.
    let flushed = hooks.flush_audit();
    let checkpointed = hooks.finish_checkpoints();
    let summary = summary?;
    flushed?;
    checkpointed?;
    // Every rank ends with the same parameters (every replica of an expert with the same
    // expert); the digests let a log (and the recovery tests) show it. Hashing the weights
    // costs a pass over them, so only when logged.
    if tracing::enabled!(tracing::Level::INFO) {
        tracing::info!(
            rank = hooks.rank(),
            digest = %recovery::parameter_digest(&model)?,
            experts = %recovery::expert_digests(&model)?,
            "final parameters"
        );
    }
    if let Some(line) = hooks.eval_summary() {
        println!("{line}");
    }
    // After a regroup this worker may hold another rank than it started with.
    if hooks.rank() == 0 {
        match (summary.first_loss, summary.last_loss) {
            (Some(first), Some(last)) => println!(
                "rank 0 finished: {} steps, {} epochs, loss {first:.4} -> {last:.4}",
                summary.steps, summary.epochs_completed
            ),
            _ => println!(
                "rank 0 finished: no steps trained (at step {}, epoch {})",
                start.step, start.epoch
            ),
        }
    }
    Ok(())
}

/// Loads the checkpoint at `dir` into `model` and `opt` (an MoE rank keeps the experts its
/// placement gives it).
/// The metadata of the checkpoint in directory `dir`.
fn read_meta(
    rt: &tokio::runtime::Runtime,
    cfg: &JobConfig,
    dir: &str,
) -> Result<contrail_common::checkpoint::CheckpointMeta> {
    let url = contrail_common::checkpoint::join_url(dir, crate::train::checkpoint::META_FILE);
    let bytes = rt
        .block_on(contrail_common::checkpoint::read_bytes(
            &url,
            &cfg.data.s3_endpoint,
        ))?
        .with_context(|| format!("{url} is missing"))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {url}"))
}

fn load_checkpoint(
    rt: &tokio::runtime::Runtime,
    cfg: &JobConfig,
    model: &mut ContrastiveModel,
    opt: &mut dyn optim::Optimizer,
    dir: &str,
) -> Result<()> {
    let tensors = rt
        .block_on(read_checkpoint(dir, &cfg.data.s3_endpoint))
        .with_context(|| format!("resuming from {dir}"))?;
    // A checkpoint holds every expert; this rank loads the ones its placement gives it.
    let (model_tensors, optim_tensors) = match model.moe() {
        Some(rt) => (rt.keep_local(tensors.model), rt.keep_local(tensors.optim)),
        None => (tensors.model, tensors.optim),
    };
    model.load_named(&model_tensors)?;
    if opt.loss_scale().is_none() {
        // An fp16 run's checkpoint resumed without fp16: its loss scale has no use here.
        opt.load_state(&crate::optim::loss_scale::without_loss_scale(
            &optim_tensors,
        ))?;
    } else {
        opt.load_state(&optim_tensors)?;
    }
    Ok(())
}

/// How [`form_generation`] starts: with the assignment a replacement got at rendezvous, by
/// asking the coordinator for the next generation after a failure (and the peer it names),
/// or by asking it to roll every member back to the checkpoint (why).
enum Attempt {
    First(client::Assignment),
    After(String, Option<usize>),
    RollBack(String),
}

/// What a formed generation agreed on: the (epoch, step) to train on from, or that its MoE
/// state cannot be agreed and it must roll back (why).
enum Agreed {
    At(u32, u64),
    RollBack(String),
}

/// Forms a generation and agrees on its state: builds the mesh on this worker's listener,
/// then takes the most advanced member's state (`recovery::agree_on_state`; with MoE blocks
/// each expert from a surviving replica, `recovery::agree_on_moe_state`). A peer that fails
/// meanwhile sends everyone back to the coordinator for the generation after, as often as it
/// takes (each try is bounded by the collective timeout). Returns this worker's place and
/// the (epoch, step) to train on from.
#[allow(clippy::too_many_arguments)]
fn form_generation(
    rt: &tokio::runtime::Runtime,
    coord: &mut Coordinator,
    cfg: &JobConfig,
    regroup: &Regroupable,
    coll: &dyn Collective,
    (model, opt, hooks): (
        &mut ContrastiveModel,
        &mut Box<dyn optim::Optimizer>,
        &coordinated::CoordinatedHooks<'_>,
    ),
    last: (u32, u64),
    mut attempt: Attempt,
) -> Result<(client::Assignment, u32, u64)> {
    // Long enough for the peer's death to be declared, and for replacements to come when
    // fewer than `min_workers` are left.
    let wait = Duration::from_millis(
        cfg.cluster.worker_timeout_ms * 3 + 5_000 + cfg.cluster.replacement_wait_ms,
    );
    loop {
        let next = match attempt {
            Attempt::First(asg) => asg,
            Attempt::After(failure, suspect) => {
                hooks.clear_regroup_request();
                rt.block_on(coord.regroup(wait, suspect, ""))
                    .with_context(|| format!("regrouping after: {failure}"))?
            }
            Attempt::RollBack(why) => rt
                .block_on(coord.regroup(wait, None, &why))
                .with_context(|| format!("rolling back after: {why}"))?,
        };
        let formed = regroup
            .regroup(
                next.rank,
                next.peers.clone(),
                next.generation,
                Duration::from_millis(cfg.cluster.collective_timeout_ms),
            )
            .context("building the new generation's mesh")
            .and_then(|()| {
                if next.rollback {
                    // The state comes from the checkpoint (the caller loads it).
                    return Ok(Agreed::At(next.resume_epoch, next.resume_step));
                }
                if model.moe().is_none() {
                    let (epoch, step) = recovery::agree_on_state(
                        coll,
                        model,
                        opt.as_mut(),
                        hooks.trained_set(),
                        last,
                    )
                    .context("taking the most advanced member's state")?;
                    return Ok(Agreed::At(epoch, step));
                }
                let placement = next
                    .placement
                    .clone()
                    .context("the coordinator sent no expert placement for an MoE job")?;
                let agreed = recovery::agree_on_moe_state(
                    coll,
                    model,
                    opt,
                    hooks.trained_set(),
                    last,
                    placement,
                    &cfg.optim,
                    &mut |p| hooks.model_for(p),
                )
                .context("taking the experts over from their surviving replicas")?;
                Ok(match agreed {
                    recovery::MoeAgreement::Agreed(epoch, step) => Agreed::At(epoch, step),
                    recovery::MoeAgreement::RollBack(why) => Agreed::RollBack(why),
                })
            });
        match formed {
            Ok(Agreed::At(epoch, step)) => return Ok((next, epoch, step)),
            Ok(Agreed::RollBack(why)) => {
                eprintln!(
                    "rank {} of generation {}: {why}; asking the coordinator for a rollback to \
                     the latest checkpoint",
                    next.rank, next.generation
                );
                attempt = Attempt::RollBack(why);
            }
            Err(e) if recovery::is_peer_failure(&e) => {
                eprintln!(
                    "rank {} of generation {}: {e:#}; regrouping again",
                    next.rank, next.generation
                );
                attempt = Attempt::After(format!("{e:#}"), recovery::failed_peer(&e));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The caption tokenizer of a CLIP job (`model.text.tokenizer`): the built-in byte-level one,
/// or a `tokenizer.json` read from any storage URL.
pub fn caption_tokens(
    rt: &tokio::runtime::Runtime,
    cfg: &JobConfig,
) -> Result<Option<feed::CaptionTokens>> {
    if cfg.objective.kind != ObjectiveKind::Clip {
        return Ok(None);
    }
    let tokenizer: Arc<dyn Tokenizer> = match &cfg.model.text.tokenizer {
        TokenizerSource::Byte => Arc::new(ByteTokenizer::new()),
        TokenizerSource::Url(url) => {
            let bytes = fetch_bytes(rt, url, &cfg.data.s3_endpoint)
                .with_context(|| format!("reading the tokenizer model.text.tokenizer {url}"))?;
            Arc::new(
                HfTokenizer::from_bytes(&bytes)
                    .with_context(|| format!("loading the tokenizer {url}"))?,
            )
        }
    };
    Ok(Some(feed::CaptionTokens {
        tokenizer,
        context_length: cfg.model.text.context_length as usize,
    }))
}

/// The whole object at `url` (any storage URL contrail reads).
fn fetch_bytes(rt: &tokio::runtime::Runtime, url: &str, s3_endpoint: &str) -> Result<bytes::Bytes> {
    let loc = contrail_common::storage::resolve(url, s3_endpoint)?;
    Ok(rt.block_on(async { loc.store.get(&loc.path).await?.bytes().await })?)
}

/// How steps sum gradients across ranks, as `cluster.overlap`, `cluster.bucket_mb` and
/// `cluster.grad_dtype` say.
fn grad_sync(cfg: &JobConfig) -> crate::dist::grad_sync::GradSync {
    crate::dist::grad_sync::GradSync {
        overlap: cfg.cluster.overlap,
        bucket_bytes: crate::dist::grad_sync::bucket_bytes(cfg.cluster.bucket_mb),
        bf16: cfg.cluster.grad_dtype == contrail_common::config::GradDtype::Bf16,
    }
}
