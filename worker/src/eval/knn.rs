//! Weighted kNN classification of a test bank by a labelled train bank.
//!
//! The voting is InstDisc's, as lightly's `knn_predict` and solo-learn's
//! `WeightedKNNClassifier` do it: each of the k nearest train vectors votes for its class with
//! weight `exp(similarity / T)` (cosine, on L2-normalised rows) or `1 / (distance + 1e-5)`
//! (euclidean, on the raw rows, solo-learn's form); the classes ranked by total weight are the
//! prediction. The train bank is walked in chunks and only a running top-k is kept, so a
//! `(chunk × bank)` score matrix is never larger than `chunk × bank_chunk`.

use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

use super::bank::{Bank, EvalError, Result};
use super::{top_k_accuracy, TopK, DEFAULT_CHUNK_ROWS};
use crate::nn::l2_normalize;

/// solo-learn's guard against a zero distance in the euclidean weight.
const EUCLIDEAN_EPSILON: f64 = 1e-5;

/// How neighbours are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Inner product of L2-normalised rows; votes weigh `exp(sim / T)`.
    Cosine,
    /// Euclidean distance of the rows as given; votes weigh `1 / (d + 1e-5)`.
    Euclidean,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Euclidean => "euclidean",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Metric, String> {
        match s {
            "cosine" => Ok(Metric::Cosine),
            "euclidean" => Ok(Metric::Euclidean),
            _ => Err(format!(
                "metric {s:?} must be one of \"cosine\", \"euclidean\""
            )),
        }
    }
}

/// The knobs of [`classify`]. The defaults are lightly's (k = 200, T = 0.1, cosine).
#[derive(Clone, Copy, Debug)]
pub struct KnnOptions {
    pub k: i64,
    pub temperature: f64,
    pub metric: Metric,
    /// Test rows scored at once.
    pub chunk_rows: i64,
    /// Train rows scored at once against a test chunk.
    pub bank_chunk_rows: i64,
}

impl Default for KnnOptions {
    fn default() -> Self {
        KnnOptions {
            k: 200,
            temperature: 0.1,
            metric: Metric::Cosine,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            bank_chunk_rows: 65_536,
        }
    }
}

impl KnnOptions {
    fn check(&self, train: &Bank) -> Result<()> {
        if self.k < 1 {
            return Err(EvalError::Invalid(format!(
                "kNN: k = {} must be at least 1",
                self.k
            )));
        }
        if self.k > train.rows() {
            return Err(EvalError::Invalid(format!(
                "kNN: k = {} is larger than {} ({} rows)",
                self.k,
                train.name,
                train.rows()
            )));
        }
        if self.metric == Metric::Cosine
            && (!self.temperature.is_finite() || self.temperature <= 0.0)
        {
            return Err(EvalError::Invalid(format!(
                "kNN: temperature {} must be positive",
                self.temperature
            )));
        }
        if self.chunk_rows < 1 || self.bank_chunk_rows < 1 {
            return Err(EvalError::Invalid(
                "kNN: chunk sizes must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// A train bank prepared for queries: rows normalised (cosine) and labels at hand.
pub struct KnnIndex<'a> {
    train: Tensor,
    labels: &'a Tensor,
    classes: i64,
    options: KnnOptions,
}

impl<'a> KnnIndex<'a> {
    pub fn new(train: &'a Bank, options: KnnOptions) -> Result<KnnIndex<'a>> {
        options.check(train)?;
        let labels = train.labels()?;
        let train_rows = match options.metric {
            Metric::Cosine => l2_normalize(&train.embeddings),
            Metric::Euclidean => train.embeddings.shallow_clone(),
        };
        Ok(KnnIndex {
            train: train_rows,
            labels,
            classes: train.classes()?,
            options,
        })
    }

    pub fn classes(&self) -> i64 {
        self.classes
    }

    /// The classes ranked for each row of `queries` `(b, dim)`, best first: `(b, classes)`
    /// Int64. Call it with at most a few thousand rows at a time.
    pub fn predict(&self, queries: &Tensor) -> Tensor {
        let o = &self.options;
        let q = match o.metric {
            Metric::Cosine => l2_normalize(&queries.to_kind(Kind::Float)),
            Metric::Euclidean => queries.to_kind(Kind::Float),
        };
        let (weights, neighbours) = self.nearest(&q);
        let weights = match o.metric {
            Metric::Cosine => (weights / o.temperature).exp(),
            Metric::Euclidean => weights,
        };
        let votes = self
            .labels
            .index_select(0, &neighbours.flatten(0, -1))
            .view_as(&neighbours);
        let scores = Tensor::zeros([q.size()[0], self.classes], (Kind::Float, q.device()))
            .scatter_add(1, &votes, &weights);
        scores.argsort(1, true)
    }

    /// The k largest similarities of each query (cosine: inner products; euclidean:
    /// `1 / (d + eps)`) and the train rows they belong to, over the bank in chunks.
    fn nearest(&self, q: &Tensor) -> (Tensor, Tensor) {
        let o = &self.options;
        let n = self.train.size()[0];
        let mut best: Option<(Tensor, Tensor)> = None;
        let mut start = 0;
        while start < n {
            let len = o.bank_chunk_rows.min(n - start);
            let part = self.train.narrow(0, start, len);
            let sim = match o.metric {
                Metric::Cosine => q.matmul(&part.tr()),
                Metric::Euclidean => {
                    (Tensor::cdist(q, &part, 2.0, None) + EUCLIDEAN_EPSILON).reciprocal()
                }
            };
            let (v, i) = sim.topk(o.k.min(len), 1, true, true);
            let i = i + start;
            best = Some(match best {
                None => (v, i),
                Some((bv, bi)) => {
                    let v = Tensor::cat(&[bv, v], 1);
                    let i = Tensor::cat(&[bi, i], 1);
                    let (v, at) = v.topk(o.k.min(v.size()[1]), 1, true, true);
                    (v, i.gather(1, &at, false))
                }
            });
            start += len;
        }
        best.expect("the bank is not empty")
    }
}

/// Top-1 and top-5 accuracy of kNN on `test` with `train` as the bank.
pub fn classify(train: &Bank, test: &Bank, options: KnnOptions) -> Result<TopK> {
    train.same_dim(test)?;
    let index = KnnIndex::new(train, options)?;
    let labels = test.labels()?;
    let device = train.device();
    Ok(top_k_accuracy(
        test.rows(),
        options.chunk_rows,
        labels,
        options.k.min(5),
        |start, len| index.predict(&test.embeddings.narrow(0, start, len).to_device(device)),
    ))
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn bank(name: &str, rows: &[[f32; 2]], labels: &[i64]) -> Bank {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Bank::new(
            name,
            Tensor::from_slice(&flat).view([rows.len() as i64, 2]),
            Some(Tensor::from_slice(labels)),
        )
        .unwrap()
    }

    #[test]
    fn nearest_class_wins_and_chunking_does_not_change_the_answer() {
        let train = bank(
            "train",
            &[[1.0, 0.1], [0.9, -0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]],
            &[0, 0, 1, 1, 2],
        );
        let test = bank("test", &[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]], &[0, 1, 2]);
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let opts = KnnOptions {
                k: 2,
                metric,
                ..Default::default()
            };
            let whole = KnnIndex::new(&train, opts)
                .unwrap()
                .predict(&test.embeddings);
            assert_eq!(
                Vec::<i64>::try_from(whole.select(1, 0)).unwrap(),
                [0, 1, 2],
                "{metric}"
            );
            let chunked = KnnIndex::new(
                &train,
                KnnOptions {
                    bank_chunk_rows: 2,
                    ..opts
                },
            )
            .unwrap()
            .predict(&test.embeddings);
            assert!(whole.equal(&chunked), "{metric}");
            let acc = classify(
                &train,
                &test,
                KnnOptions {
                    chunk_rows: 1,
                    ..opts
                },
            )
            .unwrap();
            assert_eq!((acc.top1, acc.top5, acc.samples), (1.0, 1.0, 3));
        }
    }

    #[test]
    fn k_larger_than_the_bank_is_refused() {
        let train = bank("train.npy", &[[1.0, 0.0]], &[0]);
        let e = classify(&train, &train, KnnOptions::default())
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "kNN: k = 200 is larger than train.npy (1 rows)"
        );
        let unlabelled = Bank::new(
            "test.npy",
            Tensor::ones([1, 2], (Kind::Float, Device::Cpu)),
            None,
        )
        .unwrap();
        let e = classify(
            &train,
            &unlabelled,
            KnnOptions {
                k: 1,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().starts_with("test.npy: has no labels"), "{e}");
    }
}
