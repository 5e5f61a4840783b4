//! Every job file in configs/ loads and validates with the one loader the commands use
//! (`JobConfig::from_file`), so a renamed or removed key cannot leave an example behind.
//! Loading never touches the data: the GPU files' `s3://` URLs are placeholders, and parsing
//! and validation read no URL.

use contrail_common::config::{
    Backend, BlockKind, EncoderKind, LrScaling, ObjectiveKind, OptimKind, Precision, StemKind,
    TextMode, TokenizerSource,
};
use contrail_common::JobConfig;
use std::path::PathBuf;

fn configs_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs"))
}

fn close(got: [f32; 3], want: [f64; 3]) -> bool {
    got.iter()
        .zip(want)
        .all(|(g, w)| (f64::from(*g) - w).abs() < 1e-7)
}

fn load(name: &str) -> JobConfig {
    let path = configs_dir().join(name);
    JobConfig::from_file(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

#[test]
fn every_job_file_in_configs_parses_and_validates() {
    let mut names: Vec<String> = std::fs::read_dir(configs_dir())
        .expect("configs/")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".toml"))
        .collect();
    names.sort();
    // The local demos and the GPU recipes at least; a new file is picked up by itself.
    for expected in [
        "local-simclr.toml",
        "local-clip.toml",
        "gpu-simclr-resnet50.toml",
        "gpu-clip-vit-b16.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    for name in &names {
        let cfg = load(name);
        // What was loaded writes back to a file that loads to the same job.
        assert_eq!(
            JobConfig::from_toml(&cfg.to_toml()).unwrap(),
            cfg,
            "{name} does not round-trip"
        );
    }
}

#[test]
fn gpu_simclr_resnet50_is_the_imagenet_recipe() {
    let cfg = load("gpu-simclr-resnet50.toml");
    // Two nodes of eight GPUs.
    assert_eq!((cfg.cluster.world_size, cfg.cluster.local_ranks), (16, 8));
    assert!(cfg.data.url.starts_with("s3://"), "{}", cfg.data.url);
    assert_eq!(cfg.data.synth_samples, 0);
    assert_eq!(cfg.data.image_size, 224);
    assert!(cfg.data.decode_threads > 1);
    let a = &cfg.data.augment;
    assert_eq!((a.crop_scale_min, a.crop_scale_max), (0.08, 1.0));
    assert_eq!(
        (a.brightness, a.contrast, a.saturation, a.hue),
        (0.8, 0.8, 0.8, 0.2)
    );
    assert_eq!((a.jitter_p, a.grayscale_p, a.blur_p), (0.8, 0.2, 0.5));
    assert_eq!(a.mean, [0.485, 0.456, 0.406]);

    let m = &cfg.model;
    assert_eq!(m.encoder, EncoderKind::Resnet);
    assert_eq!(m.layers, vec![3, 4, 6, 3]);
    assert_eq!(
        (m.block, m.width, m.stem),
        (BlockKind::Bottleneck, 64, StemKind::Imagenet)
    );
    assert_eq!((m.projector_hidden, m.projector_out), (2048, 128));
    assert_eq!(cfg.objective.kind, ObjectiveKind::Simclr);

    assert_eq!(cfg.optim.kind, OptimKind::Lars);
    assert_eq!(cfg.optim.lr_scaling, LrScaling::Linear);
    // Peak learning rate 0.3 × 4096 / 256 = 4.8.
    assert_eq!(cfg.train.global_batch, 4096);
    assert!((cfg.optim.lr * cfg.train.global_batch as f64 / 256.0 - 4.8).abs() < 1e-9);

    assert_eq!(cfg.train.precision, Precision::Bf16);
    assert!(cfg.train.channels_last && cfg.train.tf32 && cfg.train.cudnn_benchmark);
    assert_eq!(cfg.cluster.backend, Backend::Nccl);
    assert_eq!(cfg.train.accumulation_steps(cfg.cluster.world_size), 1);
    assert!(cfg.eval.enabled() && cfg.eval.url.starts_with("s3://"));
    assert!(cfg.checkpoint.url.starts_with("s3://"));
}

#[test]
fn gpu_clip_vit_b16_is_the_open_clip_recipe() {
    let cfg = load("gpu-clip-vit-b16.toml");
    // Eight nodes of eight GPUs.
    assert_eq!((cfg.cluster.world_size, cfg.cluster.local_ranks), (64, 8));
    assert!(cfg.data.url.starts_with("s3://"), "{}", cfg.data.url);
    assert_eq!(cfg.data.synth_samples, 0);
    assert_eq!(cfg.data.image_size, 224);
    let a = &cfg.data.augment;
    assert_eq!((a.crop_scale_min, a.crop_scale_max), (0.9, 1.0));
    assert_eq!(
        (a.flip_p, a.jitter_p, a.grayscale_p, a.blur_p),
        (0.0, 0.0, 0.0, 0.0)
    );
    // CLIP's values, as open_clip writes them (in f64: they have more digits than an f32).
    assert!(
        close(a.mean, [0.48145466, 0.4578275, 0.40821073]),
        "{:?}",
        a.mean
    );
    assert!(
        close(a.std, [0.26862954, 0.26130258, 0.27577711]),
        "{:?}",
        a.std
    );

    assert_eq!(cfg.objective.kind, ObjectiveKind::Clip);
    let m = &cfg.model;
    assert_eq!(m.encoder, EncoderKind::Vit);
    assert_eq!(
        (m.vit.patch_size, m.vit.width, m.vit.layers, m.vit.heads),
        (16, 768, 12, 12)
    );
    assert_eq!(
        (
            m.text.context_length,
            m.text.width,
            m.text.layers,
            m.text.heads
        ),
        (77, 512, 12, 8)
    );
    assert_eq!(m.text.mode, TextMode::Causal);
    assert!(
        matches!(&m.text.tokenizer, TokenizerSource::Url(u) if u.starts_with("s3://")),
        "{:?}",
        m.text.tokenizer
    );
    assert_eq!(m.projector_out, 512);

    let o = &cfg.optim;
    assert_eq!(o.kind, OptimKind::Adamw);
    assert_eq!(
        (o.lr, o.weight_decay, o.lr_scaling),
        (5e-4, 0.2, LrScaling::None)
    );
    assert_eq!(
        (o.adamw.beta1, o.adamw.beta2, o.adamw.eps),
        (0.9, 0.98, 1e-6)
    );
    assert!(o.warmup_steps > 0 && o.exclude_1d_from_decay);

    assert_eq!(cfg.train.precision, Precision::Bf16);
    assert!(cfg.train.tf32 && cfg.train.cudnn_benchmark);
    assert_eq!(cfg.cluster.backend, Backend::Nccl);
    assert_eq!(cfg.train.global_batch, 32768);
    assert_eq!(cfg.train.accumulation_steps(cfg.cluster.world_size), 2);
}

/// The benchmark on a GPU node (bench/gpu_node/run.sh) shrinks the SimCLR file with `--set`
/// overrides; they must still make a valid job at world sizes 1 and 2.
#[test]
fn gpu_simclr_file_takes_the_benchmark_overrides() {
    let path = configs_dir().join("gpu-simclr-resnet50.toml");
    for world in [1u32, 2] {
        let overrides: Vec<String> = vec![
            "data.url=file:///tmp/contrail-gpu-node/shards".to_string(),
            "data.decode_threads=4".into(),
            "data.shuffle_buffer=0".into(),
            "train.micro_batch=128".into(),
            format!("train.global_batch={}", 128 * world),
            "train.epochs=0".into(),
            "train.max_steps=40".into(),
            "train.log_every=5".into(),
            "optim.warmup_steps=5".into(),
            "checkpoint.url=".into(),
            "eval.url=".into(),
            format!("cluster.world_size={world}"),
            // What `contrail local --nodes 1 --local-ranks N` sets.
            format!("cluster.local_ranks={world}"),
            "cluster.backend=tcp".into(),
            "cluster.device=cuda:0".into(),
        ];
        let cfg = JobConfig::from_file(&path, &overrides).unwrap();
        assert_eq!(cfg.train.accumulation_steps(world), 1);
        assert!(!cfg.eval.enabled() && cfg.checkpoint.url.is_empty());
    }
}
