//! One worker of a distributed export (`contrail embed --workers N` starts them; on Kubernetes
//! each pod runs `contrail embed-worker`): it joins the coordinator like a training worker,
//! then leases the dataset's shards of epoch 0 one at a time, writes each as the part of its
//! listing position, and reports it done, until the coordinator has none left.
//!
//! The coordinator's lease book gives each shard to one worker at a time; a lease that expires
//! (a worker that stopped heartbeating) goes to another, which writes the same part again, so
//! the folder holds every sample exactly once however the work was split.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use contrail_common::storage::list_shards;
use contrail_common::JobConfig;
use tokio::runtime::Runtime;

use super::{checkpoint_base, load_model, EmbedSummary, EmbedTower, ShardExporter};
use crate::process::client::{Coordinator, Lease};
use crate::process::{caption_tokens, device, heartbeat_loop, HeartbeatState};

/// What an embedding worker is told on its command line (the job itself comes from the
/// coordinator: `data.url` is the dataset, `checkpoint.url` the default checkpoint).
#[derive(Clone, Debug)]
pub struct EmbedWorkerOptions {
    pub coordinator: String,
    pub out: String,
    pub tower: EmbedTower,
    pub batch: usize,
    /// Checkpoint base URL; None: the job's `checkpoint.url` (unless `random_init`).
    pub checkpoint: Option<String>,
    pub random_init: bool,
    pub connect_wait: Duration,
    /// libtorch intra-op threads; 0 keeps libtorch's default.
    pub torch_threads: i32,
    /// The job's token (the coordinator refuses calls without it).
    pub token: contrail_common::auth::JobToken,
}

/// Registers, embeds leased shards until none is left, and leaves (with the error, if any).
pub fn run_embed_worker(rt: &Runtime, opts: &EmbedWorkerOptions) -> Result<EmbedSummary> {
    if opts.torch_threads > 0 {
        tch::set_num_threads(opts.torch_threads);
    }
    // No collective: an export's workers never talk to each other.
    let mut coord = rt.block_on(Coordinator::register(
        &opts.coordinator,
        "",
        None,
        opts.connect_wait,
        Some(opts.token.clone()),
    ))?;
    let asg = rt.block_on(coord.rendezvous())?;
    let cfg = JobConfig::from_toml(&asg.job_toml)
        .context("the coordinator sent a job config this worker rejects")?;
    let progress = Arc::new(HeartbeatState::default());
    let outage = Duration::from_millis(cfg.cluster.coordinator_timeout_ms);
    coord.set_outage(outage);
    let heartbeat = rt.spawn(heartbeat_loop(
        coord.clone(),
        progress.clone(),
        Duration::from_millis(cfg.cluster.heartbeat_ms),
        outage,
    ));
    let result = embed_leased(rt, &mut coord, &cfg, asg.rank, opts, &progress);
    heartbeat.abort();
    let leave = match &result {
        Ok(_) => rt.block_on(coord.leave(true, String::new())),
        Err(e) => rt.block_on(coord.leave(false, format!("embed rank {}: {e:#}", asg.rank))),
    };
    if let Err(e) = leave {
        tracing::warn!("could not tell the coordinator this worker is leaving: {e:#}");
    }
    result
}

fn embed_leased(
    rt: &Runtime,
    coord: &mut Coordinator,
    cfg: &JobConfig,
    rank: usize,
    opts: &EmbedWorkerOptions,
    progress: &HeartbeatState,
) -> Result<EmbedSummary> {
    let gpus = tch::Cuda::device_count().max(0) as usize;
    let device = device::choose_device(cfg.cluster.device, (gpus > 0).then(|| rank % gpus), gpus)?;
    let base = checkpoint_base(opts.checkpoint.as_deref(), opts.random_init, cfg, "embed")?;
    let (model, loaded) = load_model(rt, cfg, base.as_deref(), device)?;
    let options = super::EmbedOptions {
        data: cfg.data.url.clone(),
        out: opts.out.clone(),
        batch: opts.batch,
        tower: opts.tower,
        device,
    };
    // The coordinator leases the URLs of this same listing; a shard's position names its part.
    let shards = rt.block_on(list_shards(&options.data, &cfg.data.s3_endpoint))?;
    let position: HashMap<&str, usize> = shards
        .iter()
        .enumerate()
        .map(|(i, u)| (u.as_str(), i))
        .collect();
    let mut exporter = ShardExporter::new(&model, cfg, &options, caption_tokens(rt, cfg)?)?;
    let mut summary = EmbedSummary {
        shards: shards.len(),
        checkpoint: loaded,
        ..Default::default()
    };
    loop {
        if let Some(reason) = progress.stop_reason() {
            anyhow::bail!("stopping: {reason}");
        }
        let (url, lease_id) = match rt.block_on(coord.lease_shard(0))? {
            Lease::Exhausted => break,
            Lease::Shard { url, lease_id } => (url, lease_id),
        };
        let index = *position.get(url.as_str()).with_context(|| {
            format!(
                "the coordinator leased {url}, which is not among the {} shards at {}",
                shards.len(),
                options.data
            )
        })?;
        if let Ok(mut s) = progress.shard.lock() {
            s.clone_from(&url);
        }
        match exporter.export(rt.handle(), index, &url) {
            Ok(done) => {
                rt.block_on(coord.complete_shard(
                    lease_id,
                    done.rows as u64,
                    done.skipped.clone(),
                    String::new(),
                    0,
                ))?;
                summary.add(&done);
                progress.step.fetch_add(1, Ordering::Relaxed);
                // One write per line: the workers share the terminal.
                let line = format!(
                    "embed rank {rank}: part {index} ({} rows) from {url}; {} parts, {} rows, {} skipped so far\n",
                    done.rows,
                    summary.parts,
                    summary.rows,
                    summary.skipped_total()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            }
            Err(e) => {
                // The coordinator logs the shard as failed and the job goes on without it.
                let error = format!("{e:#}");
                tracing::warn!(shard = %url, "embed: shard failed: {error}");
                *summary
                    .skipped
                    .entry("unreadable shard".into())
                    .or_default() += 1;
                rt.block_on(coord.complete_shard(lease_id, 0, Default::default(), error, 0))?;
            }
        }
    }
    Ok(summary)
}
