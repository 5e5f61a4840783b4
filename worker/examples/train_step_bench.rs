//! Training-step throughput of contrail's real step (model, objective, collective, optimizer)
//! on one device, with synthetic images already on the device: the number that
//! `bench/train_step/run.sh` compares with PyTorch eager. See bench/train_step/README.md.
//!
//!   train_step_bench [--model resnet50|resnet18] [--batch 256] [--image-size 224]
//!                    [--steps 20] [--warmup 5] [--precision bf16|fp32] [--channels-last 1]
//!                    [--objective simclr|moco|swav] [--backend nccl|local]
//!
//! Prints a human line and `SAMPLES_PER_S=<value>` (samples = images, each with two views).

use anyhow::{bail, Context, Result};
use contrail_common::config::{BlockKind, NormKind, StemKind};
use contrail_common::JobConfig;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::nccl::{nccl_unique_id, NcclCollective};
use contrail_worker::dist::Collective;
use contrail_worker::model::compute::use_bf16_for_cuda_autocast;
use contrail_worker::model::{Compute, ContrastiveModel};
use contrail_worker::optim::Sgd;
use contrail_worker::train::objectives::build_objective;
use contrail_worker::train::step::{train_step, StepClock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

struct Args {
    model: String,
    batch: i64,
    image_size: i64,
    steps: u64,
    warmup: u64,
    precision: String,
    channels_last: bool,
    objective: String,
    backend: String,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        model: "resnet50".into(),
        batch: 256,
        image_size: 224,
        steps: 20,
        warmup: 5,
        precision: "bf16".into(),
        channels_last: true,
        objective: "simclr".into(),
        backend: "nccl".into(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let [key, value] = pair else {
            bail!("arguments come in pairs: --key value");
        };
        let v = value.as_str();
        match key.as_str() {
            "--model" => a.model = v.into(),
            "--batch" => a.batch = v.parse()?,
            "--image-size" => a.image_size = v.parse()?,
            "--steps" => a.steps = v.parse()?,
            "--warmup" => a.warmup = v.parse()?,
            "--precision" => a.precision = v.into(),
            "--channels-last" => a.channels_last = v == "1" || v == "true",
            "--objective" => a.objective = v.into(),
            "--backend" => a.backend = v.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse()?;
    let device = if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let mut cfg = JobConfig::default();
    cfg.objective.kind = a.objective.clone();
    cfg.objective.moco_queue_size = 65_536;
    cfg.model.norm = NormKind::Batch;
    cfg.model.projector_hidden = 2048;
    cfg.model.projector_out = 128;
    cfg.model.stem = StemKind::Imagenet;
    cfg.model.width = 64;
    match a.model.as_str() {
        "resnet50" => {
            cfg.model.layers = vec![3, 4, 6, 3];
            cfg.model.block = BlockKind::Bottleneck;
        }
        "resnet18" => cfg.model.layers = vec![2, 2, 2, 2],
        other => bail!("--model {other}: resnet50 or resnet18"),
    }
    cfg.data.image_size = a.image_size as u32;
    cfg.train.micro_batch = a.batch as u64;
    cfg.train.global_batch = a.batch as u64;

    tch::manual_seed(0);
    let mut model = ContrastiveModel::for_objective(&cfg.model, &cfg.objective, device)?;
    let bf16 = a.precision == "bf16";
    if bf16 {
        use_bf16_for_cuda_autocast();
    }
    model.set_compute(Compute {
        bf16,
        channels_last: a.channels_last,
    });
    let mut opt = Sgd::new(&model, 0.9, 1e-6);
    let mut objective = build_objective(&cfg)?;
    let coll: Box<dyn Collective> = match (a.backend.as_str(), device) {
        ("nccl", Device::Cuda(i)) => Box::new(NcclCollective::new(
            0,
            1,
            &nccl_unique_id()?,
            i,
            Duration::from_secs(300),
        )?),
        _ => Box::new(LocalGroup::new(1).remove(0)),
    };
    let shape = [a.batch, 3, a.image_size, a.image_size];
    let v1 = Tensor::randn(shape, (Kind::Float, device));
    let v2 = Tensor::randn(shape, (Kind::Float, device));
    let micro = [(v1, v2)];
    let counts = [a.batch];
    let mut run = |step: u64| -> Result<f64> {
        let clock = StepClock {
            step,
            total_steps: a.warmup + a.steps,
        };
        let out = train_step(
            &model,
            &mut opt,
            objective.as_mut(),
            &micro,
            0.1,
            coll.as_ref(),
            &counts,
            clock,
        )
        .context("training step")?;
        Ok(out.loss)
    };
    for s in 0..a.warmup {
        run(s)?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let start = Instant::now();
    let mut loss = 0.0;
    for s in 0..a.steps {
        loss = run(a.warmup + s)?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let secs = start.elapsed().as_secs_f64();
    let sps = (a.batch as u64 * a.steps) as f64 / secs;
    println!(
        "contrail {} {} batch {} at {}px, {} channels_last={} backend={} on {:?}: {:.1} samples/s \
         ({:.1} ms/step, last loss {loss:.4})",
        a.objective,
        a.model,
        a.batch,
        a.image_size,
        a.precision,
        a.channels_last,
        a.backend,
        device,
        sps,
        1000.0 * secs / a.steps as f64
    );
    println!("SAMPLES_PER_S={sps}");
    Ok(())
}
