//! Image↔text retrieval over paired banks (row i of the images goes with row i of the texts),
//! as OpenCLIP's `get_clip_metrics`, or with several captions per image as CLIP_benchmark
//! scores COCO and Flickr: on L2-normalised rows, the rank of the true partner is
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
    /// Image–caption pairs (caption rows).
    pub pairs: usize,
    /// Image rows (as many as `pairs` unless images have several captions).
    pub images: usize,
}

/// Retrieval metrics of paired `images` and `texts` (same row count and dimension).
pub fn evaluate(images: &Bank, texts: &Bank, chunk_rows: Option<i64>) -> Result<Retrieval> {
    if images.rows() != texts.rows() {
        return Err(EvalError::Invalid(format!(
            "retrieval pairs row i of {} with row i of {}, but they have {} and {} rows",
            images.name,
            texts.name,
            images.rows(),
            texts.rows()
        )));
    }
    let pairs: Vec<i64> = (0..images.rows()).collect();
    evaluate_grouped(images, texts, &pairs, chunk_rows)
}

/// Retrieval metrics with several captions per image, as CLIP_benchmark reports COCO and
/// Flickr: `image_of[t]` is the image row caption row `t` describes. Text → image: a caption
/// is found at K when its image ranks below K; image → text: an image is found at K when any
/// of its captions does (the rank of its best-scoring caption). Every image needs a caption.
pub fn evaluate_grouped(
    images: &Bank,
    texts: &Bank,
    image_of: &[i64],
    chunk_rows: Option<i64>,
) -> Result<Retrieval> {
    images.same_dim(texts)?;
    let n_img = images.rows();
    if image_of.len() as i64 != texts.rows() {
        return Err(EvalError::Invalid(format!(
            "retrieval: {} has {} rows but {} image indices were given",
            texts.name,
            texts.rows(),
            image_of.len()
        )));
    }
    if let Some(bad) = image_of.iter().find(|&&i| !(0..n_img).contains(&i)) {
        return Err(EvalError::Invalid(format!(
            "retrieval: image index {bad} is outside {}'s {n_img} rows",
            images.name
        )));
    }
    let mut captioned = vec![false; n_img as usize];
    for &i in image_of {
        captioned[i as usize] = true;
    }
    if let Some(i) = captioned.iter().position(|c| !c) {
        return Err(EvalError::Invalid(format!(
            "retrieval: row {i} of {} has no caption in {}",
            images.name, texts.name
        )));
    }
    let chunk = chunk_rows.unwrap_or(DEFAULT_CHUNK_ROWS).max(1);
    let device = images.device();
    let img = l2_normalize(&images.embeddings);
    let txt = l2_normalize(&texts.embeddings.to_device(device));
    let image_ids = Tensor::arange(n_img, (Kind::Int64, device));
    let text_ids = Tensor::from_slice(image_of).to_device(device);
    let image_to_text = direction(&ranks(&img, &image_ids, &txt, &text_ids, chunk));
    let text_to_image = direction(&ranks(&txt, &text_ids, &img, &image_ids, chunk));
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
        pairs: texts.rows() as usize,
        images: n_img as usize,
    })
}

/// For each query row, how many candidate rows outside its group score strictly above the
/// best-scoring candidate of its group (rows pair up where `*_groups` hold the same id). The
/// group's candidates are scored first, by a product of their own (a few rows per query
/// chunk), then every candidate chunk once; both are the same kind of product, so equal
/// vectors compare equal.
fn ranks(
    queries: &Tensor,
    query_groups: &Tensor,
    candidates: &Tensor,
    candidate_groups: &Tensor,
    chunk: i64,
) -> Vec<i64> {
    let (n, m) = (queries.size()[0], candidates.size()[0]);
    let mut out = Vec::with_capacity(n as usize);
    let mut a = 0;
    while a < n {
        let rows = chunk.min(n - a);
        let q = queries.narrow(0, a, rows);
        let groups = query_groups.narrow(0, a, rows);
        let qg = groups.unsqueeze(1);
        let mine = Tensor::isin(candidate_groups, &groups, false, false)
            .nonzero()
            .squeeze_dim(1);
        let best = q
            .matmul(&candidates.index_select(0, &mine).tr())
            .masked_fill(
                &qg.eq_tensor(&candidate_groups.index_select(0, &mine).unsqueeze(0))
                    .logical_not(),
                f64::NEG_INFINITY,
            )
            .amax([1].as_slice(), true);
        let mut above = Tensor::zeros([rows], (Kind::Int64, q.device()));
        let mut c = 0;
        while c < m {
            let cols = chunk.min(m - c);
            let outside = qg
                .eq_tensor(&candidate_groups.narrow(0, c, cols).unsqueeze(0))
                .logical_not();
            let beats = q
                .matmul(&candidates.narrow(0, c, cols).tr())
                .gt_tensor(&best)
                .logical_and(&outside);
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
        let ids = Tensor::arange(37, (Kind::Int64, Device::Cpu));
        for chunk in [1, 5, 37, 64] {
            assert_eq!(ranks(&i, &ids, &t, &ids, chunk), want, "chunk {chunk}");
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

    /// Two captions per image: an image counts as found at K when either caption is; each
    /// caption is ranked against the images. Checked against the brute-force definition.
    #[test]
    fn several_captions_per_image_count_as_clip_benchmark_does() {
        tch::manual_seed(9);
        let img = Tensor::randn([11, 6], (Kind::Float, Device::Cpu));
        let image_of: Vec<i64> = (0..22).map(|t| t / 2).collect();
        let idx = Tensor::from_slice(&image_of);
        let noise = Tensor::randn([22, 6], (Kind::Float, Device::Cpu)) * 0.9;
        let txt: Tensor = img.index_select(0, &idx) + noise;
        let (ib, tb) = (
            Bank::new("img", img.copy(), None).unwrap(),
            Bank::new("txt", txt.copy(), None).unwrap(),
        );
        let scores = l2_normalize(&img).matmul(&l2_normalize(&txt).tr()); // 11 x 22
        let s = |i: i64, t: i64| scores.double_value(&[i, t]);
        let i2t: Vec<i64> = (0..11)
            .map(|i| {
                let best = s(i, 2 * i).max(s(i, 2 * i + 1));
                (0..22).filter(|&t| t / 2 != i && s(i, t) > best).count() as i64
            })
            .collect();
        let t2i: Vec<i64> = (0..22)
            .map(|t| {
                (0..11)
                    .filter(|&i| i != t / 2 && s(i, t) > s(t / 2, t))
                    .count() as i64
            })
            .collect();
        for chunk in [1, 4, 64] {
            let r = evaluate_grouped(&ib, &tb, &image_of, Some(chunk)).unwrap();
            assert_eq!(r.image_to_text, direction(&i2t), "chunk {chunk}");
            assert_eq!(r.text_to_image, direction(&t2i), "chunk {chunk}");
            assert_eq!((r.images, r.pairs), (11, 22));
        }
        // An image without a caption, or an index past the images, is an error.
        let e = evaluate_grouped(&ib, &tb, &[0; 22], None).unwrap_err();
        assert!(e.to_string().contains("has no caption"), "{e}");
        let mut past = image_of.clone();
        past[3] = 11;
        assert!(evaluate_grouped(&ib, &tb, &past, None).is_err());
    }
}
