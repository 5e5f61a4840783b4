//! The worker's side of the sample audit (`[audit]`, `contrail_common::audit`): after each
//! committed step, what this rank trained; written as a new part every
//! `audit.flush_every_steps` steps and when training stops.

use crate::train::trainer::StepEvent;
use anyhow::{Context, Result};
use contrail_common::audit::{encode, part_url, AuditRecord};
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

    /// Notes a committed step; writes a part when `flush_every_steps` have gathered.
    pub fn record(&mut self, rt: &tokio::runtime::Runtime, ev: &StepEvent) -> Result<()> {
        self.pending.push(AuditRecord {
            epoch: ev.epoch,
            step: ev.step,
            rank: self.rank,
            generation: self.generation,
            samples: ev.samples.clone(),
        });
        if self.pending.len() as u64 >= self.every {
            self.flush(rt)?;
        }
        Ok(())
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
