//! contrail-test-support: what the test suites share, so no helper is written twice.
//!
//! - this module: a small GroupNorm model, a small CLIP job, fixed inputs drawn under one RNG
//!   lock ([`seeded`]), model copies, parameter comparison, reference fixtures, step batches.
//! - [`ranks`]: multi-process tests, each rank a re-run of the test binary.
//! - [`cluster`]: local-cluster processes, their stdout and `/status`.
//! - [`gpu`]: GPU tests, ignored on a machine without one, and bodies run on CPU and CUDA.
//!
//! The suites are one binary each (`worker/tests/cpu`, `worker/tests/gpu`, `cli/tests/e2e`),
//! so their tests share one process and one libtorch RNG: every test that seeds and draws
//! does so under [`seeded`].

pub mod cluster;
pub mod gpu;
pub mod ranks;

use contrail_common::config::{ModelConfig, NormKind, StemKind};
use contrail_common::JobConfig;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// GroupNorm: with BatchNorm each rank (or micro-batch) normalises with its own statistics,
/// which legitimately changes the result of a split, so only a batch-independent norm can be
/// compared exactly.
pub fn model_config() -> ModelConfig {
    ModelConfig {
        layers: vec![1, 1],
        width: 8,
        norm: NormKind::Group,
        projector_hidden: 64,
        projector_out: 8,
        stem: StemKind::Cifar,
        ..Default::default()
    }
}

/// The shipped CLIP job (ViT and causal text tower, byte tokenizer, synthetic data).
pub const LOCAL_CLIP_CONFIG: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/local-clip.toml");

/// `--set` overrides that shrink [`LOCAL_CLIP_CONFIG`] to a model tests build in milliseconds:
/// 16-pixel images, one-layer towers of width 32, 16-wide embeddings.
pub const SMALL_CLIP: [&str; 9] = [
    "data.image_size=16",
    "model.vit.patch_size=8",
    "model.vit.width=32",
    "model.vit.layers=1",
    "model.vit.heads=2",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.projector_out=16",
];

/// [`LOCAL_CLIP_CONFIG`] with [`SMALL_CLIP`] and then `extra` applied.
pub fn small_clip_job(extra: &[&str]) -> JobConfig {
    let set: Vec<String> = SMALL_CLIP
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    JobConfig::from_file(LOCAL_CLIP_CONFIG, &set).unwrap()
}

/// The model of [`model_config`], built the one way models are built: as a SimCLR job's.
pub fn build_model() -> ContrastiveModel {
    let job = JobConfig {
        model: model_config(),
        ..Default::default()
    };
    ContrastiveModel::build(&job, Device::Cpu, BuildOptions::default()).unwrap()
}

pub struct Setup {
    pub initial: ContrastiveModel,
    pub view1: Tensor,
    pub view2: Tensor,
}

/// libtorch has one global RNG and the tests of a file run on parallel threads: seeding and
/// drawing happen under this lock so every test sees the same model and images.
static RNG: Mutex<()> = Mutex::new(());

/// A model and `samples` pairs of 16×16 views (the second a noisy copy of the first).
pub fn setup(seed: i64, samples: i64) -> Setup {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    let initial = build_model();
    let shape = [samples, 3, 16, 16];
    let view1 = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let view2 = &view1 * 0.8 + Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.3;
    Setup {
        initial,
        view1,
        view2,
    }
}

pub fn fresh_copy(of: &ContrastiveModel) -> ContrastiveModel {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // A different seed, so only the copy can make the models identical.
    tch::manual_seed(99);
    let mut m = build_model();
    m.copy_from(of).unwrap();
    m
}

/// Parameters after one step, the reported loss and the global sample count, for a rank.
pub type RankResult = (Vec<(String, Tensor)>, f64, i64);

/// The largest elementwise difference between two name-sorted parameter lists, and where.
pub fn max_abs_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0, String::new());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = (ta - tb).abs().max().double_value(&[]);
        if d > worst.0 {
            worst = (d, na.clone());
        }
    }
    worst
}

/// Runs `f` with libtorch's global RNG seeded to `seed`, under the same lock as [`setup`].
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    f()
}

/// A fixture folder under `tests/fixtures/` (relative to the repository root).
pub fn fixture_dir(relative: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(relative)
}

/// A fixture written by a reference script: the tensors of `tensors_file` by name and the
/// `cases` of `cases.json` in the same folder.
pub fn read_fixture(
    dir: &std::path::Path,
    tensors_file: &str,
) -> (std::collections::HashMap<String, Tensor>, serde_json::Value) {
    let path = dir.join(tensors_file);
    let tensors = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect();
    let json_path = dir.join("cases.json");
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", json_path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).expect("cases.json is JSON");
    (tensors, doc["cases"].clone())
}

/// `samples` captions of byte tokens: start (257), `body` random bytes, end (258), then `pad`
/// padding zeros.
pub fn random_captions(samples: i64, body: i64, pad: i64) -> Tensor {
    let body = Tensor::randint_low(1, 257, [samples, body], (Kind::Int64, Device::Cpu));
    let sot = Tensor::full([samples, 1], 257, (Kind::Int64, Device::Cpu));
    let eot = Tensor::full([samples, 1], 258, (Kind::Int64, Device::Cpu));
    let pad = Tensor::zeros([samples, pad], (Kind::Int64, Device::Cpu));
    Tensor::cat(&[sot, body, eot, pad], 1)
}

/// `steps` batches of `samples` pairs drawn under the RNG lock (seed 41): two 16×16 views (the
/// second a noisy copy of the first), or for CLIP images and [`random_captions`] with `body`
/// random bytes and `pad` padding.
pub fn step_batches(
    clip: bool,
    steps: u64,
    samples: i64,
    body: i64,
    pad: i64,
) -> Vec<(Tensor, Tensor)> {
    seeded(41, || {
        (0..steps)
            .map(|_| {
                let v1 = Tensor::randn([samples, 3, 16, 16], (Kind::Float, Device::Cpu));
                let v2 = if clip {
                    random_captions(samples, body, pad)
                } else {
                    &v1 * 0.8
                        + Tensor::randn([samples, 3, 16, 16], (Kind::Float, Device::Cpu)) * 0.3
                };
                (v1, v2)
            })
            .collect()
    })
}

/// Rank `rank`'s micro-batches of a step when rank r takes micro-batches of sizes `plan[r]`
/// from the step's batch, ranks in order: (first row, rows) of each.
pub fn micro_batch_ranges(plan: &[Vec<i64>], rank: usize) -> Vec<(i64, i64)> {
    let mut at: i64 = plan[..rank].iter().flatten().sum();
    plan[rank]
        .iter()
        .map(|&b| {
            at += b;
            (at - b, b)
        })
        .collect()
}

/// The views of `ranges` (from [`micro_batch_ranges`]) cut out of a step's batch.
pub fn slice_micro_batches(
    v1: &Tensor,
    v2: &Tensor,
    ranges: &[(i64, i64)],
) -> Vec<(Tensor, Tensor)> {
    ranges
        .iter()
        .map(|&(from, b)| (v1.narrow(0, from, b), v2.narrow(0, from, b)))
        .collect()
}
