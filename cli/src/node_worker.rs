//! `contrail worker`: the node worker. It claims this machine's GPUs for its ranks and runs
//! one rank process per GPU (`contrail rank`, every GPU of the node visible to each, so NCCL
//! can use P2P/NVLink and shared memory between them), the way torchrun's
//! `--nproc-per-node` does; with one rank, the rank runs in this process.
//!
//! A node is one failure domain: a rank that exits with an error, or is killed, stops the
//! node's other ranks and the node worker exits with an error (Kubernetes then replaces the
//! pod, and the coordinator takes all the node's ranks out in one regroup). The ranks die
//! with the node worker too (`PR_SET_PDEATHSIG`), so killing it never leaves orphans behind.
//! SIGTERM and SIGINT are forwarded to the ranks, which leave the job cleanly.

use crate::args::RankArgs;
use anyhow::{bail, Context, Result};
use contrail_common::auth::{JobToken, TOKEN_ENV};
use contrail_worker::process::node::{gpu_lock_dir, GpuClaim, NodeRank};
use contrail_worker::process::{run_worker, WorkerOptions};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// How long ranks get to leave after a forwarded SIGTERM/SIGINT before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Runs the node worker: `local_ranks` ranks (default: one per visible GPU, one without),
/// on `gpus` when given, else on GPUs claimed on this machine.
pub fn run_node_worker(
    rt: &Runtime,
    args: &RankArgs,
    local_ranks: Option<u32>,
    gpus: Option<&[usize]>,
) -> Result<()> {
    let token = JobToken::require_env().context("the worker's job token")?;
    let visible = tch::Cuda::device_count().max(0) as usize;
    let ranks = local_ranks.unwrap_or(visible.max(1) as u32);
    if ranks == 0 {
        bail!("--local-ranks must be at least 1");
    }
    let claim = match gpus {
        Some(list) => GpuClaim::told(list, ranks as usize, visible)?,
        None => GpuClaim::claim_free(visible, ranks as usize, &gpu_lock_dir())?,
    };
    let node = NodeRank::new_node_id()?;
    if ranks == 1 {
        let slot = NodeRank {
            node,
            local_rank: 0,
            local_ranks: 1,
            gpu: claim.gpu(0),
        };
        return run_rank(rt, args, slot, token);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let threads = if args.threads > 0 {
        args.threads
    } else {
        (cores / ranks as i32).max(1)
    };
    let exe = std::env::current_exe().context("locating the contrail binary")?;
    let mut children = Vec::new();
    for local_rank in 0..ranks {
        let mut cmd = Command::new(&exe);
        cmd.args(["rank", "--coordinator", &args.coordinator])
            .args(["--bind", &rank_bind(&args.bind, local_rank)?])
            .args(["--connect-wait-secs", &args.connect_wait_secs.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--node", &node])
            .args(["--local-rank", &local_rank.to_string()])
            .args(["--local-ranks", &ranks.to_string()])
            .env(TOKEN_ENV, token.expose())
            .stdin(Stdio::null());
        if let Some(gpu) = claim.gpu(local_rank as usize) {
            cmd.args(["--gpu", &gpu.to_string()]);
        }
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the node worker; it may have died before this ran.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() as u32 != parent
                {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting local rank {local_rank} ({})", exe.display()))?;
        children.push(child);
    }
    tracing::info!(%node, ranks, gpus = ?claim.gpus, "node worker started its ranks");
    let signal = Arc::new(AtomicI32::new(0));
    for (kind, number) in [
        (tokio::signal::unix::SignalKind::terminate(), libc::SIGTERM),
        (tokio::signal::unix::SignalKind::interrupt(), libc::SIGINT),
    ] {
        let mut stream = rt.block_on(async { tokio::signal::unix::signal(kind) })?;
        let flag = signal.clone();
        rt.spawn(async move {
            while stream.recv().await.is_some() {
                flag.store(number, Ordering::SeqCst);
            }
        });
    }
    supervise(&mut children, &signal)
}

/// One rank in this process.
pub fn run_rank(rt: &Runtime, args: &RankArgs, node: NodeRank, token: JobToken) -> Result<()> {
    run_worker(
        rt,
        &WorkerOptions {
            torch_threads: args.threads,
            coordinator: args.coordinator.clone(),
            collective_bind: args.bind.clone(),
            connect_wait: Duration::from_secs(args.connect_wait_secs),
            token,
            node,
        },
    )
}

/// Local rank `i`'s listen address: `host:0` stays (any free port), a fixed port P becomes
/// P + i.
fn rank_bind(bind: &str, local_rank: u32) -> Result<String> {
    let (host, port) = bind
        .rsplit_once(':')
        .with_context(|| format!("--bind {bind} is not host:port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--bind {bind}: the port is not a number"))?;
    if port == 0 {
        return Ok(bind.to_string());
    }
    let port = port.checked_add(local_rank as u16).with_context(|| {
        format!("--bind {bind}: port {port} + local rank {local_rank} overflows")
    })?;
    Ok(format!("{host}:{port}"))
}

/// Waits for the ranks: all finished is success; the first that fails (or is killed) stops
/// the others at once. A forwarded signal gives them [`STOP_GRACE`] to leave.
fn supervise(children: &mut [Child], signal: &AtomicI32) -> Result<()> {
    let mut exited: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut stopping: Option<Instant> = None;
    loop {
        let sig = signal.swap(0, Ordering::SeqCst);
        if sig != 0 {
            tracing::warn!(
                signal = sig,
                "node worker: forwarding the signal to its ranks"
            );
            send_all(children, &exited, sig);
            stopping.get_or_insert_with(Instant::now);
        }
        for (i, c) in children.iter_mut().enumerate() {
            if exited[i].is_none() {
                exited[i] = c.try_wait().context("watching a local rank")?;
            }
        }
        if let Some((i, status)) = exited
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.filter(|s| !s.success()).map(|s| (i, s)))
        {
            if stopping.is_none() {
                send_all(children, &exited, libc::SIGKILL);
                for c in children.iter_mut() {
                    let _ = c.wait();
                }
                bail!(
                    "local rank {i} exited with {status}; the node's other ranks were stopped \
                     (a node is one failure domain)"
                );
            }
        }
        if exited.iter().all(Option::is_some) {
            return match exited.iter().position(|s| s.is_some_and(|s| !s.success())) {
                None => Ok(()),
                Some(i) => bail!("local rank {i} exited with {}", exited[i].unwrap()),
            };
        }
        if stopping.is_some_and(|t| t.elapsed() > STOP_GRACE) {
            send_all(children, &exited, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `sig` to every rank still running.
fn send_all(children: &[Child], exited: &[Option<ExitStatus>], sig: i32) {
    for (c, e) in children.iter().zip(exited) {
        if e.is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ranks_listen_on_consecutive_ports_or_any_free_one() {
        assert_eq!(rank_bind("0.0.0.0:29500", 3).unwrap(), "0.0.0.0:29503");
        assert_eq!(rank_bind("127.0.0.1:0", 3).unwrap(), "127.0.0.1:0");
        assert_eq!(rank_bind("[::1]:29500", 1).unwrap(), "[::1]:29501");
        assert!(rank_bind("nonsense", 0).is_err());
        assert!(rank_bind("h:65535", 1).is_err());
    }
}
