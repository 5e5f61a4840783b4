//! BERT-whitening (Su et al., 2021), fitted on the train bank: subtract the bank's mean, then
//! multiply by `U · diag(1/√s)` from the SVD of the covariance (`np.cov`, divided by n − 1),
//! keeping the first `dim` columns. Whitened rows are what kNN then normalises and compares.
//! The mean and covariance are accumulated over row chunks in float64, so a bank of millions
//! of rows needs memory for one chunk and one `dim × dim` matrix.

use tch::{Kind, Tensor};

use super::bank::{Bank, EvalError, Result};
use super::DEFAULT_CHUNK_ROWS;

/// Singular values below this fraction of the largest are treated as this fraction, so a
/// rank-deficient bank gives large but finite weights instead of infinities.
const MIN_RELATIVE_SINGULAR_VALUE: f64 = 1e-12;

/// A fitted whitening: `apply(x) = (x − mean) · kernel`.
pub struct Whitening {
    /// `(1, dim_in)`, float32.
    pub mean: Tensor,
    /// `(dim_in, dim_out)`, float32.
    pub kernel: Tensor,
}

impl Whitening {
    /// Fits on `train`, keeping `dim` output dimensions (all of them when `None`).
    pub fn fit(train: &Bank, dim: Option<i64>) -> Result<Whitening> {
        let (n, d) = (train.rows(), train.dim());
        let keep = dim.unwrap_or(d);
        if keep < 1 || keep > d {
            return Err(EvalError::Invalid(format!(
                "whitening: dimension {keep} must be between 1 and {} ({}'s dimension)",
                d, train.name
            )));
        }
        if n < 2 {
            return Err(EvalError::Invalid(format!(
                "whitening: {} has {n} row; fitting a covariance needs at least 2",
                train.name
            )));
        }
        let opts = (Kind::Double, train.device());
        let chunks = || {
            (0..n)
                .step_by(DEFAULT_CHUNK_ROWS as usize)
                .map(move |s| (s, DEFAULT_CHUNK_ROWS.min(n - s)))
        };
        let mut sum = Tensor::zeros([d], opts);
        for (s, len) in chunks() {
            sum += train
                .embeddings
                .narrow(0, s, len)
                .to_kind(Kind::Double)
                .sum_dim_intlist(0, false, Kind::Double);
        }
        let mean = (sum / n as f64).unsqueeze(0);
        let mut cov = Tensor::zeros([d, d], opts);
        for (s, len) in chunks() {
            let x = train.embeddings.narrow(0, s, len).to_kind(Kind::Double) - &mean;
            cov += x.tr().matmul(&x);
        }
        let cov = cov / (n - 1) as f64;
        // torch.svd (reduced); tch's linalg_svd cannot leave its CUDA-only `driver` unset.
        let (u, s, _) = cov.svd(true, true);
        let floor = s.max().double_value(&[]) * MIN_RELATIVE_SINGULAR_VALUE;
        let scale = s.clamp_min(floor.max(f64::MIN_POSITIVE)).rsqrt();
        let kernel = (u * scale.unsqueeze(0)).narrow(1, 0, keep);
        Ok(Whitening {
            mean: mean.to_kind(Kind::Float),
            kernel: kernel.to_kind(Kind::Float),
        })
    }

    /// `(x − mean) · kernel` for rows `x` of the fitted dimension.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        (x.to_kind(Kind::Float) - &self.mean).matmul(&self.kernel)
    }

    /// `bank` whitened, chunk by chunk; labels and name kept.
    pub fn apply_bank(&self, bank: &Bank) -> Result<Bank> {
        let want = self.mean.size()[1];
        if bank.dim() != want {
            return Err(EvalError::Invalid(format!(
                "whitening: {} has dimension {} but the whitening was fitted on dimension {want}",
                bank.name,
                bank.dim()
            )));
        }
        let mean = self.mean.to_device(bank.device());
        let kernel = self.kernel.to_device(bank.device());
        let n = bank.rows();
        let parts: Vec<Tensor> = (0..n)
            .step_by(DEFAULT_CHUNK_ROWS as usize)
            .map(|s| {
                let len = DEFAULT_CHUNK_ROWS.min(n - s);
                (bank.embeddings.narrow(0, s, len) - &mean).matmul(&kernel)
            })
            .collect();
        Bank::new(
            bank.name.clone(),
            Tensor::cat(&parts, 0),
            bank.labels.as_ref().map(Tensor::shallow_clone),
        )
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    /// Whitened train rows have zero mean and identity covariance, whatever the input's scale
    /// and correlation.
    #[test]
    fn whitened_train_bank_has_identity_covariance() {
        tch::manual_seed(3);
        let mix =
            Tensor::from_slice(&[2.0f32, 0.5, 0.0, 0.3, 1.0, 0.0, 0.0, 0.1, 4.0]).view([3, 3]);
        let x = Tensor::randn([3000, 3], (Kind::Float, Device::Cpu)).matmul(&mix) + 5.0;
        let bank = Bank::new("train", x, None).unwrap();
        let w = Whitening::fit(&bank, None).unwrap();
        let z = w
            .apply_bank(&bank)
            .unwrap()
            .embeddings
            .to_kind(Kind::Double);
        let mean = z.mean_dim(0, false, Kind::Double);
        assert!(mean.abs().max().double_value(&[]) < 1e-4);
        let zc = &z - z.mean_dim(0, true, Kind::Double);
        let cov = zc.tr().matmul(&zc) / 2999.0;
        let eye = Tensor::eye(3, (Kind::Double, Device::Cpu));
        let err = (cov - eye).abs().max().double_value(&[]);
        assert!(err < 1e-3, "covariance off identity by {err}");
        let two = Whitening::fit(&bank, Some(2)).unwrap();
        assert_eq!(two.kernel.size(), [3, 2]);
        assert!(Whitening::fit(&bank, Some(4)).is_err());
    }
}
