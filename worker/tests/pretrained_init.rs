//! Pretrained weights in (`model.init_weights`): reference models built by their own libraries
//! with random weights load into contrail's models through `ContrastiveModel::load_initial`
//! and compute the same embeddings.
//!
//! tests/fixtures/reference/pretrained/make_models.py (pinned open_clip 3.3.0, torchvision
//! 0.26.0, torch 2.11.0; run here with the project's .venv) writes open_clip `ViT-B-32` as a
//! DDP training checkpoint (a pickle, names under `module.`), which scripts/to_safetensors.py
//! converts, `ViT-B-32-quickgelu` as safetensors, and torchvision `resnet50` with its
//! classifier, plus their outputs on fixed inputs. About 1.9 GB goes to a temporary folder and
//! is removed at the end.
//!
//! A test binary of its own (as torchvision_compat.rs): the models are large, and one Python
//! run serves every check, so the checks run in order in one test.

use contrail_common::config::{
    Activation, BlockKind, EncoderKind, NormKind, ObjectiveKind, StemKind, TextSettings,
    VitSettings, VitStyle,
};
use contrail_common::JobConfig;
use contrail_worker::model::init_weights::Tower;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::tokenize::Tokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};

const TOLERANCE: f64 = 1e-4;

/// CLIP's BPE ids, for the embedding table's size and the pooling position; the test feeds
/// token ids, so no text is ever encoded.
struct ClipIds;

impl Tokenizer for ClipIds {
    fn vocab_size(&self) -> i64 {
        49408
    }
    fn pad_id(&self) -> i64 {
        0
    }
    fn eot_id(&self) -> i64 {
        49407
    }
    fn sot_id(&self) -> Option<i64> {
        Some(49406)
    }
    fn encode_content(&self, _: &str) -> anyhow::Result<Vec<i64>> {
        anyhow::bail!("the test feeds token ids")
    }
    fn decode(&self, _: &[i64]) -> anyhow::Result<String> {
        anyhow::bail!("the test feeds token ids")
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python(args: &[&str]) {
    let py = root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup.sh and scripts/setup-test.sh",
        py.display()
    );
    let out = Command::new(&py)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        py.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn clip_b_32(activation: Activation) -> JobConfig {
    let mut job = JobConfig::default();
    job.objective.kind = ObjectiveKind::Clip;
    job.data.image_size = 224;
    job.model.encoder = EncoderKind::Vit;
    job.model.vit = VitSettings {
        patch_size: 32,
        width: 768,
        layers: 12,
        heads: 12,
        mlp_ratio: 4.0,
        style: VitStyle::OpenClip,
    };
    // The default text tower is ViT-B-32's: context 77, width 512, 12 layers, 8 heads.
    job.model.text = TextSettings::default();
    job.model.projector_out = 512;
    job.model.activation = activation;
    job
}

fn resnet50() -> JobConfig {
    let mut job = JobConfig::default();
    job.data.image_size = 224;
    job.model.layers = vec![3, 4, 6, 3];
    job.model.block = BlockKind::Bottleneck;
    job.model.width = 64;
    job.model.stem = StemKind::Imagenet;
    job.model.norm = NormKind::Batch;
    job
}

/// A SimCLR ViT-S/16 in timm's layout.
fn timm_vit_s_16() -> JobConfig {
    let mut job = JobConfig::default();
    job.data.image_size = 224;
    job.model.encoder = EncoderKind::Vit;
    job.model.vit = VitSettings {
        patch_size: 16,
        width: 384,
        layers: 12,
        heads: 6,
        mlp_ratio: 4.0,
        style: VitStyle::Timm,
    };
    job
}

fn build(job: &JobConfig) -> ContrastiveModel {
    let opts = BuildOptions {
        tokenizer: Some(&ClipIds),
        ..Default::default()
    };
    ContrastiveModel::build(job, Device::Cpu, opts).unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}");
    let diff = (got - want).abs().max().double_value(&[]);
    println!("{what}: max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "{what}: max abs diff {diff}");
}

fn pixels(image: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(image.flatten(0, -1)).unwrap()
}

#[test]
fn reference_models_load_and_compute_the_same() {
    let dir = std::env::temp_dir().join(format!("contrail-pretrained-{}", std::process::id()));
    let d = |name: &str| dir.join(name).to_string_lossy().into_owned();
    python(&["tests/fixtures/reference/pretrained/make_models.py", &d("")]);
    python(&[
        "scripts/to_safetensors.py",
        &d("vit_b_32.pt"),
        &d("vit_b_32.safetensors"),
    ]);
    let io: BTreeMap<String, Tensor> = read(&dir.join("io.safetensors")).into_iter().collect();
    let image = &io["image"];
    let text = &io["text"];

    // open_clip ViT-B-32, from a DDP training checkpoint: both towers and logit_scale.
    let file = read(&dir.join("vit_b_32.safetensors"));
    let mut clip = build(&clip_b_32(Activation::Gelu));
    let plan = clip.load_initial(&file, false).unwrap();
    assert_eq!(plan.mapping, ("module.".to_string(), String::new()));
    assert_eq!(plan.towers, [Tower::Image, Tower::Text, Tower::Head]);
    assert_eq!(
        plan.pairs.len(),
        file.len(),
        "every tensor of the file loads"
    );
    assert!(
        plan.unexpected.is_empty() && plan.heads_kept.is_empty(),
        "{plan:?}"
    );
    assert_close(
        "ViT-B-32 image",
        &clip.export_images(&pixels(image), 224),
        &io["vit_b_32.image"],
    );
    assert_close(
        "ViT-B-32 text",
        &clip.export_texts(text).unwrap(),
        &io["vit_b_32.text"],
    );

    // ViT-B-32-quickgelu: right only with model.activation = "quick_gelu".
    let file = read(&dir.join("vit_b_32_quickgelu.safetensors"));
    let mut quick = build(&clip_b_32(Activation::QuickGelu));
    quick.load_initial(&file, false).unwrap();
    let want = &io["vit_b_32_quickgelu.image"];
    assert_close(
        "ViT-B-32-quickgelu image",
        &quick.export_images(&pixels(image), 224),
        want,
    );
    assert_close(
        "ViT-B-32-quickgelu text",
        &quick.export_texts(text).unwrap(),
        &io["vit_b_32_quickgelu.text"],
    );
    let mut gelu = build(&clip_b_32(Activation::Gelu));
    gelu.load_initial(&file, false).unwrap();
    let off = (gelu.export_images(&pixels(image), 224) - want)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        off > 100.0 * TOLERANCE,
        "GELU on QuickGELU weights differs by only {off}"
    );

    // A CLIP model of another depth is refused, naming the blocks it has no place for.
    let mut shallow_job = clip_b_32(Activation::QuickGelu);
    shallow_job.model.vit.layers = 11;
    let e = build(&shallow_job)
        .load_initial(&file, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("visual.transformer.resblocks.11."), "{e}");

    // torchvision resnet50 into a SimCLR ResNet-50: the encoder loads, fc and the
    // BatchNorm counters match nothing, the projector keeps its initialisation.
    let file = read(&dir.join("resnet50.safetensors"));
    let mut resnet = build(&resnet50());
    let plan = resnet.load_initial(&file, false).unwrap();
    assert_eq!(plan.towers, [Tower::Image]);
    assert!(
        plan.unexpected
            .iter()
            .all(|n| n.starts_with("fc.") || n.ends_with(".num_batches_tracked")),
        "{plan:?}"
    );
    assert!(plan.heads_kept.iter().all(|n| n.starts_with("projector.")));
    assert_close(
        "resnet50 features",
        &resnet.encode_views(&pixels(image), 224),
        &io["resnet50.features"],
    );

    // timm vit_small_patch16_224 into a SimCLR ViT in timm's layout: names translated, the
    // classifier matches nothing, proj becomes the identity, so the encoder's features are
    // timm's pre-logits features.
    let file = read(&dir.join("timm_vit_small_patch16_224.safetensors"));
    let mut vit = build(&timm_vit_s_16());
    let plan = vit.load_initial(&file, false).unwrap();
    assert!(plan.from_timm && plan.proj_identity, "{plan:?}");
    assert_eq!(plan.unexpected, ["head.bias", "head.weight"]);
    assert_eq!(plan.pairs.len(), file.len() - 2);
    assert_close(
        "timm vit_small_patch16_224 features",
        &vit.encode_views(&pixels(image), 224),
        &io["timm_vit_s_16.features"],
    );
    // The same file into open_clip's layout: conv1.bias has no place, ln_pre is missing.
    let mut open_clip_style = timm_vit_s_16();
    open_clip_style.model.vit.style = VitStyle::OpenClip;
    let e = build(&open_clip_style)
        .load_initial(&file, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv1.bias") || e.contains("ln_pre"), "{e}");

    let _ = std::fs::remove_dir_all(&dir);
}
