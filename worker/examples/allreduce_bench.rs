//! All-reduce benchmark of the TCP collective: `world` processes on loopback (this binary
//! re-runs itself once per rank), a Float tensor of `--mib` MiB, `--warmup` untimed and
//! `--iters` timed all-reduces. Rank 0 prints the algorithm, the time per all-reduce and the
//! bus bandwidth, busbw = 2 (n-1)/n * bytes / time (the NCCL-tests convention), plus one
//! machine-readable `BUSBW_GBPS=` line for bench/allreduce/run.sh.
//!
//!     cargo run --release -p contrail-worker --example allreduce_bench -- --world 2 --mib 64

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use contrail_worker::dist::Collective;
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
struct Args {
    /// Number of processes.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Tensor size in MiB (Float).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Set on the re-executed children: this process's rank.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// Set on the re-executed children: the rendezvous folder.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match (args.rank, &args.dir) {
        (Some(rank), Some(dir)) => run_rank(&args, rank, dir),
        _ => launch(&args),
    }
}

fn launch(args: &Args) -> Result<()> {
    if args.world == 0 || args.iters == 0 {
        bail!("--world and --iters must be positive");
    }
    common::launch_ranks(args.world, "allreduce-bench")
}

fn run_rank(args: &Args, rank: usize, dir: &Path) -> Result<()> {
    tch::set_num_threads(1);
    let c = common::rendezvous(dir, rank, args.world, Duration::from_secs(60))?;
    let numel = (args.mib << 20) / 4;
    let bytes = (numel * 4) as f64;

    // Correctness once: every rank contributes rank+1.
    let mut t = Tensor::full(
        [numel as i64],
        (rank + 1) as f64,
        (Kind::Float, Device::Cpu),
    );
    c.all_reduce_sum(&mut t)?;
    let want = (args.world * (args.world + 1) / 2) as f64;
    let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
    if lo != want || hi != want {
        bail!("rank {rank}: all-reduce gave values in [{lo}, {hi}], expected {want}");
    }

    let mut t = Tensor::zeros([numel as i64], (Kind::Float, Device::Cpu));
    for _ in 0..args.warmup {
        c.all_reduce_sum(&mut t)?;
    }
    let mut times = Vec::with_capacity(args.iters);
    c.barrier()?;
    let start = Instant::now();
    for _ in 0..args.iters {
        let t0 = Instant::now();
        c.all_reduce_sum(&mut t)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mean = start.elapsed().as_secs_f64() / args.iters as f64;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if rank == 0 {
        let n = args.world as f64;
        let busbw = |secs: f64| 2.0 * (n - 1.0) / n * bytes / secs / 1e9;
        println!(
            "contrail tcp all-reduce: ring (reduce-scatter + all-gather, pipelined {} KiB \
             segments striped over {} streams per peer, full duplex), world {}, {} MiB Float, \
             {} warmup + {} iters",
            std::env::var("CONTRAIL_TCP_SEGMENT_KIB").unwrap_or_else(|_| "512".into()),
            std::env::var("CONTRAIL_TCP_STREAMS").unwrap_or_else(|_| "4".into()),
            args.world,
            args.mib,
            args.warmup,
            args.iters
        );
        println!(
            "  mean {:.2} ms  median {:.2} ms  algbw {:.3} GB/s  busbw {:.3} GB/s (median {:.3})",
            mean * 1e3,
            median * 1e3,
            bytes / mean / 1e9,
            busbw(mean),
            busbw(median)
        );
        println!("BUSBW_GBPS={:.4}", busbw(mean));
    }
    Ok(())
}
