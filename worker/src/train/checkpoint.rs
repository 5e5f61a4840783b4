//! Writing and reading checkpoints (layout in `contrail_common::checkpoint`).
//!
//! Tensors go through safetensors with PyTorch-style names, so the model file loads with
//! `safetensors.torch.load_file` and then `load_state_dict`. Rank 0 writes: every rank holds
//! identical parameters after each step. Files are staged in a local temporary directory and
//! uploaded whole, since safetensors needs the full header before the data.

use anyhow::{Context, Result};
use contrail_common::checkpoint::{
    join_url, read_bytes, step_dir_name, write_bytes, CheckpointMeta, LATEST,
};
use tch::Tensor;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const META_FILE: &str = "meta.json";

fn staging_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "contrail-{}-{}-{name}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ))
}

pub fn tensors_to_safetensors(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let path = staging_file("out.safetensors");
    // safetensors wants contiguous CPU tensors.
    let cpu: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&cpu, &path).context("serializing tensors to safetensors")?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading back {}", path.display()));
    let _ = std::fs::remove_file(&path);
    bytes
}

pub fn safetensors_to_tensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let path = staging_file("in.safetensors");
    std::fs::write(&path, bytes).with_context(|| format!("staging {}", path.display()))?;
    let out = Tensor::read_safetensors(&path).context("parsing safetensors");
    let _ = std::fs::remove_file(&path);
    out
}

/// Everything a checkpoint holds besides its metadata.
pub struct CheckpointTensors {
    pub model: Vec<(String, Tensor)>,
    pub optim: Vec<(String, Tensor)>,
}

/// Writes `step-NNNNNNNN/{model,optim}.safetensors` and `meta.json`, then points `LATEST` at
/// it, then deletes checkpoints beyond the newest `keep`. Returns the directory URL.
pub async fn write_checkpoint(
    base: &str,
    s3_endpoint: &str,
    keep: u32,
    meta: &CheckpointMeta,
    model_bytes: Vec<u8>,
    optim_bytes: Vec<u8>,
) -> Result<String> {
    let name = step_dir_name(meta.step);
    let dir = join_url(base, &name);
    write_bytes(&join_url(&dir, MODEL_FILE), s3_endpoint, model_bytes).await?;
    write_bytes(&join_url(&dir, OPTIM_FILE), s3_endpoint, optim_bytes).await?;
    let meta_json = serde_json::to_vec_pretty(meta).context("encoding checkpoint metadata")?;
    write_bytes(&join_url(&dir, META_FILE), s3_endpoint, meta_json).await?;
    write_bytes(&join_url(base, LATEST), s3_endpoint, name.into_bytes()).await?;
    prune(base, s3_endpoint, keep)
        .await
        .with_context(|| format!("deleting old checkpoints under {base}"))?;
    Ok(dir)
}

/// Deletes `step-*` directories other than the newest `keep`.
async fn prune(base: &str, s3_endpoint: &str, keep: u32) -> Result<()> {
    use futures::TryStreamExt;
    let loc = contrail_common::storage::resolve(base, s3_endpoint)?;
    let objects: Vec<_> = loc.store.list(Some(&loc.path)).try_collect().await?;
    let mut steps: Vec<String> = objects
        .iter()
        .filter_map(|m| {
            let rel = m.location.as_ref().strip_prefix(loc.path.as_ref())?;
            let dir = rel.trim_start_matches('/').split('/').next()?;
            dir.starts_with("step-").then(|| dir.to_string())
        })
        .collect();
    steps.sort();
    steps.dedup();
    let stale = steps.len().saturating_sub(keep as usize);
    for dir in &steps[..stale] {
        for m in objects.iter().filter(|m| {
            m.location
                .as_ref()
                .strip_prefix(loc.path.as_ref())
                .map(|r| r.trim_start_matches('/').starts_with(&format!("{dir}/")))
                .unwrap_or(false)
        }) {
            loc.store.delete(&m.location).await?;
        }
        // Object stores have no directories, but a local one leaves an empty folder behind.
        if let Some(local) = base.strip_prefix("file://") {
            let _ = std::fs::remove_dir(std::path::Path::new(local).join(dir));
        }
    }
    Ok(())
}

/// Reads the tensors of the checkpoint in directory `dir`.
pub async fn read_checkpoint(dir: &str, s3_endpoint: &str) -> Result<CheckpointTensors> {
    let model_url = join_url(dir, MODEL_FILE);
    let optim_url = join_url(dir, OPTIM_FILE);
    let model = read_bytes(&model_url, s3_endpoint)
        .await?
        .with_context(|| format!("checkpoint file {model_url} is missing"))?;
    let optim = read_bytes(&optim_url, s3_endpoint)
        .await?
        .with_context(|| format!("checkpoint file {optim_url} is missing"))?;
    Ok(CheckpointTensors {
        model: safetensors_to_tensors(&model).with_context(|| format!("loading {model_url}"))?,
        optim: safetensors_to_tensors(&optim).with_context(|| format!("loading {optim_url}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use contrail_common::shards::ShardStateSnapshot;

    #[tokio::test]
    async fn round_trip_and_prune() {
        let dir = std::env::temp_dir().join(format!("contrail-ckpt-test-{}", std::process::id()));
        let base = format!("file://{}", dir.display());
        for step in [10u64, 20, 30] {
            let meta = CheckpointMeta {
                step,
                epoch: 1,
                world_size: 2,
                shard_state: ShardStateSnapshot::default(),
                config_toml: String::new(),
                created_unix_ms: 0,
                run: String::new(),
            };
            let w = Tensor::from_slice(&[step as f32, 2.0, 3.0]).view([3, 1]);
            let model = tensors_to_safetensors(&[("fc.weight".to_string(), w)]).unwrap();
            let optim = tensors_to_safetensors(&[(
                "momentum.fc.weight".to_string(),
                Tensor::zeros([3, 1], (tch::Kind::Float, tch::Device::Cpu)),
            )])
            .unwrap();
            write_checkpoint(&base, "", 2, &meta, model, optim)
                .await
                .unwrap();
        }
        let (latest_dir, meta) = contrail_common::checkpoint::read_latest(&base, "")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(meta.step, 30);
        let t = read_checkpoint(&latest_dir, "").await.unwrap();
        assert_eq!(t.model[0].0, "fc.weight");
        assert_eq!(
            Vec::<f32>::try_from(&t.model[0].1.flatten(0, -1)).unwrap(),
            vec![30.0, 2.0, 3.0]
        );
        assert!(
            !dir.join("step-00000010").join(MODEL_FILE).exists(),
            "oldest checkpoint must be pruned"
        );
        assert!(!dir.join("step-00000010").exists(), "its empty folder too");
        assert!(dir.join("step-00000020").join(MODEL_FILE).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
