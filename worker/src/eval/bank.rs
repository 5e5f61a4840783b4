//! A bank of embeddings with its labels, and the checks every evaluation runs on its input.

use tch::{Device, Kind, Tensor};

/// Why an evaluation could not run. Each names the bank (its file or role) it is about.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{bank}: the bank is empty")]
    Empty { bank: String },
    #[error("{bank}: expected a 2-D (rows, dim) tensor, got shape {shape:?}")]
    NotMatrix { bank: String, shape: Vec<i64> },
    #[error("{bank}: row {row} holds NaN or infinity")]
    NotFinite { bank: String, row: i64 },
    #[error("{bank} has dimension {got} but {other} has {want}")]
    DimMismatch {
        bank: String,
        got: i64,
        other: String,
        want: i64,
    },
    #[error("{bank}: {rows} rows but {labels} labels")]
    LengthMismatch {
        bank: String,
        rows: i64,
        labels: i64,
    },
    #[error("{bank}: has no labels, which this evaluation needs")]
    MissingLabels { bank: String },
    #[error("{bank}: label {label} at row {row} is outside 0..{classes}")]
    BadLabel {
        bank: String,
        row: i64,
        label: i64,
        classes: i64,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// Embeddings `(rows, dim)` with optional class labels `(rows,)`, and a name for messages (the
/// file it came from, or "train bank" / "test bank").
pub struct Bank {
    pub name: String,
    pub embeddings: Tensor,
    pub labels: Option<Tensor>,
}

impl Bank {
    /// A checked bank: 2-D, not empty, every value finite, labels (if any) one per row and
    /// non-negative. Embeddings become float32 (evaluation arithmetic is f32 everywhere, as in
    /// the references); labels become Int64 on the embeddings' device.
    pub fn new(
        name: impl Into<String>,
        embeddings: Tensor,
        labels: Option<Tensor>,
    ) -> Result<Bank> {
        let name = name.into();
        let shape = embeddings.size();
        if shape.len() != 2 {
            return Err(EvalError::NotMatrix { bank: name, shape });
        }
        if shape[0] == 0 || shape[1] == 0 {
            return Err(EvalError::Empty { bank: name });
        }
        let embeddings = embeddings.to_kind(Kind::Float);
        let bad = embeddings.isfinite().logical_not().any_dim(1, false);
        if bad.any().int64_value(&[]) != 0 {
            let row = bad.to_kind(Kind::Int64).argmax(0, false).int64_value(&[]);
            return Err(EvalError::NotFinite { bank: name, row });
        }
        let labels = match labels {
            None => None,
            Some(l) => {
                let l = l
                    .to_kind(Kind::Int64)
                    .to_device(embeddings.device())
                    .flatten(0, -1);
                if l.size()[0] != shape[0] {
                    return Err(EvalError::LengthMismatch {
                        bank: name,
                        rows: shape[0],
                        labels: l.size()[0],
                    });
                }
                let min = l.min().int64_value(&[]);
                if min < 0 {
                    let row = l
                        .lt(0)
                        .to_kind(Kind::Int64)
                        .argmax(0, false)
                        .int64_value(&[]);
                    return Err(EvalError::BadLabel {
                        bank: name,
                        row,
                        label: min,
                        classes: l.max().int64_value(&[]) + 1,
                    });
                }
                Some(l)
            }
        };
        Ok(Bank {
            name,
            embeddings,
            labels,
        })
    }

    pub fn rows(&self) -> i64 {
        self.embeddings.size()[0]
    }

    pub fn dim(&self) -> i64 {
        self.embeddings.size()[1]
    }

    pub fn device(&self) -> Device {
        self.embeddings.device()
    }

    /// The labels, or an error naming this bank.
    pub fn labels(&self) -> Result<&Tensor> {
        self.labels
            .as_ref()
            .ok_or_else(|| EvalError::MissingLabels {
                bank: self.name.clone(),
            })
    }

    /// One more than the largest label (the class count when every class occurs).
    pub fn classes(&self) -> Result<i64> {
        Ok(self.labels()?.max().int64_value(&[]) + 1)
    }

    /// The bank moved to `device` (a no-op when it is there).
    pub fn to_device(&self, device: Device) -> Bank {
        Bank {
            name: self.name.clone(),
            embeddings: self.embeddings.to_device(device),
            labels: self.labels.as_ref().map(|l| l.to_device(device)),
        }
    }

    /// Refuses `other` unless its dimension is this bank's.
    pub fn same_dim(&self, other: &Bank) -> Result<()> {
        if self.dim() != other.dim() {
            return Err(EvalError::DimMismatch {
                bank: other.name.clone(),
                got: other.dim(),
                other: self.name.clone(),
                want: self.dim(),
            });
        }
        Ok(())
    }

    /// Refuses a label of this bank at or past `classes` (the classes a classifier knows).
    pub fn labels_within(&self, classes: i64) -> Result<()> {
        let l = self.labels()?;
        let max = l.max().int64_value(&[]);
        if max >= classes {
            let row = l
                .ge(classes)
                .to_kind(Kind::Int64)
                .argmax(0, false)
                .int64_value(&[]);
            return Err(EvalError::BadLabel {
                bank: self.name.clone(),
                row,
                label: max,
                classes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<Bank>) -> String {
        r.err().expect("refused").to_string()
    }

    #[test]
    fn bad_banks_are_refused_with_their_name() {
        let ok = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
        assert_eq!(
            msg(Bank::new(
                "a.npy",
                Tensor::ones([3], (Kind::Float, Device::Cpu)),
                None
            )),
            "a.npy: expected a 2-D (rows, dim) tensor, got shape [3]"
        );
        assert_eq!(
            msg(Bank::new(
                "a.npy",
                Tensor::ones([0, 4], (Kind::Float, Device::Cpu)),
                None
            )),
            "a.npy: the bank is empty"
        );
        let nan = ok.copy();
        let _ = nan.get(2).get(1).fill_(f64::NAN);
        assert_eq!(
            msg(Bank::new("b", nan, None)),
            "b: row 2 holds NaN or infinity"
        );
        let two = Tensor::from_slice(&[0i64, 1]);
        assert_eq!(
            msg(Bank::new("c", ok.copy(), Some(two))),
            "c: 3 rows but 2 labels"
        );
        let neg = Tensor::from_slice(&[0i64, -1, 1]);
        assert!(msg(Bank::new("d", ok.copy(), Some(neg))).starts_with("d: label -1 at row 1"));
        let b = Bank::new("e", ok.copy(), None).unwrap();
        assert_eq!(
            b.labels().err().unwrap().to_string(),
            "e: has no labels, which this evaluation needs"
        );
        let wide = Bank::new("f", Tensor::ones([2, 5], (Kind::Float, Device::Cpu)), None).unwrap();
        assert_eq!(
            b.same_dim(&wide).err().unwrap().to_string(),
            "f has dimension 5 but e has 2"
        );
    }
}
