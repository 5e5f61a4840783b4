//! `contrail local`: a coordinator process and M node workers of N ranks each on 127.0.0.1.
//!
//! They are real processes (this same binary, `contrail coordinator` and `contrail worker`,
//! whose ranks are `contrail rank` processes when N > 1),
//! so the local cluster exercises the same gRPC, collective and failure paths as a
//! multi-machine job, and a crashed coordinator is started again like a Kubernetes pod. The same
//! harness runs the workers of a distributed export (`contrail embed --workers N`).

use crate::commands::synth;
use crate::status_client::fetch_status;
use anyhow::{bail, Context, Result};
use contrail_common::auth::{JobToken, TOKEN_ENV};
use contrail_common::config::Backend;
use contrail_common::status::{render_status_text, JobState, StatusReport};
use contrail_common::storage::{is_object_storage, list_shards};
use contrail_common::JobConfig;
use contrail_coordinator::listeners::hand_listeners_to;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// `contrail local --nodes NODES --local-ranks LOCAL_RANKS` (`--workers N` is N nodes of one).
pub fn run_local(
    rt: &Runtime,
    config_path: &str,
    nodes: u32,
    local_ranks: u32,
    overrides: &[String],
    verbose: bool,
) -> Result<()> {
    if nodes == 0 || local_ranks == 0 {
        bail!("--nodes, --workers and --local-ranks must be at least 1");
    }
    let workers = nodes * local_ranks;
    let mut overrides = overrides.to_vec();
    overrides.push(format!("cluster.world_size={workers}"));
    overrides.push(format!("cluster.local_ranks={local_ranks}"));
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

    // Fewer GPUs than ranks: the ranks share them round-robin (collectives over TCP, see
    // above). Otherwise each node worker claims free GPUs of its own.
    let shared = gpus > 0 && workers > gpus;
    let args = |node: u32| -> Vec<String> {
        let mut a = vec![
            "worker".into(),
            "--local-ranks".into(),
            local_ranks.to_string(),
        ];
        if shared {
            let list: Vec<String> = (0..local_ranks)
                .map(|l| ((node * local_ranks + l) % gpus).to_string())
                .collect();
            a.extend(["--gpus".into(), list.join(",")]);
        }
        a
    };
    run_cluster(rt, &cfg, nodes, local_ranks, &args, verbose)
}

/// How often a coordinator that crashed (killed, or exited other than 0, 1 or 130) is
/// started again; it takes the job over from its journal.
const COORDINATOR_RESTARTS: u32 = 3;

/// Runs the job `cfg`: a coordinator child process (`contrail coordinator`) and `processes`
/// child processes of this binary, each running `ranks_per_process` ranks (process i gets
/// `child_args(i)`, then `--coordinator URL --threads N`), until the job ends or Ctrl-C.
/// Each worker process leads a process group of its own (its ranks included), which is how
/// it is stopped, and how a test kills a whole node. A coordinator that crashes is started again (up to
/// [`COORDINATOR_RESTARTS`] times) when the job has a journal (`cluster.journal_url`, by
/// default under `checkpoint.url`): it takes the job over while the workers keep training,
/// as on Kubernetes. `contrail local` runs training workers this way, `contrail embed
/// --workers N` embedding workers.
pub fn run_cluster(
    rt: &Runtime,
    cfg: &JobConfig,
    processes: u32,
    ranks_per_process: u32,
    child_args: &dyn Fn(u32) -> Vec<String>,
    verbose: bool,
) -> Result<()> {
    let workers = processes * ranks_per_process;
    let mut cfg = cfg.clone();
    cfg.cluster.world_size = workers;
    // Bound here and kept until the job ends: the coordinator (and a restarted one) inherits
    // them, so no other process can take the port in between; `:0` in the config becomes
    // the real port the workers dial.
    let (grpc_listener, grpc_addr) = listen(&cfg.cluster.grpc_addr, "the coordinator's gRPC")?;
    let (http_listener, http_addr) = listen(&cfg.cluster.http_addr, "the status")?;
    cfg.cluster.grpc_addr = grpc_addr;
    cfg.cluster.http_addr = http_addr;
    let job_file = JobFile::write(&cfg)?;
    // A fresh token per run: the processes get it in their environment, nobody else has it.
    let token = JobToken::generate()?;
    let exe = std::env::current_exe().context("locating the contrail binary")?;
    let start_coordinator = || -> Result<Child> {
        let mut cmd = Command::new(&exe);
        cmd.args(["coordinator", "--config"])
            .arg(&job_file.0)
            .env(TOKEN_ENV, token.expose())
            .stdin(Stdio::null());
        hand_listeners_to(&mut cmd, &grpc_listener, &http_listener);
        if verbose {
            cmd.env("CONTRAIL_LOG", "info");
        }
        cmd.spawn()
            .with_context(|| format!("starting the coordinator ({})", exe.display()))
    };
    let mut coordinator = start_coordinator()?;
    let status_url = format!("http://{}", cfg.cluster.http_addr);
    println!(
        "coordinator: gRPC {} | status {status_url}/status",
        cfg.cluster.grpc_addr
    );
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
    for i in 0..processes {
        let mut cmd = Command::new(&exe);
        cmd.args(child_args(i))
            .process_group(0)
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

    // Wait for the coordinator to end the job (it prints the final status and exits 0 when
    // the job finished, 1 when it failed), or for Ctrl-C. The latest status is kept for the
    // error message and for a coordinator that cannot print it.
    let journal = cfg.cluster.journal(&cfg.checkpoint.url);
    let started = Instant::now();
    let mut last: Option<StatusReport> = None;
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    let mut restarts = 0;
    let mut exited_early: Option<String> = None;
    let outcome = loop {
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            println!("interrupted: stopping the coordinator and the workers");
            let _ = coordinator.kill();
            let _ = coordinator.wait();
            break Outcome::Interrupted;
        }
        if last_poll.elapsed() >= Duration::from_millis(500) {
            last_poll = Instant::now();
            if let Ok(s) = rt.block_on(fetch_status(&status_url)) {
                last = Some(s);
            }
        }
        if let Some(code) = coordinator.try_wait().context("watching the coordinator")? {
            match code.code() {
                Some(0) => break Outcome::Ended(JobState::Finished),
                Some(1) => break Outcome::Ended(JobState::Failed),
                Some(130) => break Outcome::Interrupted,
                _ => match &journal {
                    Some(url) if restarts < COORDINATOR_RESTARTS => {
                        restarts += 1;
                        println!(
                            "the coordinator exited ({code}); starting it again ({restarts} of \
                             {COORDINATOR_RESTARTS}): it takes the job over from its journal \
                             {url} while the workers keep training"
                        );
                        coordinator = start_coordinator()?;
                    }
                    Some(_) => {
                        break Outcome::Crashed(format!(
                            "the coordinator exited ({code}) after {restarts} restarts"
                        ))
                    }
                    None => {
                        break Outcome::Crashed(format!(
                            "the coordinator exited ({code}) and the job has no journal to \
                             restart it from (cluster.journal_url, or checkpoint.url)"
                        ))
                    }
                },
            }
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
    // No coordinator will accept on them again: a worker dialling now is refused at once
    // instead of waiting in the listen queue.
    drop((grpc_listener, http_listener));

    // Give workers a moment to leave on their own (none after Ctrl-C), then make sure none
    // outlives us.
    let grace = Instant::now();
    let patience = match outcome {
        Outcome::Ended(_) => Duration::from_secs(10),
        _ => Duration::ZERO,
    };
    for c in children.iter_mut() {
        while grace.elapsed() < patience {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The whole group: a node worker's ranks too.
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe {
            libc::kill(-(c.id() as i32), libc::SIGKILL);
        }
        let _ = c.wait();
    }
    if !matches!(outcome, Outcome::Ended(_)) {
        // The coordinator printed no final status: the latest one it served.
        if let Some(s) = &last {
            println!("{}", render_status_text(s));
        }
    }
    println!(
        "local cluster ran for {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let step = last.as_ref().map_or(0, |s| s.step);
    let mut reason = last.map(|s| s.reason).unwrap_or_default();
    if reason.is_empty() {
        reason =
            "the coordinator stopped without reporting why (its error, if any, is above)".into();
    }
    match outcome {
        Outcome::Ended(JobState::Finished) => return Ok(()),
        Outcome::Interrupted => {
            bail!("interrupted (Ctrl-C) at step {step}; the workers were stopped")
        }
        Outcome::Crashed(why) => reason = why,
        Outcome::Ended(_) => {}
    }
    if let Some(e) = exited_early {
        reason = format!("{reason} ({e})");
    }
    bail!("the job did not finish: {reason}")
}

/// How the coordinator process ended.
enum Outcome {
    /// It ended the job (finished or failed) and exited.
    Ended(JobState),
    Interrupted,
    /// It crashed and was not (or no longer) restarted: why.
    Crashed(String),
}

/// A socket listening on `addr` (`:0`: a free port), and the address it got.
fn listen(addr: &str, what: &str) -> Result<(std::net::TcpListener, String)> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding {what} address {addr}"))?;
    let bound = listener.local_addr()?.to_string();
    Ok((listener, bound))
}

/// The job file the coordinator child reads (the effective config, overrides included);
/// removed when dropped.
struct JobFile(std::path::PathBuf);

impl JobFile {
    fn write(cfg: &JobConfig) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "contrail-local-{}-{}.toml",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::write(&path, cfg.to_toml())
            .with_context(|| format!("writing the job file {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for JobFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
    if is_object_storage(url)? {
        bail!(
            "no shards at {url}: contrail local writes its synthetic data only to a local folder \
             or memory://, never into object storage; import a dataset there first (`contrail \
             data import`), or point the URL at a local folder for synthetic data"
        );
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
