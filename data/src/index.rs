//! `contrail data index`: a `dataset.json` for WebDataset shards contrail did not import
//! (LAION-style folders, shards written by webdataset's `ShardWriter`), so the learning-rate
//! schedule and the ETA know the epoch's length from step 0 instead of learning it as shards
//! finish (coordinator/src/manifest.rs reads the file). Every shard is read once, as a worker
//! reads it, and its good samples are counted: the count is what an epoch trains; bad samples
//! are counted apart by reason.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};

use crate::import::{write_manifest, DatasetManifest, SplitManifest};
use crate::shard_reader::read_shard;
use contrail_common::checkpoint::read_bytes;
use contrail_common::storage::list_shards;

/// What to index and how.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The split's name in `dataset.json` (default: the folder's last path segment).
    pub split: Option<String>,
    /// Replace an existing `dataset.json` (otherwise refused: it may be an import's, with
    /// class names and counts this index would lose).
    pub overwrite: bool,
    /// Shards read at once.
    pub parallel: usize,
    /// Consecutive failed reads tolerated per shard.
    pub retries: u32,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            split: None,
            overwrite: false,
            parallel: 8,
            retries: 3,
        }
    }
}

/// Counts the samples of every `.tar` shard under the folder `data` and writes
/// `data/dataset.json` with one split holding them; returns what it wrote.
pub async fn index_shards(
    data: &str,
    s3_endpoint: &str,
    options: &IndexOptions,
) -> Result<DatasetManifest> {
    let folder = data.trim_end_matches('/');
    if folder.ends_with(".tar") || folder.contains('{') {
        bail!(
            "data index: {data} is not a folder: dataset.json sits beside the shards it counts, \
             so give the folder that holds them"
        );
    }
    let manifest_url = format!("{folder}/dataset.json");
    if !options.overwrite && read_bytes(&manifest_url, s3_endpoint).await?.is_some() {
        bail!("data index: {manifest_url} exists; pass --overwrite to replace it");
    }
    let shards = list_shards(folder, s3_endpoint).await?;
    if shards.is_empty() {
        bail!("data index: no .tar shards under {folder}");
    }
    let split = match &options.split {
        Some(s) => s.clone(),
        None => folder
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty() && !s.contains(':'))
            .unwrap_or("train")
            .to_string(),
    };
    let started = Instant::now();
    let mut last_print = Instant::now();
    let total = shards.len();
    let (mut done, mut samples, mut bytes) = (0usize, 0u64, 0u64);
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut reads = futures::stream::iter(&shards)
        .map(|url| async move {
            read_shard(url, s3_endpoint, options.retries, |_| async {
                ControlFlow::Continue(())
            })
            .await
            .with_context(|| format!("data index: reading {url}"))
        })
        .buffer_unordered(options.parallel.max(1));
    while let Some(stats) = reads.try_next().await? {
        done += 1;
        samples += stats.samples;
        bytes += stats.bytes;
        for (reason, n) in stats.bad {
            *skipped.entry(reason).or_default() += n;
        }
        if done == total || last_print.elapsed().as_secs_f64() >= 2.0 {
            eprintln!(
                "index: {done}/{total} shards, {samples} samples ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
    }
    drop(reads);
    let manifest = DatasetManifest {
        format: "index".into(),
        source: folder.to_string(),
        classes: Vec::new(),
        caption_template: None,
        splits: BTreeMap::from([(
            split,
            SplitManifest {
                samples,
                shards,
                bytes,
                per_class: Vec::new(),
            },
        )]),
        skipped,
    };
    write_manifest(folder, s3_endpoint, &manifest).await?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::write_synth_dataset;
    use crate::tar_stream::TarBuilder;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("contrail-index-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn every_shard_is_counted_and_an_existing_manifest_is_kept() {
        let dir = temp_dir("count");
        let url = format!("file://{}/train", dir.display());
        let written = write_synth_dataset(&url, "", 50, 16, 16, 3).await.unwrap();
        // A shard with one sample lacking its image: counted apart, not as a sample.
        let mut bad = TarBuilder::new();
        bad.append("zz-0.cls", b"1");
        std::fs::write(dir.join("train/synth-zz.tar"), bad.finish()).unwrap();
        let options = IndexOptions {
            parallel: 3,
            ..Default::default()
        };
        let m = index_shards(&url, "", &options).await.unwrap();
        let split = &m.splits["train"];
        assert_eq!(split.samples, written.samples);
        assert_eq!(split.shards, list_shards(&url, "").await.unwrap());
        assert_eq!(split.shards.len(), written.shards as usize + 1);
        assert_eq!(m.skipped.values().sum::<u64>(), 1, "{:?}", m.skipped);
        let back = crate::import::read_manifest(&url, "").await.unwrap();
        assert_eq!(back, m);

        let e = index_shards(&url, "", &options).await.unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        let renamed = IndexOptions {
            split: Some("all".into()),
            overwrite: true,
            ..options
        };
        let m = index_shards(&url, "", &renamed).await.unwrap();
        assert_eq!(m.splits["all"].samples, written.samples);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_folder_without_shards_or_a_single_shard_is_refused() {
        let dir = temp_dir("empty");
        let url = format!("file://{}", dir.display());
        let e = index_shards(&url, "", &IndexOptions::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no .tar shards"), "{e}");
        let e = index_shards(&format!("{url}/a.tar"), "", &IndexOptions::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is not a folder"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
