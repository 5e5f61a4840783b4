//! Online evaluation (`[eval]`): while the job trains, every rank embeds its share of a
//! labelled bank and of a held-out set with the encoder (the features before the projector,
//! through the deterministic evaluation view), rank 0 gathers the rows and classifies the
//! held-out set by weighted kNN. This is solo-learn's and lightly's online kNN monitor, spread
//! over the cluster instead of run on one device.
//!
//! Shares are fixed for the whole job: shard `i` of a set (in listing order) belongs to rank
//! `i mod world_size`, and a rank keeps at most its quota of the set's sample budget. The
//! encoded images stay in memory (small next to the decoded pixels) and are decoded again for
//! every round, so a round's memory is one batch of pixels plus the features.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use contrail_common::config::{EvalConfig, KnnMetric};
use contrail_common::status::{voted_rounds, EvalPoint};
use contrail_common::storage::list_shards;
use contrail_common::JobConfig;
use contrail_data::augment::Augmenter;
use contrail_data::shard_reader::read_shard;
use tch::{Device, Kind, Tensor};

use crate::dist::Collective;
use crate::eval::knn::{classify, KnnOptions, Metric};
use crate::eval::{Bank, TopK};
use crate::model::ContrastiveModel;
use crate::moe::Pass;

/// One labelled sample of a set, still encoded.
struct HeldSample {
    image: Bytes,
    label: i64,
}

/// One rank's part of a set (the bank or the held-out samples).
pub struct Share {
    samples: Vec<HeldSample>,
    /// Samples of this rank's shards left out: no image, no label, unreadable members.
    unusable: u64,
}

impl Share {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Rank `rank`'s part of a budget of `total` samples split over `world` ranks (the first
/// `total mod world` ranks take one more); None when the budget is 0, meaning "all".
pub fn quota(total: u64, rank: usize, world: usize) -> Option<u64> {
    if total == 0 {
        return None;
    }
    let (w, r) = (world.max(1) as u64, rank as u64);
    Some(total / w + u64::from(r < total % w))
}

/// Reads rank `rank`'s share of the set at `url`: its shards (every `world`-th, from `rank`)
/// in order, until it holds its quota of `total` usable samples (0: all of them).
pub async fn load_share(
    url: &str,
    s3_endpoint: &str,
    retries: u32,
    rank: usize,
    world: usize,
    total: u64,
) -> Result<Share> {
    let shards = list_shards(url, s3_endpoint).await?;
    if shards.is_empty() {
        anyhow::bail!("no shards at {url}");
    }
    let limit = quota(total, rank, world).map_or(usize::MAX, |q| q as usize);
    let share = Arc::new(Mutex::new(Share {
        samples: Vec::new(),
        unusable: 0,
    }));
    for shard in shards.iter().skip(rank).step_by(world.max(1)) {
        if share.lock().unwrap_or_else(|p| p.into_inner()).len() >= limit {
            break;
        }
        let sink = share.clone();
        let stats = read_shard(shard, s3_endpoint, retries, move |s| {
            let mut share = sink.lock().unwrap_or_else(|p| p.into_inner());
            match (s.image(), s.class_id()) {
                (Some((_, image)), Some(label)) if label >= 0 => share.samples.push(HeldSample {
                    image: image.clone(),
                    label,
                }),
                _ => share.unusable += 1,
            }
            let full = share.samples.len() >= limit;
            async move {
                if full {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }
        })
        .await
        .with_context(|| format!("reading the evaluation shard {shard}"))?;
        // What the reader itself skipped (no image member, a truncated tar, ...).
        share.lock().unwrap_or_else(|p| p.into_inner()).unusable += stats.bad.values().sum::<u64>();
    }
    // Every reader callback (each held a clone) has returned.
    let share = Arc::into_inner(share).context("an evaluation shard reader outlived its shard")?;
    Ok(share.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// A set's features over all ranks, on rank 0.
pub struct Embedded {
    /// `(n, dim)` float32 on the CPU, rank 0's rows first.
    pub features: Tensor,
    /// `(n,)` Int64.
    pub labels: Tensor,
    /// Samples left out over all ranks (no image, no label, undecodable).
    pub skipped: u64,
}

/// How a round turns images into features.
pub struct Embedder<'a> {
    pub model: &'a ContrastiveModel,
    pub augmenter: &'a mut Augmenter,
    pub image_size: i64,
    pub batch: usize,
    pub max_image_pixels: u64,
}

impl Embedder<'_> {
    /// The encoder features of `share` on every rank, gathered on rank 0 (None on the
    /// others). Every rank must call it with its share of the same set. A model with MoE
    /// blocks runs its forward passes in lock-step over the ranks (a rank whose share is done
    /// keeps taking part in the exchanges), as training does.
    pub fn embed(&mut self, share: &Share, coll: &dyn Collective) -> Result<Option<Embedded>> {
        let model = self.model;
        if let Some(rt) = model.moe() {
            // Evaluation routing (no jitter, no tape, no load counted).
            rt.begin_pass(Pass::default());
        }
        let mut rows: Vec<Tensor> = Vec::new();
        let mut labels: Vec<i64> = Vec::new();
        let mut undecodable = 0u64;
        let mut next = 0usize;
        loop {
            let (pixels, batch_labels, bad, used) = self.decode_batch(&share.samples[next..]);
            next += used;
            undecodable += bad;
            let local = batch_labels.len() as i64;
            if model.moe().is_some() {
                let counts = crate::dist::all_gather_counts(coll, local)?;
                if counts.iter().all(|&c| c == 0) {
                    break;
                }
            } else if local == 0 {
                break;
            }
            if local == 0 {
                model.moe_idle_encode();
                continue;
            }
            rows.push(model.encode_views(&pixels, self.image_size));
            labels.extend(batch_labels);
        }
        let local = match rows.is_empty() {
            true => None,
            false => Some(Tensor::cat(&rows, 0)),
        };
        gather_rows(
            coll,
            local,
            &labels,
            share.unusable + undecodable,
            model.device(),
        )
    }

    /// Decodes up to `batch` usable samples from the front of `samples`: their pixels, labels,
    /// how many were undecodable, and how many samples were consumed.
    fn decode_batch(&mut self, samples: &[HeldSample]) -> (Vec<f32>, Vec<i64>, u64, usize) {
        let view = self.augmenter.view_len();
        let mut pixels = Vec::with_capacity(view * self.batch.min(samples.len()));
        let (mut labels, mut bad, mut used) = (Vec::new(), 0u64, 0usize);
        let mut out = vec![0f32; view];
        for s in samples {
            if labels.len() == self.batch {
                break;
            }
            used += 1;
            if self
                .augmenter
                .eval_view_of(&s.image, self.max_image_pixels, &mut out)
            {
                pixels.extend_from_slice(&out);
                labels.push(s.label);
            } else {
                bad += 1;
            }
        }
        (pixels, labels, bad, used)
    }
}

/// Gathers every rank's `(rows, dim)` features with their labels on rank 0, in rank order.
/// The label travels as one more float32 column (exact below 2^24 classes), so one gather
/// moves both.
fn gather_rows(
    coll: &dyn Collective,
    local: Option<Tensor>,
    labels: &[i64],
    skipped: u64,
    device: Device,
) -> Result<Option<Embedded>> {
    let (n, dim) = local
        .as_ref()
        .map_or((0, 0), |t| (t.size()[0], t.size()[1]));
    let world = coll.world_size();
    let meta = coll.all_gather(
        &Tensor::from_slice(&[n, dim, skipped as i64]).view([1, 3]),
        &vec![1; world],
    )?;
    let meta = Vec::<i64>::try_from(meta.flatten(0, -1)).context("gathered row counts")?;
    let counts: Vec<i64> = meta.chunks(3).map(|m| m[0]).collect();
    let dim = meta.chunks(3).map(|m| m[1]).max().unwrap_or(0);
    let skipped: u64 = meta.chunks(3).map(|m| m[2].max(0) as u64).sum();
    let total: i64 = counts.iter().sum();
    let rows = if total == 0 {
        Tensor::zeros([0, dim + 1], (Kind::Float, Device::Cpu))
    } else {
        let with_labels = match local {
            Some(f) => {
                let l = Tensor::from_slice(labels)
                    .to_kind(Kind::Float)
                    .to_device(f.device())
                    .unsqueeze(1);
                Tensor::cat(&[f, l], 1)
            }
            None => Tensor::zeros([0, dim + 1], (Kind::Float, device)),
        };
        coll.all_gather(&with_labels.contiguous(), &counts)?
            .to_device(Device::Cpu)
    };
    if coll.rank() != 0 {
        return Ok(None);
    }
    Ok(Some(Embedded {
        features: rows.narrow(1, 0, dim),
        labels: rows.narrow(1, dim, 1).squeeze_dim(1).to_kind(Kind::Int64),
        skipped,
    }))
}

/// The held-out top-1/top-5 of `test` voted by `bank`, or why it could not vote. `k` shrinks
/// to the bank's size when the bank came out smaller than `eval.bank_samples`.
pub fn vote(bank: &Embedded, test: &Embedded, ev: &EvalConfig) -> Result<TopK, String> {
    let bank_rows = bank.features.size()[0];
    let train = Bank::new(
        "the evaluation bank",
        bank.features.shallow_clone(),
        Some(bank.labels.shallow_clone()),
    )
    .map_err(|e| e.to_string())?;
    let held_out = Bank::new(
        "the held-out set",
        test.features.shallow_clone(),
        Some(test.labels.shallow_clone()),
    )
    .map_err(|e| e.to_string())?;
    let options = KnnOptions {
        k: i64::from(ev.k).min(bank_rows),
        temperature: ev.temperature,
        metric: match ev.metric {
            KnnMetric::Cosine => Metric::Cosine,
            KnnMetric::Euclidean => Metric::Euclidean,
        },
        ..KnnOptions::default()
    };
    classify(&train, &held_out, options).map_err(|e| e.to_string())
}

/// The job's online evaluation: its shares (read at the first round) and, on rank 0, the
/// rounds so far.
pub struct OnlineEval {
    ev: EvalConfig,
    bank_url: String,
    s3_endpoint: String,
    retries: u32,
    image_size: u32,
    max_image_pixels: u64,
    augmenter: Augmenter,
    shares: Option<(Share, Share)>,
    history: Vec<EvalPoint>,
}

impl OnlineEval {
    pub fn new(cfg: &JobConfig) -> Self {
        OnlineEval {
            ev: cfg.eval.clone(),
            bank_url: cfg.eval.bank_url(&cfg.data.url).to_string(),
            s3_endpoint: cfg.data.s3_endpoint.clone(),
            retries: cfg.data.read_retries,
            image_size: cfg.data.image_size,
            max_image_pixels: cfg.data.max_image_pixels,
            augmenter: Augmenter::new(&cfg.data.augment, cfg.data.image_size),
            shares: None,
            history: Vec::new(),
        }
    }

    /// One round on every rank (they embed together); rank 0 returns the result, the other
    /// ranks None. A round that cannot vote is a result with `error` set, not an error:
    /// training goes on. Errors are for what stops the job (unreadable data, a collective).
    pub fn round(
        &mut self,
        rt: &tokio::runtime::Runtime,
        model: &ContrastiveModel,
        coll: &dyn Collective,
        epoch: u32,
        step: u64,
    ) -> Result<Option<EvalPoint>> {
        let started = Instant::now();
        let (rank, world) = (coll.rank(), coll.world_size());
        if self.shares.is_none() {
            let load = |url: &str, total: u64, what: &str| {
                rt.block_on(load_share(
                    url,
                    &self.s3_endpoint,
                    self.retries,
                    rank,
                    world,
                    total,
                ))
                .with_context(|| format!("reading the evaluation {what} ({url})"))
            };
            let bank = load(&self.bank_url, self.ev.bank_samples, "bank")?;
            let test = load(&self.ev.url, self.ev.test_samples, "held-out set")?;
            self.shares = Some((bank, test));
        }
        let (bank_share, test_share) = self.shares.as_ref().expect("loaded above");
        let mut embedder = Embedder {
            model,
            augmenter: &mut self.augmenter,
            image_size: i64::from(self.image_size),
            batch: self.ev.batch as usize,
            max_image_pixels: self.max_image_pixels,
        };
        let bank = embedder.embed(bank_share, coll)?;
        let test = embedder.embed(test_share, coll)?;
        let (Some(bank), Some(test)) = (bank, test) else {
            return Ok(None);
        };
        let voted = vote(&bank, &test, &self.ev);
        let point = EvalPoint {
            step,
            epoch,
            knn_top1: voted.as_ref().ok().map(|t| t.top1),
            knn_top5: voted.as_ref().ok().map(|t| t.top5),
            bank_samples: bank.features.size()[0] as u64,
            test_samples: test.features.size()[0] as u64,
            skipped: bank.skipped + test.skipped,
            seconds: started.elapsed().as_secs_f64(),
            error: voted.err().unwrap_or_default(),
        };
        self.history.push(point.clone());
        Ok(Some(point))
    }

    /// Rank 0, when training ends: the trained model's top-1 next to the first round's (the
    /// initial model with `at_start`), or None before two rounds voted.
    pub fn summary(&self) -> Option<String> {
        let (first, last) = voted_rounds(&self.history)?;
        if first.step == last.step {
            return None;
        }
        let initial = if first.step == 0 {
            "randomly initialised".to_string()
        } else {
            format!("at step {}", first.step)
        };
        Some(format!(
            "held-out kNN top-1: {:.2}% after {} steps vs {:.2}% {initial} (bank {}, test {})",
            100.0 * last.knn_top1.unwrap_or(0.0),
            last.step,
            100.0 * first.knn_top1.unwrap_or(0.0),
            last.bank_samples,
            last.test_samples
        ))
    }
}

/// `eval step 150: held-out kNN top-1 75.56% top-5 99.10% (bank 2048, test 1024, 3 skipped,
/// 4.2 s)`, or why the round did not vote.
pub fn round_line(p: &EvalPoint) -> String {
    let sets = format!(
        "bank {}, test {}, {} skipped, {:.1} s",
        p.bank_samples, p.test_samples, p.skipped, p.seconds
    );
    match (p.knn_top1, p.knn_top5) {
        (Some(t1), Some(t5)) => format!(
            "eval step {}: held-out kNN top-1 {:.2}% top-5 {:.2}% ({sets})",
            p.step,
            100.0 * t1,
            100.0 * t5
        ),
        _ => format!("eval step {}: not measured: {} ({sets})", p.step, p.error),
    }
}
