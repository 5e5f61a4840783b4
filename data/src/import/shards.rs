//! Writing imported samples as WebDataset shards: `OUT/<split>/<split>-{i:06}.tar`, each
//! written whole with one object-store put, so a shard that exists is complete. The dataset's
//! `dataset.json` (what [`super::DatasetManifest`] holds) is written after every shard.

use anyhow::{Context, Result};
use object_store::PutPayload;

use super::SplitManifest;
use crate::tar_stream::TarBuilder;
use contrail_common::storage::resolve;

/// One sample's members, e.g. `[("png", ...), ("cls", b"3"), ("txt", b"a photo of a coat.")]`.
pub struct ImportedSample {
    pub key: String,
    pub members: Vec<(&'static str, Vec<u8>)>,
    /// Class index, counted per class in the manifest.
    pub label: Option<usize>,
}

/// Collects one split's samples into shards of `shard_size` and puts each when full.
pub struct ShardWriter {
    base: String,
    split: String,
    s3_endpoint: String,
    shard_size: usize,
    tar: TarBuilder,
    in_shard: usize,
    pub shards: Vec<String>,
    pub samples: u64,
    pub bytes: u64,
    pub per_class: Vec<u64>,
}

impl ShardWriter {
    pub fn new(out_url: &str, split: &str, s3_endpoint: &str, shard_size: usize) -> ShardWriter {
        ShardWriter {
            base: out_url.trim_end_matches('/').to_string(),
            split: split.to_string(),
            s3_endpoint: s3_endpoint.to_string(),
            shard_size: shard_size.max(1),
            tar: TarBuilder::new(),
            in_shard: 0,
            shards: Vec::new(),
            samples: 0,
            bytes: 0,
            per_class: Vec::new(),
        }
    }

    pub async fn push(&mut self, sample: ImportedSample) -> Result<()> {
        for (ext, data) in &sample.members {
            self.tar.append(&format!("{}.{ext}", sample.key), data);
        }
        if let Some(c) = sample.label {
            if self.per_class.len() <= c {
                self.per_class.resize(c + 1, 0);
            }
            self.per_class[c] += 1;
        }
        self.in_shard += 1;
        self.samples += 1;
        if self.in_shard == self.shard_size {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.in_shard == 0 {
            return Ok(());
        }
        let data = std::mem::take(&mut self.tar).finish();
        let url = format!(
            "{}/{}/{}-{:06}.tar",
            self.base,
            self.split,
            self.split,
            self.shards.len()
        );
        let loc = resolve(&url, &self.s3_endpoint)?;
        self.bytes += data.len() as u64;
        loc.store
            .put(&loc.path, PutPayload::from(data))
            .await
            .with_context(|| format!("writing shard {}", loc.url))?;
        self.shards.push(loc.url);
        self.in_shard = 0;
        Ok(())
    }

    /// This split's entry in the manifest, with a count for each of `classes` classes.
    pub fn manifest(&self, classes: usize) -> SplitManifest {
        let mut per_class = self.per_class.clone();
        per_class.resize(classes.max(per_class.len()), 0);
        SplitManifest {
            samples: self.samples,
            shards: self.shards.clone(),
            bytes: self.bytes,
            per_class,
        }
    }

    /// Puts the last, partial shard.
    pub async fn finish(&mut self) -> Result<()> {
        self.flush().await
    }
}
