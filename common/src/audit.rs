//! The sample audit: which samples each rank trained in each committed step, written by the
//! workers (`[audit] url`) and checked by `contrail audit check`, so that "every sample of
//! every epoch trained exactly once" is something a user can prove rather than trust.
//!
//! Layout: `{url}/rank-{rank:05}-{writer}-{seq:06}.jsonl`, one JSON [`AuditRecord`] per line;
//! `writer` is random per worker process, so a job restarted from a checkpoint (or a rank
//! restarted in place) never overwrites an earlier part. A rank writes a new part every
//! `audit.flush_every_steps` steps and when it stops; parts are never rewritten.

use crate::checkpoint::read_bytes;
use crate::storage::list_objects;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// One sample: the shard it came from and its key there (keys repeat across shards).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SampleRef {
    pub shard: String,
    pub key: String,
}

/// A 128-bit id of a sample (two FNV-1a hashes of "shard\0key" with different offsets):
/// what the workers exchange to know which samples were trained.
pub fn sample_id(shard: &str, key: &str) -> [i64; 2] {
    let hash = |offset: u64| {
        let mut h = offset;
        for b in shard.bytes().chain([0u8]).chain(key.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        h as i64
    };
    [hash(0xcbf2_9ce4_8422_2325), hash(0x84222325_cbf29ce4)]
}

/// What one rank trained in one committed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub epoch: u32,
    /// The step this record's samples were trained in (1-based, as reported).
    pub step: u64,
    pub rank: u32,
    pub generation: u64,
    pub samples: Vec<SampleRef>,
    /// A copy of rank `rank`'s record written by a survivor of its generation, which knows
    /// the samples only by id (`sample_id`; every rank gathers every rank's ids before each
    /// step): a rank killed between two flushes (`audit.flush_every_steps` > 1) loses its
    /// unwritten records, and these stand in for them. A copy counts only where the rank's
    /// own record of that step is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copied_ids: Vec<[i64; 2]>,
}

impl AuditRecord {
    pub fn is_copy(&self) -> bool {
        !self.copied_ids.is_empty()
    }

    /// The record's identity: one rank's step of one generation.
    fn step_key(&self) -> (u32, u64, u32, u64) {
        (self.epoch, self.generation, self.rank, self.step)
    }
}

/// What the survivors of a failure agreed on: generation `generation` committed its steps
/// through `step`; its records of later steps describe steps that never committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitPoint {
    pub generation: u64,
    pub step: u64,
}

/// Where the commit point of generation `generation` is written.
pub fn commit_point_url(url: &str, generation: u64) -> String {
    format!(
        "{}/commit-gen-{generation:06}.json",
        url.trim_end_matches('/')
    )
}

/// Name of the `seq`-th audit part of worker process `writer` (rank `rank`) under `url`.
pub fn part_url(url: &str, rank: u32, writer: &str, seq: u64) -> String {
    format!(
        "{}/rank-{rank:05}-{writer}-{seq:06}.jsonl",
        url.trim_end_matches('/')
    )
}

/// Records as JSON lines.
pub fn encode(records: &[AuditRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).expect("an audit record always serializes");
        out.push(b'\n');
    }
    out
}

/// Every committed record under `url` (all parts, all ranks), in no particular order: records
/// of a generation's steps after its commit point are dropped.
pub async fn read_all(url: &str, s3_endpoint: &str) -> Result<Vec<AuditRecord>> {
    let mut points = std::collections::HashMap::new();
    for part in list_objects(url, s3_endpoint, ".json").await? {
        let bytes = read_bytes(&part, s3_endpoint)
            .await?
            .with_context(|| format!("commit point {part} vanished while reading"))?;
        let p: CommitPoint = serde_json::from_slice(&bytes)
            .with_context(|| format!("{part}: not an audit commit point"))?;
        points.insert(p.generation, p.step);
    }
    let mut out = Vec::new();
    for part in list_objects(url, s3_endpoint, ".jsonl").await? {
        let bytes = read_bytes(&part, s3_endpoint)
            .await
            .with_context(|| format!("reading audit part {part}"))?
            .with_context(|| format!("audit part {part} vanished while reading"))?;
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let r: AuditRecord = serde_json::from_slice(line)
                .with_context(|| format!("{part} line {}: not an audit record", i + 1))?;
            if points.get(&r.generation).is_some_and(|last| r.step > *last) {
                continue;
            }
            out.push(r);
        }
    }
    Ok(out)
}

/// How one epoch's audit compares with the dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EpochCheck {
    pub epoch: u32,
    /// Samples of the dataset.
    pub expected: usize,
    /// Distinct samples trained.
    pub trained: usize,
    /// Samples trained more than once, with their count (at most 20 listed).
    pub repeated: Vec<(SampleRef, usize)>,
    pub repeated_total: usize,
    /// Samples never trained (at most 20 listed).
    pub missing: Vec<SampleRef>,
    pub missing_total: usize,
    /// Trained samples that are not in the dataset (at most 20 listed).
    pub unknown: Vec<SampleRef>,
    pub unknown_total: usize,
}

impl EpochCheck {
    pub fn exactly_once(&self) -> bool {
        self.repeated_total == 0 && self.missing_total == 0 && self.unknown_total == 0
    }
}

const LISTED: usize = 20;

/// Stands for a copied sample id that no sample of the dataset has.
fn unknown_id(id: [i64; 2]) -> SampleRef {
    SampleRef {
        shard: "(unknown sample id)".into(),
        key: format!("{:016x}{:016x}", id[0], id[1]),
    }
}

/// Compares each epoch of `records` with `dataset` (every sample the epoch should train).
/// A copy ([`AuditRecord::copied_ids`]) counts only where its rank's own record is missing.
pub fn check(records: &[AuditRecord], dataset: &[SampleRef]) -> Vec<EpochCheck> {
    let originals: std::collections::HashSet<_> = records
        .iter()
        .filter(|r| !r.is_copy())
        .map(AuditRecord::step_key)
        .collect();
    let mut copies_counted = std::collections::HashSet::new();
    let by_id: HashMap<[i64; 2], &SampleRef> = dataset
        .iter()
        .map(|s| (sample_id(&s.shard, &s.key), s))
        .collect();
    let unknown_ids: HashMap<[i64; 2], SampleRef> = records
        .iter()
        .flat_map(|r| &r.copied_ids)
        .filter(|id| !by_id.contains_key(*id))
        .map(|id| (*id, unknown_id(*id)))
        .collect();
    let mut by_epoch: BTreeMap<u32, HashMap<&SampleRef, usize>> = BTreeMap::new();
    for r in records {
        // Several survivors' copies of one record count once, and none beside the original.
        if r.is_copy()
            && (originals.contains(&r.step_key()) || !copies_counted.insert(r.step_key()))
        {
            continue;
        }
        let seen = by_epoch.entry(r.epoch).or_default();
        for s in &r.samples {
            *seen.entry(s).or_default() += 1;
        }
        for id in &r.copied_ids {
            let s = by_id
                .get(id)
                .copied()
                .or_else(|| unknown_ids.get(id))
                .expect("every copied id is a dataset sample's or listed as unknown");
            *seen.entry(s).or_default() += 1;
        }
    }
    let known: std::collections::HashSet<&SampleRef> = dataset.iter().collect();
    by_epoch
        .into_iter()
        .map(|(epoch, seen)| {
            let mut c = EpochCheck {
                epoch,
                expected: known.len(),
                trained: seen.len(),
                ..Default::default()
            };
            let mut repeated: Vec<(SampleRef, usize)> = seen
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(s, n)| ((*s).clone(), *n))
                .collect();
            repeated.sort();
            c.repeated_total = repeated.len();
            repeated.truncate(LISTED);
            c.repeated = repeated;
            let mut missing: Vec<SampleRef> = dataset
                .iter()
                .filter(|s| !seen.contains_key(s))
                .cloned()
                .collect();
            missing.sort();
            c.missing_total = missing.len();
            missing.truncate(LISTED);
            c.missing = missing;
            let mut unknown: Vec<SampleRef> = seen
                .keys()
                .filter(|s| !known.contains(*s))
                .map(|s| (*s).clone())
                .collect();
            unknown.sort();
            c.unknown_total = unknown.len();
            unknown.truncate(LISTED);
            c.unknown = unknown;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(shard: &str, key: &str) -> SampleRef {
        SampleRef {
            shard: shard.into(),
            key: key.into(),
        }
    }

    fn rec(epoch: u32, step: u64, rank: u32, samples: &[SampleRef]) -> AuditRecord {
        AuditRecord {
            epoch,
            step,
            rank,
            generation: 1,
            samples: samples.to_vec(),
            copied_ids: Vec::new(),
        }
    }

    /// A survivor's copy of `rec(epoch, step, rank, samples)`.
    fn copy(epoch: u32, step: u64, rank: u32, samples: &[SampleRef]) -> AuditRecord {
        AuditRecord {
            samples: Vec::new(),
            copied_ids: samples
                .iter()
                .map(|s| sample_id(&s.shard, &s.key))
                .collect(),
            ..rec(epoch, step, rank, &[])
        }
    }

    /// A rank killed between flushes lost its last records; the survivors' copies stand in
    /// for them (once, however many survivors wrote one), and a copy beside the original
    /// counts nothing. A copied id that no dataset sample has is unknown.
    #[test]
    fn copies_count_only_where_the_original_is_missing() {
        let data = [s("a", "0"), s("a", "1"), s("b", "0"), s("b", "1")];
        let records = [
            rec(0, 1, 0, &[s("a", "0")]),
            rec(0, 1, 1, &[s("a", "1")]),
            copy(0, 1, 1, &[s("a", "1")]),
            rec(0, 2, 0, &[s("b", "0")]),
            // Rank 1's own record of step 2 was lost; two survivors copied it.
            copy(0, 2, 1, &[s("b", "1")]),
            copy(0, 2, 1, &[s("b", "1")]),
        ];
        let checks = check(&records, &data);
        assert!(checks[0].exactly_once(), "{:?}", checks[0]);
        assert_eq!(checks[0].trained, 4);
        // Without the copies, b/1 is missing.
        let checks = check(&records[..4], &data);
        assert_eq!(checks[0].missing, vec![s("b", "1")]);
        let mut stray = copy(0, 3, 1, &[s("c", "9")]);
        stray.epoch = 1;
        let checks = check(&[stray], &data);
        assert_eq!(checks[0].unknown_total, 1);
        assert_eq!(checks[0].unknown[0].shard, "(unknown sample id)");
    }

    #[test]
    fn exactly_once_repeats_missing_and_unknown_are_told_apart() {
        // Key "0" exists in both shards: they are different samples.
        let data = [s("a", "0"), s("a", "1"), s("b", "0"), s("b", "1")];
        let records = [
            rec(0, 1, 0, &[s("a", "0"), s("a", "1")]),
            rec(0, 1, 1, &[s("b", "0"), s("b", "1")]),
            rec(1, 3, 0, &[s("a", "0"), s("b", "0")]),
            rec(1, 4, 1, &[s("a", "0"), s("c", "9")]),
        ];
        let checks = check(&records, &data);
        assert_eq!(checks.len(), 2);
        assert!(checks[0].exactly_once(), "{:?}", checks[0]);
        assert_eq!((checks[0].expected, checks[0].trained), (4, 4));
        let e1 = &checks[1];
        assert!(!e1.exactly_once());
        assert_eq!(e1.repeated, vec![(s("a", "0"), 2)]);
        assert_eq!(e1.missing, vec![s("a", "1"), s("b", "1")]);
        assert_eq!(e1.unknown, vec![s("c", "9")]);
    }

    #[test]
    fn records_round_trip_through_json_lines() {
        let records = vec![
            rec(0, 1, 0, &[s("file:///d/s-0.tar", "k\"1")]),
            rec(0, 2, 3, &[]),
            copy(0, 2, 4, &[s("file:///d/s-0.tar", "k")]),
        ];
        let bytes = encode(&records);
        let back: Vec<AuditRecord> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(back, records);
        assert_eq!(
            part_url("memory://x/audit/", 3, "g2-ab12", 7),
            "memory://x/audit/rank-00003-g2-ab12-000007.jsonl"
        );
    }
}
