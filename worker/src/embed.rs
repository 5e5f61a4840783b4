//! Exporting image embeddings: a job's model (from its latest checkpoint, or freshly
//! initialised), every sample of a dataset's shards through the deterministic evaluation view
//! (`Augmenter::eval_view`) and the encoder (the features before the projector, what
//! downstream evaluation uses), written as an embedding folder in clip-retrieval's layout.
//!
//! This is the single-process form: one process reads every shard in order. Spreading a
//! dataset over the cluster's workers through the coordinator's leases, the text tower and the
//! Kubernetes job are not built yet.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use contrail_common::checkpoint::read_latest;
use contrail_common::storage::list_shards;
use contrail_common::JobConfig;
use contrail_data::augment::Augmenter;
use contrail_data::embeddings::{write_part, Matrix, Part, Record};
use contrail_data::shard_reader::read_shard;
use tch::Device;
use tokio::runtime::Runtime;

use crate::model::{BuildOptions, ContrastiveModel};
use crate::train::checkpoint::read_checkpoint;

/// What to embed and where the folder goes.
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Shards to embed (any `data.url` form).
    pub data: String,
    pub out: String,
    /// Images per forward pass.
    pub batch: usize,
    /// Rows per `img_emb_{i}.npy` part.
    pub part_rows: usize,
    pub device: Device,
}

/// What an export did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EmbedSummary {
    pub rows: usize,
    pub dim: usize,
    pub parts: usize,
    pub shards: usize,
    /// Samples without a decodable image, skipped.
    pub skipped: usize,
    /// The checkpoint directory loaded, if any.
    pub checkpoint: Option<String>,
}

/// The model of `cfg` on `device`, with the latest checkpoint under `base` loaded if given;
/// without one, freshly initialised (seeded by `train.seed`): the untrained baseline.
pub fn load_model(
    rt: &Runtime,
    cfg: &JobConfig,
    base: Option<&str>,
    device: Device,
) -> Result<(ContrastiveModel, Option<String>)> {
    tch::manual_seed(cfg.train.seed as i64);
    let mut model = ContrastiveModel::build(cfg, device, BuildOptions::default())?;
    let Some(base) = base else {
        return Ok((model, None));
    };
    let (dir, meta) = rt
        .block_on(read_latest(base, &cfg.data.s3_endpoint))?
        .with_context(|| format!("no checkpoint under {base} (no LATEST)"))?;
    let tensors = rt.block_on(read_checkpoint(&dir, &cfg.data.s3_endpoint))?;
    model
        .load_named(&tensors.model)
        .with_context(|| format!("loading {dir} into the job's model"))?;
    eprintln!("embed: loaded {dir} (step {})", meta.step);
    Ok((model, Some(dir)))
}

/// Embeds every sample of `options.data` with `model` and writes the folder.
pub fn write_embeddings(
    rt: &Runtime,
    cfg: &JobConfig,
    model: &ContrastiveModel,
    options: &EmbedOptions,
) -> Result<EmbedSummary> {
    if options.batch == 0 || options.part_rows == 0 {
        bail!("embed: batch and part size must be at least 1");
    }
    let s3 = &cfg.data.s3_endpoint;
    let shards = rt.block_on(list_shards(&options.data, s3))?;
    if shards.is_empty() {
        bail!("embed: no shards at {}", options.data);
    }
    let size = cfg.data.image_size;
    let mut augmenter = Augmenter::new(&cfg.data.augment, size);
    let view = augmenter.view_len();
    let mut summary = EmbedSummary {
        shards: shards.len(),
        ..Default::default()
    };
    let mut pending: Vec<(Record, Vec<f32>)> = Vec::new();
    let mut part_rows: Vec<f32> = Vec::new();
    let mut part_records: Vec<Record> = Vec::new();
    for (n, url) in shards.iter().enumerate() {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        rt.block_on(read_shard(url, s3, 3, move |s| {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            async { ControlFlow::Continue(()) }
        }))
        .with_context(|| format!("reading {url}"))?;
        let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
        for s in samples {
            let mut pixels = vec![0f32; view];
            let usable = s.image().is_some_and(|(_, bytes)| {
                augmenter.eval_view_of(bytes, cfg.data.max_image_pixels, &mut pixels)
            });
            if !usable {
                summary.skipped += 1;
                continue;
            }
            let record = Record {
                key: s.key.clone(),
                caption: s.caption().and_then(|c| c.ok()).map(str::to_string),
                label: s.class_id(),
            };
            pending.push((record, pixels));
            if pending.len() == options.batch {
                forward(
                    model,
                    &mut pending,
                    size,
                    &mut part_rows,
                    &mut part_records,
                    &mut summary,
                )?;
            }
        }
        forward(
            model,
            &mut pending,
            size,
            &mut part_rows,
            &mut part_records,
            &mut summary,
        )?;
        while part_records.len() >= options.part_rows {
            flush(
                rt,
                options,
                s3,
                &mut part_rows,
                &mut part_records,
                options.part_rows,
                &mut summary,
            )?;
        }
        eprintln!(
            "embed: {}/{} shards, {} rows, {} skipped",
            n + 1,
            shards.len(),
            summary.rows,
            summary.skipped
        );
    }
    let rest = part_records.len();
    if rest > 0 {
        flush(
            rt,
            options,
            s3,
            &mut part_rows,
            &mut part_records,
            rest,
            &mut summary,
        )?;
    }
    Ok(summary)
}

/// Runs the encoder over the pending images and appends their rows.
fn forward(
    model: &ContrastiveModel,
    pending: &mut Vec<(Record, Vec<f32>)>,
    size: u32,
    rows: &mut Vec<f32>,
    records: &mut Vec<Record>,
    summary: &mut EmbedSummary,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let flat: Vec<f32> = pending
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    let z = model
        .encode_views(&flat, i64::from(size))
        .to_device(Device::Cpu)
        .contiguous();
    summary.dim = z.size()[1] as usize;
    rows.extend(Vec::<f32>::try_from(z.flatten(0, -1)).context("embedding rows")?);
    records.extend(pending.drain(..).map(|(r, _)| r));
    Ok(())
}

/// Writes the first `n` buffered rows as the next part.
fn flush(
    rt: &Runtime,
    options: &EmbedOptions,
    s3_endpoint: &str,
    rows: &mut Vec<f32>,
    records: &mut Vec<Record>,
    n: usize,
    summary: &mut EmbedSummary,
) -> Result<()> {
    let dim = summary.dim;
    let m = Matrix::new(n, dim, rows.drain(..n * dim).collect())?;
    let recs: Vec<Record> = records.drain(..n).collect();
    let part = Part {
        index: summary.parts,
        image: Some(&m),
        text: None,
        records: &recs,
    };
    rt.block_on(write_part(&options.out, s3_endpoint, part))?;
    summary.parts += 1;
    summary.rows += n;
    Ok(())
}
