//! Training-step throughput of contrail's real step (model, objective, collective, optimizer)
//! on one device, with synthetic images already on the device: the number that
//! `bench/train_step/run.sh` compares with PyTorch eager. See bench/train_step/README.md.
//!
//!   train_step_bench [--model resnet50|resnet18|vit-b-16|vit-b-32] [--batch 256]
//!                    [--micro-batch B] [--image-size 224] [--steps 20] [--warmup 5]
//!                    [--precision bf16|fp16|fp32] [--channels-last 1]
//!                    [--objective simclr|moco|swav|clip] [--backend nccl|tcp]
//!
//! `--batch` is the step's global batch; with `--micro-batch` smaller it is reached by
//! accumulation over K = batch / micro-batch micro-batches (the same host tensors reused, so
//! the benchmark needs host memory for one micro-batch only). CLIP uses the ViT for images and
//! CLIP's 12-layer, 512-wide text transformer on 77 random byte tokens.
//!
//! Prints a human line, `SAMPLES_PER_S=<value>` (samples = images, each with two views or one
//! caption) and, on a GPU, `PEAK_GIB=<value>`: the most device memory in use during the
//! timed steps (cudaMemGetInfo sampled after every step and around it; it includes the CUDA
//! context and libtorch's cache, so it is an upper bound of what the step needs).

use anyhow::{bail, Context, Result};
use contrail_common::config::{
    Backend, BlockKind, EncoderKind, NormKind, ObjectiveKind, Precision, StemKind,
};
use contrail_common::JobConfig;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::nccl::{nccl_unique_id, NcclCollective};
use contrail_worker::dist::Collective;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::nn::compute::{use_bf16_for_cuda_autocast, use_fp16_for_cuda_autocast};
use contrail_worker::nn::Compute;
use contrail_worker::objective::build_objective;
use contrail_worker::optim::{AdamW, AdamWOptions, LossScaled, Optimizer, Sgd};
use contrail_worker::tokenize::ByteTokenizer;
use contrail_worker::train::step::{train_step, StepClock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

struct Args {
    model: String,
    batch: i64,
    image_size: i64,
    steps: u64,
    warmup: u64,
    precision: Precision,
    channels_last: bool,
    objective: ObjectiveKind,
    backend: Backend,
    micro_batch: i64,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        model: "resnet50".into(),
        batch: 256,
        image_size: 224,
        steps: 20,
        warmup: 5,
        precision: Precision::Bf16,
        channels_last: true,
        objective: ObjectiveKind::Simclr,
        backend: Backend::Nccl,
        micro_batch: 0,
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
            "--precision" => a.precision = v.parse().map_err(anyhow::Error::msg)?,
            "--channels-last" => a.channels_last = v == "1" || v == "true",
            "--objective" => a.objective = v.parse().map_err(anyhow::Error::msg)?,
            "--backend" => a.backend = v.parse().map_err(anyhow::Error::msg)?,
            "--micro-batch" => a.micro_batch = v.parse()?,
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
    cfg.objective.kind = a.objective;
    cfg.objective.moco.queue_size = 65_536;
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
        "vit-b-16" | "vit-b-32" => {
            cfg.model.encoder = EncoderKind::Vit;
            cfg.model.vit.patch_size = if a.model == "vit-b-16" { 16 } else { 32 };
            cfg.model.projector_out = 512;
        }
        other => bail!("--model {other}: resnet50, resnet18, vit-b-16 or vit-b-32"),
    }
    let micro_batch = if a.micro_batch > 0 {
        a.micro_batch
    } else {
        a.batch
    };
    if a.batch % micro_batch != 0 {
        bail!(
            "--batch {} is not a multiple of --micro-batch {micro_batch}",
            a.batch
        );
    }
    let k = a.batch / micro_batch;
    cfg.data.image_size = a.image_size as u32;
    cfg.train.micro_batch = micro_batch as u64;
    cfg.train.global_batch = a.batch as u64;
    cfg.cluster.world_size = 1;
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("benchmark configuration: {e}"))?;

    tch::manual_seed(0);
    let tokenizer = ByteTokenizer::new();
    let mut model = ContrastiveModel::build(
        &cfg,
        device,
        BuildOptions {
            tokenizer: Some(&tokenizer),
            ..Default::default()
        },
    )?;
    let autocast = match a.precision {
        Precision::Bf16 => {
            use_bf16_for_cuda_autocast();
            true
        }
        Precision::Fp16 => {
            use_fp16_for_cuda_autocast();
            true
        }
        Precision::Fp32 | Precision::Auto => false,
    };
    model.set_compute(Compute {
        autocast,
        channels_last: a.channels_last,
    });
    // SimCLR-style runs use SGD with momentum, CLIP AdamW, as their references do.
    let mut opt: Box<dyn Optimizer> = if a.objective == ObjectiveKind::Clip {
        Box::new(AdamW::new(
            model.named_parameters(),
            AdamWOptions::from_config(&cfg.optim),
        ))
    } else {
        Box::new(Sgd::new(model.named_parameters(), 0.9, 1e-6))
    };
    if a.precision == Precision::Fp16 {
        // As train.precision = "fp16": dynamic loss scaling around the optimizer.
        opt = Box::new(LossScaled::new(opt, model.named_parameters()));
    }
    let mut objective = build_objective(&cfg);
    let coll: Box<dyn Collective> = match (a.backend, device) {
        (Backend::Nccl, Device::Cuda(i)) => Box::new(NcclCollective::new(
            0,
            1,
            &nccl_unique_id()?,
            i,
            Duration::from_secs(300),
        )?),
        _ => Box::new(LocalGroup::new(1).remove(0)),
    };
    let shape = [micro_batch, 3, a.image_size, a.image_size];
    // With accumulation the micro-batches stay on the host, as the trainer keeps them.
    let home = if k > 1 { Device::Cpu } else { device };
    let v1 = Tensor::randn(shape, (Kind::Float, home));
    let v2 = if a.objective == ObjectiveKind::Clip {
        Tensor::randint_low(1, 257, [micro_batch, 77], (Kind::Int64, home))
    } else {
        Tensor::randn(shape, (Kind::Float, home))
    };
    let micro: Vec<(Tensor, Tensor)> = (0..k)
        .map(|_| (v1.shallow_clone(), v2.shallow_clone()))
        .collect();
    let counts = [a.batch];
    let mut peak_used: u64 = 0;
    let mut run = |step: u64| -> Result<f64> {
        let clock = StepClock {
            step,
            total_steps: a.warmup + a.steps,
        };
        let out = train_step(
            &model,
            opt.as_mut(),
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
    let sample_memory = |peak: &mut u64| {
        if let Some(used) = device_memory_in_use() {
            *peak = (*peak).max(used);
        }
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
        sample_memory(&mut peak_used);
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
    if device.is_cuda() {
        println!(
            "K = {k} micro-batches of {micro_batch}: peak device memory in use {:.1} GiB",
            peak_used as f64 / (1u64 << 30) as f64
        );
        println!("PEAK_GIB={}", peak_used as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}

/// Device memory in use now (total − free, from `cudaMemGetInfo` of the libcudart that
/// libtorch loaded).
fn device_memory_in_use() -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    // SAFETY: looks up a symbol of an already-loaded library; the signature is cudaMemGetInfo's.
    unsafe {
        let name = c"libcudart.so.13";
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let sym = libc::dlsym(handle, c"cudaMemGetInfo".as_ptr());
        if sym.is_null() {
            return None;
        }
        let f: MemGetInfo = std::mem::transmute(sym);
        let (mut free, mut total) = (0usize, 0usize);
        (f(&mut free, &mut total) == 0).then(|| (total - free) as u64)
    }
}
