//! `contrail local`: a coordinator in this process and N worker processes on 127.0.0.1.
//!
//! The workers are real processes (this same binary, `contrail worker`), so the local cluster
//! exercises the same gRPC, collective and failure paths as a multi-machine job. The same
//! harness runs the workers of a distributed export (`contrail embed --workers N`).

use crate::commands::synth;
use anyhow::{bail, Context, Result};
use contrail_common::auth::{JobToken, TOKEN_ENV};
use contrail_common::config::Backend;
use contrail_common::status::{render_status_text, JobState};
use contrail_common::storage::list_shards;
use contrail_common::JobConfig;
use contrail_coordinator::access::Access;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

pub fn run_local(
    rt: &Runtime,
    config_path: &str,
    workers: u32,
    overrides: &[String],
    verbose: bool,
) -> Result<()> {
    let mut overrides = overrides.to_vec();
    overrides.push(format!("cluster.world_size={workers}"));
    let mut cfg = JobConfig::from_file(config_path, &overrides)?;
    // NCCL refuses two ranks on one GPU: workers that must share GPUs talk over TCP.
    let gpus = tch::Cuda::device_count().max(0) as u32;
    if cfg.cluster.backend == Backend::Auto && gpus > 0 && workers > gpus {
        println!(
            "{workers} workers share {gpus} GPU(s): collectives go over TCP (cluster.backend = \"tcp\")"
        );
        cfg.cluster.backend = Backend::Tcp;
    }

    synth_if_empty(
        rt,
        &cfg,
        &cfg.data.url,
        cfg.data.synth_samples,
        cfg.train.seed,
        "the synthetic dataset",
        || {
            format!(
                "no shards at {} (data.synth_samples = 0, so no synthetic data is written; \
                 import a dataset there first, e.g. `contrail data import`)",
                cfg.data.url
            )
        },
    )?;
    // The held-out set is drawn with the next seed, so none of its samples is one of the
    // training data's.
    if cfg.eval.enabled() {
        synth_if_empty(
            rt,
            &cfg,
            &cfg.eval.url,
            cfg.eval.synth_samples,
            cfg.train.seed + 1,
            "a synthetic held-out set",
            || {
                format!(
                    "no shards at eval.url {} (eval.synth_samples = 0, so no synthetic held-out \
                     set is written; import the test split there, e.g. `contrail data import`)",
                    cfg.eval.url
                )
            },
        )?;
    }

    run_cluster(rt, &cfg, workers, &["worker"], verbose)
}

/// Serves the job `cfg` from a coordinator in this process and runs `workers` child
/// processes of this binary (`child_args`, then `--coordinator URL --threads N`) until the job
/// ends, a child dies, or Ctrl-C; prints the final status. `contrail local` runs training
/// workers this way, `contrail embed --workers N` embedding workers.
pub fn run_cluster(
    rt: &Runtime,
    cfg: &JobConfig,
    workers: u32,
    child_args: &[&str],
    verbose: bool,
) -> Result<()> {
    let mut cfg = cfg.clone();
    cfg.cluster.world_size = workers;
    // Bind first, so `:0` in the config becomes a real port that the workers are given.
    let grpc = rt
        .block_on(tokio::net::TcpListener::bind(&cfg.cluster.grpc_addr))
        .with_context(|| {
            format!(
                "binding the coordinator's gRPC address {}",
                cfg.cluster.grpc_addr
            )
        })?;
    let http = rt
        .block_on(tokio::net::TcpListener::bind(&cfg.cluster.http_addr))
        .with_context(|| format!("binding the status address {}", cfg.cluster.http_addr))?;
    cfg.cluster.grpc_addr = grpc.local_addr()?.to_string();
    cfg.cluster.http_addr = http.local_addr()?.to_string();

    let toml = cfg.to_toml();
    // A fresh token per run: the workers get it in their environment, nobody else has it.
    let token = JobToken::generate()?;
    let access = Access::with_job_token(token.clone());
    let coordinator = rt.block_on(contrail_coordinator::Coordinator::new(
        cfg.clone(),
        toml,
        Some(&token),
    ))?;
    let mut state = coordinator.watch_state();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(coordinator.clone().serve(grpc, http, access, async {
        let _ = shutdown_rx.await;
    }));
    let status_url = format!("http://{}", cfg.cluster.http_addr);
    println!(
        "coordinator: gRPC {} | status {status_url}/status",
        cfg.cluster.grpc_addr
    );
    let exe = std::env::current_exe().context("locating the contrail binary to start workers")?;
    println!(
        "watch with: {} status --coordinator {status_url} --watch 2",
        exe.display()
    );

    // Workers share this machine's cores; oversubscribed libtorch threads only slow them down.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let threads = (cores / workers).max(1).to_string();
    let mut children: Vec<Child> = Vec::new();
    for i in 0..workers {
        let mut cmd = Command::new(&exe);
        cmd.args(child_args)
            .args([
                "--coordinator",
                &format!("http://{}", cfg.cluster.grpc_addr),
            ])
            .args(["--threads", &threads])
            .env(TOKEN_ENV, token.expose())
            .stdin(Stdio::null());
        // Only rank 0 prints progress lines, so every worker can share this terminal.
        if verbose {
            cmd.env("CONTRAIL_LOG", "info");
        }
        children.push(
            cmd.spawn()
                .with_context(|| format!("starting worker process {i} ({})", exe.display()))?,
        );
    }

    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }

    // Wait for the job to end, a worker process to die, or Ctrl-C.
    let started = Instant::now();
    let mut exited_early: Option<String> = None;
    let final_state = loop {
        let s = *state.borrow_and_update();
        if s.is_terminal() {
            break s;
        }
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            println!("interrupted: stopping the workers");
            break JobState::Failed;
        }
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(code)) = c.try_wait() {
                if !code.success() && exited_early.is_none() {
                    exited_early = Some(format!("worker process {i} exited with {code}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    // Give workers a moment to leave on their own (none after Ctrl-C), then make sure none
    // outlives us.
    let grace = Instant::now();
    let patience = if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        Duration::ZERO
    } else {
        Duration::from_secs(10)
    };
    for c in children.iter_mut() {
        while grace.elapsed() < patience {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    let report = coordinator.status();
    let _ = shutdown_tx.send(());
    let _ = rt.block_on(server);
    println!("{}", render_status_text(&report));
    println!(
        "local cluster ran for {:.1}s",
        started.elapsed().as_secs_f64()
    );
    match final_state {
        JobState::Finished => Ok(()),
        _ if interrupted.load(std::sync::atomic::Ordering::SeqCst) => {
            bail!(
                "interrupted (Ctrl-C) at step {}; the workers were stopped",
                report.step
            )
        }
        _ => {
            let mut reason = report.reason.clone();
            if let Some(e) = exited_early {
                reason = format!("{reason} ({e})");
            }
            bail!("the job did not finish: {reason}")
        }
    }
}

/// Writes `samples` synthetic samples (`what`, for the progress line) at `url` when it holds
/// no shards; with none to write (`samples = 0`) an empty `url` is the error `missing`.
fn synth_if_empty(
    rt: &Runtime,
    cfg: &JobConfig,
    url: &str,
    samples: u64,
    seed: u64,
    what: &str,
    missing: impl FnOnce() -> String,
) -> Result<()> {
    if !rt
        .block_on(list_shards(url, &cfg.data.s3_endpoint))?
        .is_empty()
    {
        return Ok(());
    }
    if samples == 0 {
        bail!(missing());
    }
    let shard_size = cfg.data.synth_shard_size;
    println!("no shards at {url}: writing {what} ({samples} samples, {shard_size} per shard)");
    synth(
        rt,
        url,
        samples,
        shard_size,
        64,
        seed,
        &cfg.data.s3_endpoint,
    )
}
