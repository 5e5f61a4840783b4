//! SwAV's prototypes: part of the model (trainable, checkpointed as `prototypes.weight`);
//! the loss that scores against them is `objective::swav`.

use crate::nn::l2_normalize;
use tch::{nn, Tensor};

/// SwAV's prototype layer: a bias-free linear map `d → K` whose weight rows are L2-normalised
/// in place (without gradient) before every forward, so the scores are cosine similarities
/// when the input rows are unit vectors.
#[derive(Debug)]
pub struct Prototypes {
    /// K × d; a trainable variable of the `VarStore` it was created in.
    pub weight: Tensor,
}

impl Prototypes {
    /// `n_prototypes` prototypes of dimension `dim` under `path` (variable `weight`), with
    /// PyTorch's default `nn.Linear` initialisation (Kaiming uniform), as lightly, and the
    /// rows normalised, so the stored values are what the first forward uses.
    pub fn new(path: &nn::Path, dim: i64, n_prototypes: i64) -> Self {
        let cfg = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let prototypes = Self {
            weight: nn::linear(path, dim, n_prototypes, cfg).ws,
        };
        prototypes.normalize_();
        prototypes
    }

    /// Normalises the weight rows in place (no gradient), as SwAV does before each forward.
    pub fn normalize_(&self) {
        tch::no_grad(|| {
            let mut w = self.weight.shallow_clone();
            let unit = l2_normalize(&w);
            w.copy_(&unit);
        });
    }

    /// Scores `z · Wᵀ` (B × K) after normalising the prototypes; `z` should be L2-normalised.
    pub fn forward(&self, z: &Tensor) -> Tensor {
        self.normalize_();
        z.matmul(&self.weight.tr())
    }
}
