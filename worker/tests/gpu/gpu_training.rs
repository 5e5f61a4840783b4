//! Training on a GPU: every objective with bf16 autocast, channels-last and the NCCL backend at
//! world size 1; bf16 against fp32; GPU against CPU; MoE blocks (at world size 1 every expert
//! is local, so no token exchange: the CPU suite's `moe_expert_parallel::two_workers_on_one_gpu`
//! runs that on the GPU). Every test here is a GPU test: ignored without `--include-ignored`.

use contrail_test_support as support;

use contrail_common::config::{EncoderKind, ModelConfig, NormKind, StemKind};
use contrail_common::JobConfig;
use contrail_worker::dist::nccl::{nccl_unique_id, NcclCollective};
use contrail_worker::dist::Collective;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::moe::runtime::is_expert_param;
use contrail_worker::nn::compute::{is_channels_last, use_bf16_for_cuda_autocast};
use contrail_worker::nn::Compute;
use contrail_worker::objective::build_objective;
use contrail_worker::optim::Sgd;
use contrail_worker::train::checkpoint::{safetensors_to_tensors, tensors_to_safetensors};
use contrail_worker::train::step::{train_step, StepClock, StepOutcome};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const SAMPLES: i64 = 16;

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
    cfg.objective.kind = kind.parse().unwrap();
    cfg.objective.moco.queue_size = 64;
    cfg.objective.swav.prototypes = 16;
    cfg.objective.swav.freeze_prototypes_steps = 1;
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
    // Initialised on the CPU (CUDA's RNG draws different numbers), then moved. Building the
    // model on `device` draws too: under the lock, so other tests' seeded draws stay intact.
    let build = |d| ContrastiveModel::build(cfg, d, BuildOptions::default()).unwrap();
    let initial = support::seeded(5, || build(Device::Cpu));
    let mut model = support::seeded(0, || build(device));
    model.load_named(&initial.named_variables()).unwrap();
    if compute.autocast {
        use_bf16_for_cuda_autocast();
    }
    model.set_compute(compute);
    let coll = if device.is_cuda() {
        nccl(device)
    } else {
        Box::new(contrail_worker::dist::local::LocalGroup::new(1).remove(0)) as Box<dyn Collective>
    };
    let losses = run_steps(&model, cfg, device, coll.as_ref(), steps)
        .iter()
        .map(|o| o.loss)
        .collect();
    (losses, model)
}

/// `steps` SGD steps of `model` on the fixed images, at world size 1 over `coll`.
fn run_steps(
    model: &ContrastiveModel,
    cfg: &JobConfig,
    device: Device,
    coll: &dyn Collective,
    steps: u64,
) -> Vec<StepOutcome> {
    let mut opt = Sgd::new(model.named_parameters(), 0.9, 1e-5);
    let mut objective = build_objective(cfg);
    let (v1, v2) = images(device);
    let micro = [(v1, v2)];
    (0..steps)
        .map(|step| {
            let clock = StepClock {
                step,
                total_steps: 10,
            };
            train_step(
                model,
                &mut opt,
                objective.as_mut(),
                &micro,
                0.05,
                coll,
                &[SAMPLES],
                clock,
            )
            .unwrap()
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn every_objective_trains_on_gpu_with_bf16_channels_last_and_nccl() {
    let device = support::gpu::cuda();
    for kind in ["simclr", "moco", "swav"] {
        let cfg = config(kind);
        let compute = Compute {
            autocast: true,
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
        let mut cpu = support::seeded(0, || {
            ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default()).unwrap()
        });
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
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn bf16_steps_follow_fp32_steps() {
    let device = support::gpu::cuda();
    let cfg = config("simclr");
    let (l32, m32) = train(
        &cfg,
        device,
        Compute {
            autocast: false,
            channels_last: true,
        },
        2,
    );
    let (l16, m16) = train(
        &cfg,
        device,
        Compute {
            autocast: true,
            channels_last: true,
        },
        2,
    );
    let init = support::seeded(5, || {
        ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default()).unwrap()
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
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn gpu_step_matches_cpu_step() {
    let device = support::gpu::cuda();
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

/// A small ViT with MoE blocks in both its blocks (4 experts, top-2, dropless so the CPU and
/// GPU routings are comparable) and an MoE projector head.
fn moe_config() -> JobConfig {
    let mut cfg = config("simclr");
    cfg.model.encoder = EncoderKind::Vit;
    cfg.model.vit.patch_size = 8;
    cfg.model.vit.width = 32;
    cfg.model.vit.layers = 2;
    cfg.model.vit.heads = 2;
    cfg.moe.experts = 4;
    cfg.moe.vit_blocks = vec![0, 1];
    cfg.moe.projector = true;
    cfg.moe.top_k = 2;
    cfg.moe.dropless = true;
    cfg
}

/// Trains an MoE model `steps` steps at world size 1 (NCCL on a GPU, the in-process group on
/// the CPU, for the data-parallel collectives); returns the losses, the per-step expert loads
/// and the model.
fn train_moe(
    cfg: &JobConfig,
    device: Device,
    bf16: bool,
    steps: u64,
) -> (Vec<f64>, Vec<Vec<i64>>, ContrastiveModel) {
    let coll: Arc<dyn Collective> = if device.is_cuda() {
        Arc::from(nccl(device))
    } else {
        Arc::new(contrail_worker::dist::local::LocalGroup::new(1).remove(0))
    };
    let build = |d: Device| {
        let opts = BuildOptions {
            tokenizer: None,
            experts: Some((coll.clone(), None)),
        };
        ContrastiveModel::build(cfg, d, opts)
    };
    // Initialised on the CPU (CUDA's RNG draws different numbers), then moved.
    let initial = support::seeded(5, || build(Device::Cpu).unwrap());
    let mut model = support::seeded(0, || build(device).unwrap());
    model.load_named(&initial.named_variables()).unwrap();
    if bf16 {
        use_bf16_for_cuda_autocast();
    }
    model.set_compute(Compute {
        autocast: bf16,
        channels_last: false,
    });
    let outcomes = run_steps(&model, cfg, device, coll.as_ref(), steps);
    let losses = outcomes.iter().map(|o| o.loss).collect();
    let loads = outcomes
        .iter()
        .map(|o| {
            o.expert_load
                .iter()
                .flat_map(|l| l.routed.clone())
                .collect()
        })
        .collect();
    (losses, loads, model)
}

fn expert_variables(model: &ContrastiveModel) -> Vec<(String, Tensor)> {
    let experts: Vec<_> = model
        .named_variables()
        .into_iter()
        .filter(|(n, _)| is_expert_param(n))
        .collect();
    assert!(
        !experts.is_empty(),
        "the MoE model has no expert parameters"
    );
    experts
}

/// MoE blocks train on the GPU with bf16 autocast: every token's two assignments reach an
/// expert, every expert moves, weights stay float32.
#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn moe_trains_on_gpu_with_bf16() {
    let device = support::gpu::cuda();
    let cfg = moe_config();
    let (losses, loads, model) = train_moe(&cfg, device, true, 3);
    println!("checked: MoE on {device:?} bf16: losses {losses:?}, loads {loads:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    // Tokens per sample: (32 / 8)² patches + the class token in each ViT block, one per
    // sample in the head; two views, top-2.
    let tokens = 2 * SAMPLES * (2 * 17 + 1);
    for load in &loads {
        assert_eq!(load.iter().sum::<i64>(), 2 * tokens, "{load:?}");
    }
    let initial = support::seeded(5, || {
        let coll: Arc<dyn Collective> =
            Arc::new(contrail_worker::dist::local::LocalGroup::new(1).remove(0));
        {
            let opts = BuildOptions {
                tokenizer: None,
                experts: Some((coll, None)),
            };
            ContrastiveModel::build(&cfg, Device::Cpu, opts).unwrap()
        }
    });
    let before: std::collections::BTreeMap<_, _> = expert_variables(&initial).into_iter().collect();
    for (name, t) in expert_variables(&model) {
        assert_eq!(
            t.kind(),
            Kind::Float,
            "{name}: master weights must stay float32"
        );
        let moved = (t.to_device(Device::Cpu) - &before[&name])
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 0.0, "{name} did not move in 3 steps");
    }
}

/// The same fp32 MoE steps on the GPU and on the CPU give the same losses,
/// routings and expert weights, up to TF32 and kernel differences.
#[test]
#[ignore = "needs a CUDA GPU: run with --include-ignored on a GPU machine"]
fn moe_gpu_steps_match_cpu_steps() {
    let device = support::gpu::cuda();
    let cfg = moe_config();
    let (gl, gload, gpu_model) = train_moe(&cfg, device, false, 2);
    let (cl, cload, cpu_model) = train_moe(&cfg, Device::Cpu, false, 2);
    println!("checked: MoE gpu {gl:?} vs cpu {cl:?}; loads {gload:?} vs {cload:?}");
    for (g, c) in gl.iter().zip(&cl) {
        assert!((g - c).abs() / c < 1e-2, "gpu {gl:?} vs cpu {cl:?}");
    }
    // Routing is an argmax over gate logits: near-ties may flip, so compare the loads loosely.
    for (g, c) in gload.iter().flatten().zip(cload.iter().flatten()) {
        assert!((g - c).abs() <= 2 + c / 20, "{gload:?} vs {cload:?}");
    }
    let cpu: std::collections::BTreeMap<_, _> = expert_variables(&cpu_model).into_iter().collect();
    for (name, t) in expert_variables(&gpu_model) {
        let c = &cpu[&name];
        let diff = (t.to_device(Device::Cpu) - c).abs().max().double_value(&[]);
        let scale = c.abs().max().double_value(&[]);
        assert!(
            diff <= 2e-2 * scale,
            "{name}: gpu and cpu differ by {diff} (scale {scale})"
        );
    }
}
