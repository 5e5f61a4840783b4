//! Exporting embeddings: a job's model (from its latest checkpoint, or freshly initialised)
//! over every sample of a dataset's shards, written as an embedding folder in clip-retrieval's
//! layout (`img_emb/`, `text_emb/`, `metadata/`).
//!
//! - Images go through the deterministic evaluation view (`Augmenter::eval_view`). A CLIP
//!   model exports its joint image–text embeddings (what zero-shot and retrieval compare);
//!   other models export the encoder's features before the projector (what kNN and linear
//!   probes use).
//! - Captions (`--tower text|both`, CLIP only) go through the job's tokenizer and text tower.
//! - Part `i` of the folder is shard `i` of the dataset's listing ([`shard`]), so one process
//!   ([`write_embeddings`]) and many sharing the work through the coordinator's leases
//!   ([`leased`]) write the same folder, each sample exactly once.

pub mod leased;
pub mod shard;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use contrail_common::checkpoint::read_latest;
use contrail_common::storage::list_shards;
use contrail_common::JobConfig;
use tch::Device;
use tokio::runtime::Runtime;

use crate::model::{BuildOptions, ContrastiveModel};
use crate::process::caption_tokens;
use crate::train::checkpoint::read_checkpoint;
pub use shard::{ShardExport, ShardExporter};

/// Which towers an export writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmbedTower {
    #[default]
    Image,
    Text,
    Both,
}

impl EmbedTower {
    pub fn image(self) -> bool {
        self != EmbedTower::Text
    }

    pub fn text(self) -> bool {
        self != EmbedTower::Image
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EmbedTower::Image => "image",
            EmbedTower::Text => "text",
            EmbedTower::Both => "both",
        }
    }
}

impl std::str::FromStr for EmbedTower {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "image" => Ok(EmbedTower::Image),
            "text" => Ok(EmbedTower::Text),
            "both" => Ok(EmbedTower::Both),
            other => Err(format!("tower {other:?} must be image, text or both")),
        }
    }
}

/// What to embed and where the folder goes.
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Shards to embed (any `data.url` form).
    pub data: String,
    pub out: String,
    /// Samples per forward pass.
    pub batch: usize,
    pub tower: EmbedTower,
    pub device: Device,
}

/// What an export did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EmbedSummary {
    pub rows: usize,
    /// Parts written (one per shard embedded).
    pub parts: usize,
    /// Shards in the dataset.
    pub shards: usize,
    /// Samples left out, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// The checkpoint directory loaded, if any.
    pub checkpoint: Option<String>,
    /// Where the time went, over all shards.
    pub phases: shard::Phases,
}

impl EmbedSummary {
    pub fn add(&mut self, shard: &ShardExport) {
        self.rows += shard.rows;
        self.parts += 1;
        self.phases.add(&shard.phases);
        for (reason, n) in &shard.skipped {
            *self.skipped.entry(reason.clone()).or_default() += n;
        }
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// The checkpoint base an export loads: `checkpoint` (`--checkpoint`), else the job's
/// `checkpoint.url`; None with `random_init` (the untrained baseline). `what` names the command
/// in the error.
pub fn checkpoint_base(
    checkpoint: Option<&str>,
    random_init: bool,
    cfg: &JobConfig,
    what: &str,
) -> Result<Option<String>> {
    if random_init {
        return Ok(None);
    }
    let base = checkpoint.unwrap_or(&cfg.checkpoint.url);
    if base.is_empty() {
        anyhow::bail!(
            "{what}: no checkpoint (give --checkpoint, set checkpoint.url, or --random-init)"
        );
    }
    Ok(Some(base.to_string()))
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
    let captions = caption_tokens(rt, cfg)?;
    let opts = BuildOptions {
        tokenizer: captions.as_ref().map(|c| c.tokenizer.as_ref()),
        ..Default::default()
    };
    let mut model = ContrastiveModel::build(cfg, device, opts)?;
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

/// Embeds every shard of `options.data` in this process, in listing order, and writes the
/// folder; one progress line per shard on stderr.
pub fn write_embeddings(
    rt: &Runtime,
    cfg: &JobConfig,
    model: &ContrastiveModel,
    options: &EmbedOptions,
) -> Result<EmbedSummary> {
    let shards = rt.block_on(list_shards(&options.data, &cfg.data.s3_endpoint))?;
    if shards.is_empty() {
        anyhow::bail!("embed: no shards at {}", options.data);
    }
    let mut exporter = ShardExporter::new(model, cfg, options, caption_tokens(rt, cfg)?)?;
    let mut summary = EmbedSummary {
        shards: shards.len(),
        ..Default::default()
    };
    for (index, url) in shards.iter().enumerate() {
        let done = exporter.export(rt.handle(), index, url)?;
        summary.add(&done);
        eprintln!(
            "embed: {}/{} shards, {} rows, {} skipped",
            index + 1,
            shards.len(),
            summary.rows,
            summary.skipped_total()
        );
    }
    Ok(summary)
}
