//! Training on a GPU: every objective with bf16 autocast, channels-last and the NCCL backend at
//! world size 1; bf16 against fp32; GPU against CPU. Each test prints "skipping: no CUDA GPU"
//! and returns on machines without one (CI); on a GPU machine they run for real.

mod support;

use contrail_common::config::{ModelConfig, NormKind, StemKind};
use contrail_common::JobConfig;
use contrail_worker::dist::nccl::{nccl_unique_id, NcclCollective};
use contrail_worker::dist::Collective;
use contrail_worker::model::compute::{is_channels_last, use_bf16_for_cuda_autocast};
use contrail_worker::model::{Compute, ContrastiveModel};
use contrail_worker::optim::Sgd;
use contrail_worker::train::checkpoint::{safetensors_to_tensors, tensors_to_safetensors};
use contrail_worker::train::objectives::build_objective;
use contrail_worker::train::step::{train_step, StepClock};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const SAMPLES: i64 = 16;

fn gpu() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        println!("skipping: no CUDA GPU");
        None
    }
}

fn config(kind: &str) -> JobConfig {
    let mut cfg = JobConfig {
        model: ModelConfig {
            layers: vec![1, 1],
            width: 16,
            norm: NormKind::Batch,
            projector_hidden: 64,
            projector_out: 32,
            stem: StemKind::Cifar,
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.objective.kind = kind.into();
    cfg.objective.moco_queue_size = 64;
    cfg.objective.swav_prototypes = 16;
    cfg.objective.swav_freeze_prototypes_steps = 1;
    cfg.data.image_size = 32;
    cfg.train.micro_batch = SAMPLES as u64;
    cfg.train.global_batch = SAMPLES as u64;
    cfg
}

fn nccl(device: Device) -> Box<dyn Collective> {
    let Device::Cuda(i) = device else {
        unreachable!()
    };
    Box::new(
        NcclCollective::new(0, 1, &nccl_unique_id().unwrap(), i, Duration::from_secs(60)).unwrap(),
    )
}

fn images(device: Device) -> (Tensor, Tensor) {
    support::seeded(17, || {
        let v1 = Tensor::randn([SAMPLES, 3, 32, 32], (Kind::Float, Device::Cpu));
        let v2 = &v1 * 0.8 + Tensor::randn([SAMPLES, 3, 32, 32], (Kind::Float, Device::Cpu)) * 0.3;
        (v1.to_device(device), v2.to_device(device))
    })
}

/// Trains `steps` steps and returns the losses and the model.
fn train(
    cfg: &JobConfig,
    device: Device,
    compute: Compute,
    steps: u64,
) -> (Vec<f64>, ContrastiveModel) {
    // Initialised on the CPU (CUDA's RNG draws different numbers), then moved.
    let initial = support::seeded(5, || {
        ContrastiveModel::for_objective(&cfg.model, &cfg.objective, Device::Cpu).unwrap()
    });
    let mut model = ContrastiveModel::for_objective(&cfg.model, &cfg.objective, device).unwrap();
    model.load_named(&initial.named_variables()).unwrap();
    if compute.bf16 {
        use_bf16_for_cuda_autocast();
    }
    model.set_compute(compute);
    let mut opt = Sgd::new(&model, 0.9, 1e-5);
    let mut objective = build_objective(cfg).unwrap();
    let coll = if device.is_cuda() {
        nccl(device)
    } else {
        Box::new(contrail_worker::dist::local::LocalGroup::new(1).remove(0)) as Box<dyn Collective>
    };
    let (v1, v2) = images(device);
    let micro = [(v1, v2)];
    let losses = (0..steps)
        .map(|step| {
            train_step(
                &model,
                &mut opt,
                objective.as_mut(),
                &micro,
                0.05,
                coll.as_ref(),
                &[SAMPLES],
                StepClock {
                    step,
                    total_steps: 10,
                },
            )
            .unwrap()
            .loss
        })
        .collect();
    (losses, model)
}

#[test]
fn every_objective_trains_on_gpu_with_bf16_channels_last_and_nccl() {
    let Some(device) = gpu() else { return };
    for kind in ["simclr", "moco", "swav"] {
        let cfg = config(kind);
        let compute = Compute {
            bf16: true,
            channels_last: true,
        };
        let (losses, model) = train(&cfg, device, compute, 4);
        println!("checked: {kind} on {device:?} bf16 channels_last nccl: losses {losses:?}");
        assert!(losses.iter().all(|l| l.is_finite()), "{kind}: {losses:?}");
        let conv1 = &model.var_store().variables()["conv1.weight"];
        assert!(
            is_channels_last(conv1),
            "{kind}: conv1 lost its channels-last layout"
        );
        assert_eq!(
            conv1.kind(),
            Kind::Float,
            "{kind}: master weights must stay float32"
        );
        // The checkpoint holds ordinary NCHW float32 tensors that load into a CPU model.
        let bytes = tensors_to_safetensors(&model.named_variables()).unwrap();
        let saved = safetensors_to_tensors(&bytes).unwrap();
        let mut cpu =
            ContrastiveModel::for_objective(&cfg.model, &cfg.objective, Device::Cpu).unwrap();
        cpu.load_named(&saved).unwrap();
        let on_cpu = cpu.var_store().variables()["conv1.weight"].copy();
        let diff = (on_cpu - conv1.to_device(Device::Cpu))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0, "{kind}: checkpoint round trip changed conv1");
    }
}

/// bf16 autocast changes the numbers only at bf16 precision: the first losses agree closely
/// with float32, and so does the update of the weights.
#[test]
fn bf16_steps_follow_fp32_steps() {
    let Some(device) = gpu() else { return };
    let cfg = config("simclr");
    let (l32, m32) = train(
        &cfg,
        device,
        Compute {
            bf16: false,
            channels_last: true,
        },
        2,
    );
    let (l16, m16) = train(
        &cfg,
        device,
        Compute {
            bf16: true,
            channels_last: true,
        },
        2,
    );
    let init = support::seeded(5, || {
        ContrastiveModel::for_objective(&cfg.model, &cfg.objective, Device::Cpu).unwrap()
    });
    let w0 = init.var_store().variables()["layer2.0.conv1.weight"].copy();
    let d = |m: &ContrastiveModel| {
        m.var_store().variables()["layer2.0.conv1.weight"].to_device(Device::Cpu) - &w0
    };
    let (d32, d16) = (d(&m32), d(&m16));
    let cosine = (&d32 * &d16).sum(Kind::Double).double_value(&[])
        / (d32.norm().double_value(&[]) * d16.norm().double_value(&[]));
    println!("checked: bf16 vs fp32 losses {l16:?} vs {l32:?}, update cosine {cosine:.4}");
    assert!(
        (l16[0] - l32[0]).abs() / l32[0] < 2e-2,
        "{l16:?} vs {l32:?}"
    );
    assert!(
        cosine > 0.95,
        "bf16 update points elsewhere: cosine {cosine}"
    );
}

/// The same fp32 step on the GPU and on the CPU gives the same loss (up to TF32 and kernel
/// differences).
#[test]
fn gpu_step_matches_cpu_step() {
    let Some(device) = gpu() else { return };
    let cfg = config("simclr");
    let plain = Compute::default();
    let (gpu_losses, _) = train(&cfg, device, plain, 2);
    let (cpu_losses, _) = train(&cfg, Device::Cpu, plain, 2);
    println!("checked: gpu {gpu_losses:?} vs cpu {cpu_losses:?}");
    for (g, c) in gpu_losses.iter().zip(&cpu_losses) {
        assert!(
            (g - c).abs() / c < 1e-2,
            "gpu {gpu_losses:?} vs cpu {cpu_losses:?}"
        );
    }
}
