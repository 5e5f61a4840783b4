//! One shard of a dataset → one part of an embedding folder. Part `i` holds shard `i` of the
//! dataset's listing, so a part is written by whichever process embeds that shard, a shard
//! embedded twice (a lease that expired and was handed out again) writes the same part again,
//! and one process or many write the same folder.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use contrail_common::JobConfig;
use contrail_data::augment::Augmenter;
use contrail_data::embeddings::{write_part, Matrix, Part, Record};
use contrail_data::sample::Sample;
use contrail_data::shard_reader::read_shard;
use rayon::prelude::*;
use tch::{Device, Tensor};
use tokio::runtime::Handle;

use super::EmbedOptions;
use crate::model::ContrastiveModel;
use crate::process::feed::CaptionTokens;

/// Why a sample was left out of the export, in the shard reader's words (`missing_image`,
/// `truncated_tar`, ... are counted by the reader itself).
pub const CORRUPT_IMAGE: &str = "corrupt_image";
pub const MISSING_CAPTION: &str = "missing_caption";

/// What exporting one shard did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardExport {
    pub rows: usize,
    /// Samples left out, by reason (the shard reader's own reasons included).
    pub skipped: BTreeMap<String, u64>,
    /// Where the time went.
    pub phases: Phases,
}

/// Seconds spent in each phase of an export (summed over shards), to tell what bounds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Phases {
    /// Fetching and parsing the shard's tar.
    pub read: f64,
    /// Decoding images, evaluation views, captions.
    pub decode: f64,
    /// The towers' forward passes, until the rows are back on the host.
    pub embed: f64,
    /// Writing the part (`.npy` + Parquet).
    pub write: f64,
}

impl Phases {
    pub fn add(&mut self, other: &Phases) {
        self.read += other.read;
        self.decode += other.decode;
        self.embed += other.embed;
        self.write += other.write;
    }

    /// "read 1.2 s, decode 0.3 s, embed 4.5 s, write 0.6 s"
    pub fn describe(&self) -> String {
        format!(
            "read {:.2} s, decode {:.2} s, embed {:.2} s, write {:.2} s",
            self.read, self.decode, self.embed, self.write
        )
    }
}

/// Embeds shards with one model: the image tower through the evaluation view, the text tower
/// on the caption tokens.
pub struct ShardExporter<'a> {
    model: &'a ContrastiveModel,
    cfg: &'a JobConfig,
    options: &'a EmbedOptions,
    augmenter: Augmenter,
    captions: Option<CaptionTokens>,
    /// Widths of the image and caption rows, for the `0 × dim` part of a shard with no usable
    /// sample (so every part of a folder agrees).
    image_dim: usize,
    text_dim: usize,
}

/// The rows of one batch, before they are stacked into a part.
struct Batch {
    records: Vec<Record>,
    pixels: Vec<f32>,
    captions: Vec<String>,
}

impl<'a> ShardExporter<'a> {
    /// `captions` must be given when the tower includes text (a CLIP model's tokenizer).
    pub fn new(
        model: &'a ContrastiveModel,
        cfg: &'a JobConfig,
        options: &'a EmbedOptions,
        captions: Option<CaptionTokens>,
    ) -> Result<Self> {
        if options.batch == 0 {
            anyhow::bail!("embed: the batch must be at least 1 sample");
        }
        if options.tower.text() && (captions.is_none() || model.context_length().is_none()) {
            anyhow::bail!(
                "embed: --tower {} needs a text tower, and objective.kind = {} has none (only clip)",
                options.tower.as_str(),
                cfg.objective.kind.as_str()
            );
        }
        if model.device().is_cuda() {
            // On a GPU libtorch's CPU work is host copies, but after each one its OpenMP
            // threads spin on every core and starve the image decoding (on an H200 host with
            // 16 cores: decoding 60,000 images took 1.38 s with them, 0.48 s without).
            tch::set_num_threads(1);
        }
        let augmenter = Augmenter::new(&cfg.data.augment, cfg.data.image_size);
        // One blank view tells the image width, whatever the encoder and head.
        let blank = vec![0f32; augmenter.view_len()];
        let image_dim = model
            .export_images(&blank, i64::from(cfg.data.image_size))
            .size()[1] as usize;
        Ok(Self {
            model,
            cfg,
            options,
            augmenter,
            captions,
            image_dim,
            text_dim: model.embedding_dim() as usize,
        })
    }

    /// Embeds every usable sample of the shard at `url` and writes them as part `index`
    /// (an empty part when none is usable, so every shard has its part).
    pub fn export(&mut self, rt: &Handle, index: usize, url: &str) -> Result<ShardExport> {
        let s3 = &self.cfg.data.s3_endpoint;
        let mut clock = Instant::now();
        let mut lap = || {
            let now = Instant::now();
            let seconds = (now - clock).as_secs_f64();
            clock = now;
            seconds
        };
        let mut phases = Phases::default();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let stats = rt
            .block_on(read_shard(url, s3, 3, move |s| {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                async { ControlFlow::Continue(()) }
            }))
            .with_context(|| format!("reading {url}"))?;
        let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
        phases.read += lap();
        let mut done = ShardExport {
            skipped: stats.bad.clone(),
            ..Default::default()
        };
        let (mut images, mut texts, mut records) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in samples.chunks(self.options.batch) {
            let batch = self.prepare(chunk, &mut done.skipped);
            phases.decode += lap();
            if batch.records.is_empty() {
                continue;
            }
            if self.options.tower.image() {
                images.push(self.model.export_images(&batch.pixels, self.view_size()));
            }
            if let Some(c) = self.captions.as_ref().filter(|_| self.options.tower.text()) {
                let refs: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
                let ids = c
                    .tokenizer
                    .encode_batch(&refs, c.context_length)
                    .with_context(|| format!("tokenizing the captions of {url}"))?;
                texts.push(
                    self.model
                        .export_texts(&ids)
                        .context("the model has no text tower")?,
                );
            }
            records.extend(batch.records);
            phases.embed += lap();
        }
        let image = stack(&images, records.len(), self.image_dim)?;
        let text = stack(&texts, records.len(), self.text_dim)?;
        phases.embed += lap();
        let part = Part {
            index,
            image: self.options.tower.image().then_some(&image),
            text: self.options.tower.text().then_some(&text),
            records: &records,
        };
        rt.block_on(write_part(&self.options.out, s3, part))
            .with_context(|| format!("writing part {index} (shard {url})"))?;
        phases.write += lap();
        done.rows = records.len();
        done.phases = phases;
        Ok(done)
    }

    fn view_size(&self) -> i64 {
        i64::from(self.cfg.data.image_size)
    }

    /// The usable samples of `chunk`: evaluation views and captions, as the tower needs them.
    /// Images decode on all cores (one augmenter per rayon thread): with a GPU, decoding
    /// one at a time was the whole export's bottleneck.
    fn prepare(&self, chunk: &[Sample], skipped: &mut BTreeMap<String, u64>) -> Batch {
        let view = self.augmenter.view_len();
        let want_image = self.options.tower.image();
        let mut pixels = vec![0f32; if want_image { chunk.len() * view } else { 0 }];
        let decoded: Vec<bool> = if want_image {
            let (augment, size) = (&self.cfg.data.augment, self.cfg.data.image_size);
            let max_pixels = self.cfg.data.max_image_pixels;
            pixels
                .par_chunks_mut(view)
                .zip(chunk.par_iter())
                .map_init(
                    || Augmenter::new(augment, size),
                    |aug, (out, s)| {
                        s.image()
                            .is_some_and(|(_, bytes)| aug.eval_view_of(bytes, max_pixels, out))
                    },
                )
                .collect()
        } else {
            vec![true; chunk.len()]
        };
        let mut batch = Batch {
            records: Vec::with_capacity(chunk.len()),
            pixels: Vec::with_capacity(pixels.len()),
            captions: Vec::new(),
        };
        for (i, s) in chunk.iter().enumerate() {
            let caption = s.caption().and_then(|c| c.ok()).map(str::to_string);
            if self.options.tower.text() && caption.is_none() {
                *skipped.entry(MISSING_CAPTION.into()).or_default() += 1;
                continue;
            }
            if !decoded[i] {
                *skipped.entry(CORRUPT_IMAGE.into()).or_default() += 1;
                continue;
            }
            if want_image {
                batch
                    .pixels
                    .extend_from_slice(&pixels[i * view..(i + 1) * view]);
            }
            if self.options.tower.text() {
                batch.captions.extend(caption.clone());
            }
            batch.records.push(Record {
                key: s.key.clone(),
                caption,
                label: s.class_id(),
            });
        }
        batch
    }
}

/// The rows of every batch as one matrix; `0 × dim` for a shard with no usable sample.
fn stack(batches: &[Tensor], rows: usize, dim: usize) -> Result<Matrix> {
    if batches.is_empty() {
        return Matrix::new(0, dim, Vec::new());
    }
    let z = Tensor::cat(batches, 0).to_device(Device::Cpu).contiguous();
    let dim = z.size()[1] as usize;
    let data = Vec::<f32>::try_from(z.flatten(0, -1)).context("embedding rows")?;
    Matrix::new(rows, dim, data)
}
