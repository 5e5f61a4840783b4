//! Measuring embeddings: the numbers the teams who use them judge a pretraining run by.
//!
//! - [`knn`]: weighted k-nearest-neighbour classification (the InstDisc voting of lightly's
//!   `knn_predict` and solo-learn's `WeightedKNNClassifier`), cosine or euclidean.
//! - [`whiten`]: BERT-whitening fitted on the train bank, applied before kNN.
//! - [`linear`]: a linear probe, multinomial logistic regression with L2 on frozen features.
//! - [`zeroshot`]: OpenCLIP's zero-shot classifier from per-class prompt embeddings.
//! - [`retrieval`]: image→text and text→image recall@K over paired embeddings.
//!
//! Every function takes its banks as `(rows, dim)` tensors on any device and works through
//! them in row chunks, so memory stays bounded for banks of millions of vectors; inputs are
//! checked first ([`bank`]) and a bad one is an [`EvalError`] that names what was wrong.

pub mod bank;
pub mod knn;
pub mod linear;
pub mod retrieval;
pub mod whiten;
pub mod zeroshot;

pub use bank::{Bank, EvalError};

/// Top-1 and top-5 accuracy of a classifier, as fractions in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TopK {
    pub top1: f64,
    pub top5: f64,
    /// How many samples were classified.
    pub samples: usize,
}

/// Rows per chunk when a function walks a bank (a `chunk × bank` score matrix of f32 is
/// `4 · chunk · bank` bytes: 2 GB for 1,000 queries against 500,000 vectors, so callers with
/// very large banks pass a smaller one).
pub const DEFAULT_CHUNK_ROWS: i64 = 1024;

/// Top-1/top-5 accuracy over `n` labelled rows taken `chunk` at a time: `rank(start, len)`
/// gives the classes ranked best first (`(len, ≥1)` Int64) for rows `start..start + len`.
/// Top-5 counts the first `top5_width` places (5, or fewer when fewer are meaningful:
/// solo-learn's kNN counts at most k).
pub(crate) fn top_k_accuracy(
    n: i64,
    chunk: i64,
    labels: &tch::Tensor,
    top5_width: i64,
    mut rank: impl FnMut(i64, i64) -> tch::Tensor,
) -> TopK {
    let (mut top1, mut top5) = (0, 0);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let ranked = rank(start, len);
        let want = labels.narrow(0, start, len).to_device(ranked.device());
        let hits = ranked.eq_tensor(&want.unsqueeze(1));
        let width = ranked.size()[1].min(top5_width);
        top1 += hits.narrow(1, 0, 1).sum(tch::Kind::Int64).int64_value(&[]);
        top5 += hits
            .narrow(1, 0, width)
            .any_dim(1, false)
            .sum(tch::Kind::Int64)
            .int64_value(&[]);
        start += len;
    }
    TopK {
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
        samples: n as usize,
    }
}
