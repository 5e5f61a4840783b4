//! Shared by the equivalence tests: a small GroupNorm model, fixed inputs drawn under one
//! RNG lock, model copies, and parameter comparison.
#![allow(dead_code)]

pub mod ranks;

use contrail_common::config::{ModelConfig, NormKind, StemKind};
use contrail_worker::model::ContrastiveModel;
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
    let initial = ContrastiveModel::new(&model_config(), Device::Cpu).unwrap();
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
    let mut m = ContrastiveModel::new(&model_config(), Device::Cpu).unwrap();
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
