//! Image↔text retrieval over paired banks (row i of the images goes with row i of the texts),
//! as OpenCLIP's `get_clip_metrics`: on L2-normalised rows, the rank of the true partner is
//! the number of candidates scoring strictly higher; R@K is the share ranked below K, mean and
//! median rank count from 1. Both banks are walked in chunks, so no `n × n` matrix is formed.

use tch::{Kind, Tensor};

use super::bank::{Bank, EvalError, Result};
use super::DEFAULT_CHUNK_ROWS;
use crate::nn::l2_normalize;

/// The K of the reported recalls.
pub const RECALL_AT: [i64; 3] = [1, 5, 10];

/// One direction's numbers.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Direction {
    /// R@1, R@5, R@10 as fractions.
    pub recall: [f64; 3],
    pub mean_rank: f64,
    pub median_rank: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Retrieval {
    pub image_to_text: Direction,
    pub text_to_image: Direction,
    /// The mean of the six recalls.
    pub mean_recall: f64,
    pub pairs: usize,
}

/// Retrieval metrics of paired `images` and `texts` (same row count and dimension).
pub fn evaluate(images: &Bank, texts: &Bank, chunk_rows: Option<i64>) -> Result<Retrieval> {
    images.same_dim(texts)?;
    if images.rows() != texts.rows() {
        return Err(EvalError::Invalid(format!(
            "retrieval pairs row i of {} with row i of {}, but they have {} and {} rows",
            images.name,
            texts.name,
            images.rows(),
            texts.rows()
        )));
    }
    let chunk = chunk_rows.unwrap_or(DEFAULT_CHUNK_ROWS).max(1);
    let img = l2_normalize(&images.embeddings);
    let txt = l2_normalize(&texts.embeddings.to_device(images.device()));
    let image_to_text = direction(&ranks(&img, &txt, chunk));
    let text_to_image = direction(&ranks(&txt, &img, chunk));
    let mean_recall = image_to_text
        .recall
        .iter()
        .chain(&text_to_image.recall)
        .sum::<f64>()
        / 6.0;
    Ok(Retrieval {
        image_to_text,
        text_to_image,
        mean_recall,
        pairs: images.rows() as usize,
    })
}

/// For each query row i, how many candidate rows j ≠ i score strictly above candidate i.
fn ranks(queries: &Tensor, candidates: &Tensor, chunk: i64) -> Vec<i64> {
    let n = queries.size()[0];
    let mut out = Vec::with_capacity(n as usize);
    let mut a = 0;
    while a < n {
        let rows = chunk.min(n - a);
        let q = queries.narrow(0, a, rows);
        // The partner's score from the same kind of product as the others, so equal vectors
        // compare equal.
        let own = q
            .matmul(&candidates.narrow(0, a, rows).tr())
            .diagonal(0, 0, 1)
            .unsqueeze(1);
        let mut above = Tensor::zeros([rows], (Kind::Int64, q.device()));
        let mut c = 0;
        while c < n {
            let cols = chunk.min(n - c);
            let mut beats = q
                .matmul(&candidates.narrow(0, c, cols).tr())
                .gt_tensor(&own);
            // The partner itself never counts (it only could through rounding).
            let (lo, hi) = (a.max(c), (a + rows).min(c + cols));
            if lo < hi {
                let r = Tensor::arange_start(lo - a, hi - a, (Kind::Int64, q.device()));
                let k = Tensor::arange_start(lo - c, hi - c, (Kind::Int64, q.device()));
                let _ = beats.index_put_(
                    &[Some(r), Some(k)],
                    &Tensor::from(false).to_device(q.device()),
                    false,
                );
            }
            above += beats.sum_dim_intlist(1, false, Kind::Int64);
            c += cols;
        }
        out.extend(Vec::<i64>::try_from(above.to_device(tch::Device::Cpu)).expect("Int64"));
        a += rows;
    }
    out
}

fn direction(ranks: &[i64]) -> Direction {
    let n = ranks.len() as f64;
    let recall = RECALL_AT.map(|k| ranks.iter().filter(|&&r| r < k).count() as f64 / n);
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let m = sorted.len();
    // numpy's median averages the two middle values of an even count.
    let median = if m % 2 == 1 {
        sorted[m / 2] as f64
    } else {
        (sorted[m / 2 - 1] + sorted[m / 2]) as f64 / 2.0
    };
    Direction {
        recall,
        mean_rank: ranks.iter().sum::<i64>() as f64 / n + 1.0,
        median_rank: median.floor() + 1.0,
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    #[test]
    fn ranks_count_better_candidates_and_chunking_agrees() {
        tch::manual_seed(5);
        let img = Tensor::randn([37, 8], (Kind::Float, Device::Cpu));
        let txt = &img + 0.8 * Tensor::randn([37, 8], (Kind::Float, Device::Cpu));
        let (i, t) = (l2_normalize(&img), l2_normalize(&txt));
        // Reference: the position of the partner in a full descending sort.
        let full = i.matmul(&t.tr());
        let own = full.diagonal(0, 0, 1).unsqueeze(1);
        let want =
            Vec::<i64>::try_from(full.gt_tensor(&own).sum_dim_intlist(1, false, Kind::Int64))
                .unwrap();
        for chunk in [1, 5, 37, 64] {
            assert_eq!(ranks(&i, &t, chunk), want, "chunk {chunk}");
        }
        let d = direction(&[0, 0, 3, 12]);
        assert_eq!(d.recall, [0.5, 0.75, 0.75]);
        assert_eq!(d.mean_rank, 4.75);
        assert_eq!(d.median_rank, 2.0);
    }

    #[test]
    fn identical_pairs_are_all_found_first() {
        let x = Tensor::eye(6, (Kind::Float, Device::Cpu));
        let b = Bank::new("img", x.copy(), None).unwrap();
        let r = evaluate(&b, &b, Some(4)).unwrap();
        assert_eq!(r.image_to_text.recall, [1.0, 1.0, 1.0]);
        assert_eq!(r.mean_recall, 1.0);
        let short = Bank::new("txt", x.narrow(0, 0, 5), None).unwrap();
        assert!(evaluate(&b, &short, None).is_err());
    }
}
