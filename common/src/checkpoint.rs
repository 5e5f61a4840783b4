//! Checkpoint layout, shared by the workers (which write it) and the coordinator (which reads
//! the shard state back on resume).
//!
//! ```text
//! {checkpoint.url}/LATEST                       name of the newest complete checkpoint
//! {checkpoint.url}/step-00000100/model.safetensors
//! {checkpoint.url}/step-00000100/optim.safetensors
//! {checkpoint.url}/step-00000100/meta.json      CheckpointMeta
//! ```
//! `LATEST` is written last, so a crash while writing leaves the previous checkpoint in force.

use crate::shards::ShardStateSnapshot;
use crate::storage::resolve;
use anyhow::{Context, Result};
use object_store::PutPayload;
use serde::{Deserialize, Serialize};

pub const LATEST: &str = "LATEST";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: u64,
    pub epoch: u32,
    pub world_size: u32,
    pub shard_state: ShardStateSnapshot,
    /// The job file the run was started with (TOML).
    pub config_toml: String,
    pub created_unix_ms: u64,
    /// The run that wrote it (`JobToken::run_id`; "" before contrail recorded it), so a job
    /// can tell its own checkpoints from an earlier run's.
    #[serde(default)]
    pub run: String,
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub fn join_url(base: &str, name: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), name)
}

pub async fn read_bytes(url: &str, s3_endpoint: &str) -> Result<Option<bytes::Bytes>> {
    let loc = resolve(url, s3_endpoint)?;
    match loc.store.get(&loc.path).await {
        Ok(r) => Ok(Some(
            r.bytes().await.with_context(|| format!("reading {url}"))?,
        )),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {url}")),
    }
}

pub async fn write_bytes(url: &str, s3_endpoint: &str, data: Vec<u8>) -> Result<()> {
    let loc = resolve(url, s3_endpoint)?;
    loc.store
        .put(&loc.path, PutPayload::from(data))
        .await
        .with_context(|| format!("writing {url}"))?;
    Ok(())
}

/// Deletes the object at `url`; one that is not there is not an error.
pub async fn delete_object(url: &str, s3_endpoint: &str) -> Result<()> {
    let loc = resolve(url, s3_endpoint)?;
    match loc.store.delete(&loc.path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {url}")),
    }
}

/// The newest complete checkpoint under `base`: its directory URL and metadata.
pub async fn read_latest(
    base: &str,
    s3_endpoint: &str,
) -> Result<Option<(String, CheckpointMeta)>> {
    if base.is_empty() {
        return Ok(None);
    }
    let Some(name) = read_bytes(&join_url(base, LATEST), s3_endpoint).await? else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(&name).trim().to_string();
    let dir = join_url(base, &name);
    let meta_url = join_url(&dir, "meta.json");
    let meta = read_bytes(&meta_url, s3_endpoint)
        .await?
        .with_context(|| format!("{LATEST} names {name} but {meta_url} is missing"))?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&meta).with_context(|| format!("parsing {meta_url}"))?;
    Ok(Some((dir, meta)))
}
