//! The worker's side of the sample audit (`[audit]`, `contrail_common::audit`): before each
//! step, what this rank is about to train; written as a new part every
//! `audit.flush_every_steps` steps and when training stops. A step that then fails to commit
//! is cancelled by the commit point the survivors write when they regroup.

use anyhow::{Context, Result};
use contrail_common::audit::{
    commit_point_url, encode, part_url, AuditRecord, CommitPoint, SampleRef,
};
use contrail_common::auth::{hex, random_bytes};
use contrail_common::checkpoint::write_bytes;
use contrail_common::JobConfig;

pub struct AuditLog {
    url: String,
    s3_endpoint: String,
    rank: u32,
    generation: u64,
    /// This process's name in part names (generation + random), so no part is overwritten.
    writer: String,
    every: u64,
    pending: Vec<AuditRecord>,
    seq: u64,
}

impl AuditLog {
    /// None when the job has no `[audit] url`.
    pub fn new(cfg: &JobConfig, rank: usize, generation: u64) -> Result<Option<Self>> {
        if !cfg.audit.enabled() {
            return Ok(None);
        }
        let id: [u8; 4] = random_bytes().context("naming this worker's audit parts")?;
        Ok(Some(Self {
            url: cfg.audit.url.clone(),
            s3_endpoint: cfg.data.s3_endpoint.clone(),
            rank: rank as u32,
            generation,
            writer: format!("g{generation}-{}", hex(&id)),
            every: cfg.audit.flush_every_steps.max(1),
            pending: Vec::new(),
            seq: 0,
        }))
    }

    /// A regroup gave this process a new rank and generation; later records carry them
    /// (parts keep the writer's name, so none is overwritten).
    pub fn set_membership(&mut self, rank: usize, generation: u64) {
        self.rank = rank as u32;
        self.generation = generation;
    }

    /// Notes step `step` about to train `samples`; writes a part when `flush_every_steps`
    /// have gathered.
    pub fn record(
        &mut self,
        rt: &tokio::runtime::Runtime,
        epoch: u32,
        step: u64,
        samples: &[SampleRef],
    ) -> Result<()> {
        self.pending.push(AuditRecord {
            epoch,
            step,
            rank: self.rank,
            generation: self.generation,
            samples: samples.to_vec(),
        });
        if self.pending.len() as u64 >= self.every {
            self.flush(rt)?;
        }
        Ok(())
    }

    /// Generation `old` committed its steps through `step` (the survivors agreed on it).
    pub fn write_commit_point(
        &mut self,
        rt: &tokio::runtime::Runtime,
        old: u64,
        step: u64,
    ) -> Result<()> {
        let url = commit_point_url(&self.url, old);
        let body = serde_json::to_vec(&CommitPoint {
            generation: old,
            step,
        })?;
        rt.block_on(write_bytes(&url, &self.s3_endpoint, body))
            .with_context(|| format!("writing the audit commit point {url}"))
    }

    /// Writes what has gathered (nothing when nothing has).
    pub fn flush(&mut self, rt: &tokio::runtime::Runtime) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let url = part_url(&self.url, self.rank, &self.writer, self.seq);
        rt.block_on(write_bytes(&url, &self.s3_endpoint, encode(&self.pending)))
            .with_context(|| format!("writing the audit part {url} (audit.url)"))?;
        self.pending.clear();
        self.seq += 1;
        Ok(())
    }
}
