//! The dataset's size before any shard is read: `contrail data import` writes `dataset.json`
//! beside its splits (`OUT/dataset.json`, `OUT/train/*.tar`), with each split's sample count
//! and shards. When one split's shards are exactly the listed ones, its count sizes the
//! learning-rate schedule and the ETA from step 0 (otherwise they are learned as shards
//! finish).

use contrail_common::checkpoint::read_bytes;
use std::collections::BTreeSet;

/// Samples in one epoch of `shards` (the listing of `data_url`), from a `dataset.json` in
/// `data_url` or its parent whose split has exactly those shards; None when there is none.
pub async fn samples_per_epoch(
    data_url: &str,
    s3_endpoint: &str,
    shards: &[String],
) -> Option<u64> {
    let base = data_url.trim_end_matches('/');
    let parent = base.rsplit_once('/').map(|(p, _)| p.to_string());
    let listed: BTreeSet<&str> = shards.iter().map(|s| file_name(s)).collect();
    for folder in std::iter::once(base.to_string()).chain(parent) {
        let url = format!("{folder}/dataset.json");
        let Ok(Some(bytes)) = read_bytes(&url, s3_endpoint).await else {
            continue;
        };
        match split_samples(&bytes, &listed) {
            Ok(Some(n)) => {
                tracing::info!(manifest = %url, samples = n, "dataset size from its manifest");
                return Some(n);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(manifest = %url, "not read: {e}"),
        }
    }
    None
}

fn file_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// The `samples` of the split of `dataset.json` whose shards are `listed` (by file name).
fn split_samples(bytes: &[u8], listed: &BTreeSet<&str>) -> Result<Option<u64>, String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let Some(splits) = doc.get("splits").and_then(|s| s.as_object()) else {
        return Err("no \"splits\" object".into());
    };
    for split in splits.values() {
        let shards: Option<BTreeSet<&str>> = split
            .get("shards")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|u| u.as_str()).map(file_name).collect());
        if shards.as_ref() == Some(listed) {
            return Ok(split.get("samples").and_then(|n| n.as_u64()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_split_whose_shards_are_listed_gives_the_count() {
        let dir = std::env::temp_dir().join(format!("contrail-manifest-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("train")).unwrap();
        let manifest = serde_json::json!({
            "format": "idx",
            "splits": {
                "train": {"samples": 2500, "shards": ["file:///x/train/train-000000.tar", "file:///x/train/train-000001.tar"]},
                "test": {"samples": 400, "shards": ["file:///x/test/test-000000.tar"]},
            }
        });
        std::fs::write(dir.join("dataset.json"), manifest.to_string()).unwrap();
        let url = format!("file://{}/train", dir.display());
        let listed = |names: &[&str]| -> Vec<String> {
            names.iter().map(|n| format!("{url}/{n}")).collect()
        };
        let both = listed(&["train-000000.tar", "train-000001.tar"]);
        assert_eq!(samples_per_epoch(&url, "", &both).await, Some(2500));
        // Another listing (a shard missing) matches no split.
        let one = listed(&["train-000000.tar"]);
        assert_eq!(samples_per_epoch(&url, "", &one).await, None);
        // No manifest at all.
        let elsewhere = format!("file://{}/none/train", dir.display());
        assert_eq!(samples_per_epoch(&elsewhere, "", &both).await, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
