//! The worker's side of the sample audit (`[audit]`, `contrail_common::audit`): before each
//! step, what this rank is about to train; written as a new part every
//! `audit.flush_every_steps` steps and when training stops. A step that then fails to commit
//! is cancelled by the commit point the survivors write when they regroup.
//!
//! A rank killed between two flushes takes its unwritten records with it. With
//! `cluster.min_workers` every rank knows every rank's sample ids of each step (they are
//! gathered before it), so each keeps those of its last `flush_every_steps` steps, and the
//! new rank 0 of a regroup writes them as copies of the old generation's records
//! (`AuditRecord::copied_ids`); `contrail audit check` counts a copy only where the rank's own
//! record is missing.

use crate::train::trainer::StepIds;
use anyhow::{Context, Result};
use contrail_common::audit::{
    commit_point_url, encode, part_url, AuditRecord, CommitPoint, SampleRef,
};
use contrail_common::auth::{hex, random_bytes};
use contrail_common::checkpoint::write_bytes;
use contrail_common::JobConfig;
use std::collections::VecDeque;

/// Every rank's sample ids of one step, as gathered before it.
struct GatheredStep {
    epoch: u32,
    step: u64,
    generation: u64,
    /// Indexed by the rank of `generation`.
    ranks: Vec<Vec<[i64; 2]>>,
}

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
    /// Every rank's sample ids of the last `every` steps (with `cluster.min_workers`).
    recent: VecDeque<GatheredStep>,
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
            recent: VecDeque::new(),
        }))
    }

    /// A regroup gave this process a new rank and generation; later records carry them
    /// (parts keep the writer's name, so none is overwritten).
    pub fn set_membership(&mut self, rank: usize, generation: u64) {
        self.rank = rank as u32;
        self.generation = generation;
    }

    /// Notes step `step` about to train `samples` (and every rank's ids, `all`, when the job
    /// recovers from failures); writes a part when `flush_every_steps` have gathered.
    pub fn record(
        &mut self,
        rt: &tokio::runtime::Runtime,
        epoch: u32,
        step: u64,
        samples: &[SampleRef],
        all: Option<&StepIds>,
    ) -> Result<()> {
        self.pending.push(AuditRecord {
            epoch,
            step,
            rank: self.rank,
            generation: self.generation,
            samples: samples.to_vec(),
            copied_ids: Vec::new(),
        });
        // A rank's unwritten records are at most `every - 1` steps old (plus the step in
        // flight), whatever its flush phase.
        if let Some(all) = all.filter(|_| self.every > 1) {
            if self.recent.len() as u64 >= self.every {
                self.recent.pop_front();
            }
            self.recent.push_back(GatheredStep {
                epoch,
                step,
                generation: self.generation,
                ranks: (0..all.counts.len()).map(|r| all.of_rank(r)).collect(),
            });
        }
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

    /// Writes copies of the recent records of generation `old`'s other ranks (see the
    /// module's comment) as one part.
    pub fn write_copies(&mut self, rt: &tokio::runtime::Runtime, old: u64) -> Result<()> {
        let own = self.rank;
        let copies: Vec<AuditRecord> = self
            .recent
            .iter()
            .filter(|g| g.generation == old)
            .flat_map(|g| {
                g.ranks
                    .iter()
                    .enumerate()
                    .filter(move |(rank, ids)| *rank as u32 != own && !ids.is_empty())
                    .map(move |(rank, ids)| AuditRecord {
                        epoch: g.epoch,
                        step: g.step,
                        rank: rank as u32,
                        generation: old,
                        samples: Vec::new(),
                        copied_ids: ids.clone(),
                    })
            })
            .collect();
        self.recent.clear();
        if copies.is_empty() {
            return Ok(());
        }
        let url = part_url(
            &self.url,
            self.rank,
            &format!("{}-copies", self.writer),
            self.seq,
        );
        self.seq += 1;
        rt.block_on(write_bytes(&url, &self.s3_endpoint, encode(&copies)))
            .with_context(|| format!("writing the audit copies {url} (audit.url)"))
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
