//! `contrail audit check`: reads a job's sample audit (`[audit] url`) and the dataset, and
//! says for each epoch whether every sample was trained exactly once (exit 0) or which were
//! repeated, missing or unknown (exit 1).

use anyhow::{Context, Result};
use contrail_common::audit::{check, read_all, EpochCheck, SampleRef};
use contrail_common::storage::list_shards;
use contrail_data::shard_reader::read_shard;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use tokio::runtime::Runtime;

/// Checks the audit under `audit` against the dataset `data`; Ok(true) when every epoch in
/// the audit trained every sample exactly once.
pub fn check_audit(
    rt: &Runtime,
    audit: &str,
    data: &str,
    s3_endpoint: &str,
    json: Option<&str>,
) -> Result<bool> {
    let records = rt
        .block_on(read_all(audit, s3_endpoint))
        .with_context(|| format!("reading the audit under {audit}"))?;
    if records.is_empty() {
        anyhow::bail!("no audit records under {audit} (was [audit] url set for the job?)");
    }
    let dataset = rt.block_on(dataset_samples(data, s3_endpoint))?;
    let checks = check(&records, &dataset);
    let steps: std::collections::BTreeSet<(u32, u64)> =
        records.iter().map(|r| (r.epoch, r.step)).collect();
    println!(
        "audit: {} records ({} steps, {} ranks) against {} samples of {data}",
        records.len(),
        steps.len(),
        records
            .iter()
            .map(|r| r.rank)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        dataset.len()
    );
    for c in &checks {
        println!("{}", describe(c));
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&checks)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(checks.iter().all(EpochCheck::exactly_once))
}

fn describe(c: &EpochCheck) -> String {
    if c.exactly_once() {
        return format!(
            "epoch {}: all {} samples trained exactly once",
            c.epoch, c.expected
        );
    }
    let list = |v: &[SampleRef]| {
        v.iter()
            .map(|s| format!("{}#{}", s.shard, s.key))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "epoch {}: {} of {} samples trained; {} repeated, {} missing, {} not in the dataset",
        c.epoch, c.trained, c.expected, c.repeated_total, c.missing_total, c.unknown_total
    );
    if !c.repeated.is_empty() {
        let r: Vec<String> = c
            .repeated
            .iter()
            .map(|(s, n)| format!("{}#{} ×{n}", s.shard, s.key))
            .collect();
        out += &format!("\n  repeated: {}", r.join(", "));
    }
    if !c.missing.is_empty() {
        out += &format!(
            "\n  missing (samples skipped as bad are missing too; /status counts them): {}",
            list(&c.missing)
        );
    }
    if !c.unknown.is_empty() {
        out += &format!("\n  not in the dataset: {}", list(&c.unknown));
    }
    out
}

/// Every sample of the dataset, named as the workers name them (shard URL as listed, key).
async fn dataset_samples(data: &str, s3_endpoint: &str) -> Result<Vec<SampleRef>> {
    let shards = list_shards(data, s3_endpoint)
        .await
        .with_context(|| format!("listing the dataset {data}"))?;
    if shards.is_empty() {
        anyhow::bail!("no shards at {data}");
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    for shard in shards {
        let sink = out.clone();
        let name = shard.clone();
        read_shard(&shard, s3_endpoint, 3, move |s| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(SampleRef {
                    shard: name.clone(),
                    key: s.key,
                });
            async { ControlFlow::Continue(()) }
        })
        .await
        .with_context(|| format!("reading {shard}"))?;
    }
    let samples = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(samples)
}
