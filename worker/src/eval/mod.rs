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

/// How many of `predictions`' rows (each a ranking of classes, best first) have `labels` in
/// their first column, and in their first `top5_width` columns (5, or fewer when fewer are
/// meaningful: solo-learn's kNN counts at most k). `predictions` is `(n, ≥1)` Int64.
pub(crate) fn count_top_k(
    predictions: &tch::Tensor,
    labels: &tch::Tensor,
    top5_width: i64,
) -> (i64, i64) {
    let hits = predictions.eq_tensor(&labels.unsqueeze(1));
    let width = predictions.size()[1].min(top5_width);
    let top1 = hits.narrow(1, 0, 1).sum(tch::Kind::Int64).int64_value(&[]);
    let top5 = hits
        .narrow(1, 0, width)
        .any_dim(1, false)
        .sum(tch::Kind::Int64)
        .int64_value(&[]);
    (top1, top5)
}
