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
use crate::eval::{retrieval, zeroshot, Bank, TopK};
use crate::model::ContrastiveModel;
use crate::moe::Pass;

use super::caption_tokens;
use super::feed::CaptionTokens;

/// One labelled sample of a set, still encoded.
struct HeldSample {
    image: Bytes,
    label: i64,
    /// Its caption, for a CLIP job's zero-shot and retrieval rounds.
    caption: Option<String>,
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
                    caption: s.caption().and_then(|c| c.ok()).map(str::to_string),
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

/// What a round computes of each sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalView {
    /// The encoder's features of the image (kNN).
    Encoder,
    /// A CLIP model's joint-space image embedding and caption embedding side by side, for the
    /// samples that have a caption (zero-shot and retrieval).
    Joint,
}

/// How a round turns images into features.
pub struct Embedder<'a> {
    pub model: &'a ContrastiveModel,
    pub augmenter: &'a mut Augmenter,
    pub image_size: i64,
    pub batch: usize,
    pub max_image_pixels: u64,
    /// The caption tokenizer, needed for [`EvalView::Joint`].
    pub captions: Option<&'a CaptionTokens>,
}

/// One batch of a share, decoded.
struct DecodedBatch {
    pixels: Vec<f32>,
    labels: Vec<i64>,
    captions: Vec<String>,
    /// Samples whose image did not decode.
    bad: u64,
    /// Samples of the share consumed (taken, bad, or without the caption a joint view needs).
    used: usize,
}

impl Embedder<'_> {
    /// The `view` rows of `share` on every rank, gathered on rank 0 (None on the others).
    /// Every rank must call it with its share of the same set. A model with MoE blocks runs
    /// its forward passes in lock-step over the ranks (a rank whose share is done keeps taking
    /// part in the exchanges), as training does.
    pub fn embed(
        &mut self,
        share: &Share,
        coll: &dyn Collective,
        view: EvalView,
    ) -> Result<Option<Embedded>> {
        let model = self.model;
        let captions = match view {
            EvalView::Encoder => None,
            EvalView::Joint => Some(
                self.captions
                    .context("a joint-space evaluation needs the caption tokenizer")?,
            ),
        };
        if let Some(rt) = model.moe() {
            // Evaluation routing (no jitter, no tape, no load counted).
            rt.begin_pass(Pass::default());
        }
        let mut rows: Vec<Tensor> = Vec::new();
        let mut labels: Vec<i64> = Vec::new();
        let mut undecodable = 0u64;
        let mut next = 0usize;
        loop {
            let b = self.decode_batch(&share.samples[next..], view);
            next += b.used;
            undecodable += b.bad;
            let local = b.labels.len() as i64;
            if model.moe().is_some() {
                let counts = crate::dist::all_gather_counts(coll, local)?;
                if counts.iter().all(|&c| c == 0) {
                    break;
                }
            } else if local == 0 {
                break;
            }
            if local == 0 {
                match view {
                    EvalView::Encoder => model.moe_idle_encode(),
                    EvalView::Joint => model.moe_idle_pass(),
                }
                continue;
            }
            rows.push(match captions {
                None => model.encode_views(&b.pixels, self.image_size),
                Some(c) => {
                    let image = model.export_images(&b.pixels, self.image_size);
                    let texts: Vec<&str> = b.captions.iter().map(String::as_str).collect();
                    let ids = c
                        .tokenizer
                        .encode_batch(&texts, c.context_length)
                        .context("tokenizing held-out captions")?;
                    let text = model
                        .export_texts(&ids)
                        .context("a joint-space evaluation needs a text tower")?;
                    Tensor::cat(&[image, text], 1)
                }
            });
            labels.extend(b.labels);
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

    /// Decodes up to `batch` usable samples from the front of `samples`.
    fn decode_batch(&mut self, samples: &[HeldSample], view: EvalView) -> DecodedBatch {
        let size = self.augmenter.view_len();
        let mut b = DecodedBatch {
            pixels: Vec::with_capacity(size * self.batch.min(samples.len())),
            labels: Vec::new(),
            captions: Vec::new(),
            bad: 0,
            used: 0,
        };
        let mut out = vec![0f32; size];
        for s in samples {
            if b.labels.len() == self.batch {
                break;
            }
            b.used += 1;
            if view == EvalView::Joint && s.caption.is_none() {
                continue;
            }
            if self
                .augmenter
                .eval_view_of(&s.image, self.max_image_pixels, &mut out)
            {
                b.pixels.extend_from_slice(&out);
                b.labels.push(s.label);
                b.captions.extend(s.caption.clone());
            } else {
                b.bad += 1;
            }
        }
        b
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
    /// The job, for its caption tokenizer (read at the first CLIP round).
    job: JobConfig,
    captions: Option<CaptionTokens>,
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
            job: cfg.clone(),
            captions: None,
        }
    }

    /// One round on every rank (they embed together); rank 0 returns the result, the other
    /// ranks None. A round that cannot vote is a result with `error` set, not an error:
    /// training goes on. Errors are for what stops the job (unreadable data, a collective).
    /// A CLIP model's round also embeds the held-out image–caption pairs in the joint space
    /// for zero-shot (`eval.classes`) and retrieval (`eval.retrieval`).
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
        let clip = model.context_length().is_some();
        let (zeroshot, retrieval) = (self.ev.zeroshot(clip), self.ev.measures_retrieval(clip));
        if (zeroshot || retrieval) && self.captions.is_none() {
            self.captions = caption_tokens(rt, &self.job)?;
        }
        let (bank_share, test_share) = self.shares.as_ref().expect("loaded above");
        let mut embedder = Embedder {
            model,
            augmenter: &mut self.augmenter,
            image_size: i64::from(self.image_size),
            batch: self.ev.batch as usize,
            max_image_pixels: self.max_image_pixels,
            captions: self.captions.as_ref(),
        };
        let bank = embedder.embed(bank_share, coll, EvalView::Encoder)?;
        let test = embedder.embed(test_share, coll, EvalView::Encoder)?;
        let pairs = match zeroshot || retrieval {
            true => embedder.embed(test_share, coll, EvalView::Joint)?,
            false => None,
        };
        // Every rank embeds the prompts, so MoE text blocks find their peers.
        let classifier = match (zeroshot, self.captions.as_ref()) {
            (true, Some(c)) => Some(prompt_classifier(
                model,
                c,
                &self.ev.classes,
                &zeroshot::expand_templates(&self.ev.templates),
            )?),
            _ => None,
        };
        let (Some(bank), Some(test)) = (bank, test) else {
            return Ok(None);
        };
        let voted = vote(&bank, &test, &self.ev);
        let mut point = EvalPoint {
            step,
            epoch,
            knn_top1: voted.as_ref().ok().map(|t| t.top1),
            knn_top5: voted.as_ref().ok().map(|t| t.top5),
            bank_samples: bank.features.size()[0] as u64,
            test_samples: test.features.size()[0] as u64,
            skipped: bank.skipped + test.skipped,
            seconds: 0.0,
            error: voted.err().unwrap_or_default(),
            ..Default::default()
        };
        if let Some(pairs) = pairs {
            // A joint measurement that cannot be taken is logged; the kNN still counts.
            if let Err(e) = measure_joint(&mut point, &pairs, classifier.as_ref(), retrieval) {
                tracing::warn!(step, "zero-shot/retrieval not measured: {e}");
            }
        }
        point.seconds = started.elapsed().as_secs_f64();
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
        let mut line = format!(
            "held-out kNN top-1: {:.2}% after {} steps vs {:.2}% {initial} (bank {}, test {})",
            100.0 * last.knn_top1.unwrap_or(0.0),
            last.step,
            100.0 * first.knn_top1.unwrap_or(0.0),
            last.bank_samples,
            last.test_samples
        );
        if let (Some(a), Some(b)) = (last.zeroshot_top1, first.zeroshot_top1) {
            line += &format!("; zero-shot top-1 {:.2}% vs {:.2}%", 100.0 * a, 100.0 * b);
        }
        if let (Some(a), Some(b)) = (last.retrieval_mean_recall, first.retrieval_mean_recall) {
            line += &format!(
                "; retrieval mean recall {:.2}% vs {:.2}%",
                100.0 * a,
                100.0 * b
            );
        }
        Some(line)
    }
}

/// OpenCLIP's zero-shot classifier `(dim, classes)`, on the CPU: every class name put into
/// every template, through the model's text tower (`contrail eval zeroshot` and CLIP rounds).
pub fn prompt_classifier(
    model: &ContrastiveModel,
    captions: &CaptionTokens,
    classes: &[String],
    templates: &[String],
) -> Result<Tensor> {
    if let Some(rt) = model.moe() {
        rt.begin_pass(Pass::default());
    }
    let per_class = classes
        .iter()
        .map(|name| {
            let prompts = zeroshot::prompts(name, templates);
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let ids = captions
                .tokenizer
                .encode_batch(&refs, captions.context_length)
                .with_context(|| format!("tokenizing the zero-shot prompts of {name:?}"))?;
            model
                .export_texts(&ids)
                .context("zero-shot needs a text tower")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(zeroshot::classifier(&per_class)?.to_device(Device::Cpu))
}

/// Zero-shot and retrieval from the gathered `[image | caption]` rows (rank 0).
fn measure_joint(
    point: &mut EvalPoint,
    pairs: &Embedded,
    classifier: Option<&Tensor>,
    retrieval: bool,
) -> Result<()> {
    let width = pairs.features.size()[1] / 2;
    let images = Bank::new(
        "the held-out images",
        pairs.features.narrow(1, 0, width),
        Some(pairs.labels.shallow_clone()),
    )?;
    if let Some(w) = classifier {
        let acc = zeroshot::evaluate(&images, w)?;
        point.zeroshot_top1 = Some(acc.top1);
        point.zeroshot_top5 = Some(acc.top5);
    }
    if retrieval {
        let texts = Bank::new(
            "the held-out captions",
            pairs.features.narrow(1, width, width),
            None,
        )?;
        let r = retrieval::evaluate(&images, &texts, None)?;
        point.image_to_text_r1 = Some(r.image_to_text.recall[0]);
        point.text_to_image_r1 = Some(r.text_to_image.recall[0]);
        point.retrieval_mean_recall = Some(r.mean_recall);
    }
    Ok(())
}

/// `eval step 150: held-out kNN top-1 75.56% top-5 99.10% (bank 2048, test 1024, 3 skipped,
/// 4.2 s)`, or why the round did not vote.
pub fn round_line(p: &EvalPoint) -> String {
    let sets = format!(
        "bank {}, test {}, {} skipped, {:.1} s",
        p.bank_samples, p.test_samples, p.skipped, p.seconds
    );
    let mut clip = String::new();
    if let (Some(t1), Some(t5)) = (p.zeroshot_top1, p.zeroshot_top5) {
        clip += &format!(
            ", zero-shot top-1 {:.2}% top-5 {:.2}%",
            100.0 * t1,
            100.0 * t5
        );
    }
    if let (Some(i2t), Some(t2i), Some(mean)) = (
        p.image_to_text_r1,
        p.text_to_image_r1,
        p.retrieval_mean_recall,
    ) {
        clip += &format!(
            ", retrieval R@1 image→text {:.2}% text→image {:.2}% (mean recall {:.2}%)",
            100.0 * i2t,
            100.0 * t2i,
            100.0 * mean
        );
    }
    match (p.knn_top1, p.knn_top5) {
        (Some(t1), Some(t5)) => format!(
            "eval step {}: held-out kNN top-1 {:.2}% top-5 {:.2}%{clip} ({sets})",
            p.step,
            100.0 * t1,
            100.0 * t5
        ),
        _ => format!(
            "eval step {}: not measured: {}{clip} ({sets})",
            p.step, p.error
        ),
    }
}
