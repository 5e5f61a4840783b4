//! Data-parallel scaling of contrail's real training step on the TCP backend: `--world`
//! processes on loopback (this binary re-runs itself once per rank), each training the same
//! SimCLR ResNet on its own fixed batch of synthetic images, gradients summed in
//! `--bucket-mb` buckets with or without overlap (`--overlap 1|0`, `cluster.overlap`).
//! bench/scaling/run.sh runs it beside PyTorch DDP over gloo (`ddp_ref.py`), same model, same
//! batch, same bucket size, on the same (optionally shaped) loopback link.
//!
//!   scaling_bench [--world 2] [--model resnet18] [--batch 32] [--image-size 64]
//!                 [--steps 6] [--warmup 2] [--overlap 1] [--bucket-mb 25] [--threads 0]
//!
//! `--batch` is per rank; `--threads` is libtorch's intra-op threads per rank (0: the
//! machine's cores divided by the world size, at least 1). Rank 0 prints a human line and
//! `STEP_MS=<median step time>`, `SAMPLES_PER_S_PER_RANK=<batch / median step time>`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use contrail_common::config::{BlockKind, NormKind, ObjectiveKind, StemKind};
use contrail_common::JobConfig;
use contrail_worker::dist::grad_sync::{bucket_bytes, GradSync};
use contrail_worker::dist::Collective;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::objective::build_objective;
use contrail_worker::optim::Sgd;
use contrail_worker::train::step::{train_step, StepClock};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// resnet18 or resnet50 (torchvision's shapes, BatchNorm, the 2048→128 projector).
    #[arg(long, default_value = "resnet18")]
    model: String,
    /// Images per rank per step (each with two views).
    #[arg(long, default_value_t = 32)]
    batch: i64,
    #[arg(long, default_value_t = 64)]
    image_size: i64,
    #[arg(long, default_value_t = 6)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// 1: gradient buckets summed during backward; 0: after it.
    #[arg(long, default_value_t = 1)]
    overlap: u8,
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
    #[arg(long, default_value_t = 0)]
    threads: i32,
    #[arg(long, hide = true)]
    rank: Option<usize>,
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
    if args.world == 0 || args.steps == 0 || args.batch <= 0 {
        bail!("--world, --steps and --batch must be positive");
    }
    common::launch_ranks(args.world, "scaling-bench")
}

fn config(args: &Args) -> Result<JobConfig> {
    let mut cfg = JobConfig::default();
    cfg.objective.kind = ObjectiveKind::Simclr;
    cfg.model.norm = NormKind::Batch;
    cfg.model.projector_hidden = 2048;
    cfg.model.projector_out = 128;
    cfg.model.stem = StemKind::Imagenet;
    cfg.model.width = 64;
    match args.model.as_str() {
        "resnet18" => cfg.model.layers = vec![2, 2, 2, 2],
        "resnet50" => {
            cfg.model.layers = vec![3, 4, 6, 3];
            cfg.model.block = BlockKind::Bottleneck;
        }
        other => bail!("--model {other}: resnet18 or resnet50"),
    }
    cfg.data.image_size = args.image_size as u32;
    cfg.train.micro_batch = args.batch as u64;
    cfg.train.global_batch = (args.batch as u64) * args.world as u64;
    cfg.cluster.world_size = args.world as u32;
    cfg.cluster.overlap = args.overlap != 0;
    cfg.cluster.bucket_mb = args.bucket_mb;
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("benchmark configuration: {e}"))?;
    Ok(cfg)
}

fn run_rank(args: &Args, rank: usize, dir: &Path) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let threads = if args.threads > 0 {
        args.threads
    } else {
        (cores / args.world as i32).max(1)
    };
    tch::set_num_threads(threads);
    let cfg = config(args)?;
    let coll = common::rendezvous(dir, rank, args.world, Duration::from_secs(300))?;
    // The same initial weights on every rank, as a job's broadcast from rank 0 gives.
    tch::manual_seed(0);
    let mut model = ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default())?;
    model.set_grad_sync(GradSync {
        overlap: cfg.cluster.overlap,
        bucket_bytes: bucket_bytes(cfg.cluster.bucket_mb),
        bf16: false,
    });
    let mut opt = Sgd::new(model.named_parameters(), 0.9, 1e-6);
    let mut objective = build_objective(&cfg);
    tch::manual_seed(1 + rank as i64);
    let shape = [args.batch, 3, args.image_size, args.image_size];
    let micro = [(
        Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        Tensor::randn(shape, (Kind::Float, Device::Cpu)),
    )];
    let counts = vec![args.batch; args.world];
    let total = (args.warmup + args.steps) as u64;
    let mut times = Vec::with_capacity(args.steps);
    let mut loss = 0.0;
    for step in 0..total {
        coll.barrier()?;
        let t0 = Instant::now();
        let out = train_step(
            &model,
            &mut opt,
            objective.as_mut(),
            &micro,
            0.05,
            &coll,
            &counts,
            StepClock {
                step,
                total_steps: total,
            },
        )
        .with_context(|| format!("rank {rank}: step {step}"))?;
        if step >= args.warmup as u64 {
            times.push(t0.elapsed().as_secs_f64());
        }
        loss = out.loss;
    }
    if !loss.is_finite() {
        bail!("rank {rank}: the loss is {loss}");
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if rank == 0 {
        let params: i64 = model
            .named_parameters()
            .iter()
            .map(|(_, p)| p.numel() as i64)
            .sum();
        println!(
            "contrail tcp: SimCLR {} ({:.1} M parameters), world {}, batch {} per rank at {} px, \
             overlap {}, {} MiB buckets, {} threads per rank: median step {:.1} ms (min {:.1}, \
             max {:.1}) over {} steps, {:.1} samples/s per rank, last loss {loss:.4}",
            args.model,
            params as f64 / 1e6,
            args.world,
            args.batch,
            args.image_size,
            cfg.cluster.overlap,
            args.bucket_mb,
            threads,
            median * 1e3,
            times[0] * 1e3,
            times[times.len() - 1] * 1e3,
            times.len(),
            args.batch as f64 / median
        );
        println!("STEP_MS={:.3}", median * 1e3);
        println!("SAMPLES_PER_S_PER_RANK={:.3}", args.batch as f64 / median);
    }
    Ok(())
}
