//! The coordinator's journal: the [`JobBook`] (generation, membership, lease book, progress,
//! expert placement, evaluation history) on object storage, so that a restarted coordinator
//! takes the job over where it was. The dataset's shard URLs are not in it, only their
//! digest: a restarted coordinator lists the dataset again and refuses a journal whose list
//! differs.
//!
//! A snapshot and a log. The snapshot, one JSON object at `cluster.journal_url`, is the whole
//! book. Between snapshots each write is a small delta object, `<url>.log/<snapshot>-<seq>.json`,
//! holding the lease book's changes since the previous write ([`ShardOp`]: leases granted,
//! shards completed, leases returned), which at scale are nearly every change and each one an
//! RPC waiting to be durable. A restarted coordinator reads the snapshot, then that
//! snapshot's deltas in order until one is missing, and replays them
//! ([`crate::leases::ShardBook::replay`]). The whole book is written again when anything
//! outside the lease book changed (membership, generation, the job's state), within
//! [`LAZY_WRITE_MS`] of a step report, and after [`SNAPSHOT_EVERY`] deltas (bounding what a
//! restart reads). Each snapshot has a new id (random for a coordinator's first, then
//! counting up), so an older snapshot's deltas are never read after it; they are deleted
//! once it is written, as are the deltas earlier coordinators left (listed before this one
//! writes anything, so the deletion can never take one of its own).
//!
//! Object stores replace an object atomically (the local store writes a temporary file and
//! renames it), so a reader sees an old or a new object, never half of one. Writes are
//! grouped: the RPCs a worker acts on (register, the rendezvous of a new generation, lease,
//! complete, leave) wait until a write that includes their change has finished; everything
//! else (step reports, evaluations, expiries) is written within [`LAZY_WRITE_MS`].
//!
//! A journal belongs to one run of a job: it carries a fingerprint of the job's token, so a
//! new `contrail local` run (a new token) starts afresh instead of taking over a finished or
//! abandoned run's books. A journal of a finished or failed job is never taken over either.

use crate::job::JobBook;
use crate::leases::ShardOp;
use anyhow::{bail, Context, Result};
use contrail_common::auth::{hex, random_bytes, unix_ms, JobToken};
use contrail_common::checkpoint::{delete_object, read_bytes, write_bytes};
use serde::{Deserialize, Serialize};

/// Changes no RPC waits for are written at most this long after they happened.
pub const LAZY_WRITE_MS: u64 = 1_000;
/// Writes start at least this far apart, so that the changes of many RPCs share one write
/// (at 2,000 ranks they come ~10,000 a second).
pub const WRITE_GAP_MS: u64 = 5;
/// A write after a snapshot starts at least this far after it: a snapshot is the whole book
/// (milliseconds of encoding under the books' lock at 100,000 shards), and while every
/// write is one (a burst of registrations) the RPCs would otherwise queue behind the lock.
pub const SNAPSHOT_GAP_MS: u64 = 25;
/// After this many deltas the next write is a snapshot: a restarted coordinator reads at
/// most this many objects after the snapshot.
pub const SNAPSHOT_EVERY: u64 = 200;
/// An RPC that needs its change journaled waits this long before answering UNAVAILABLE.
pub const DURABLE_WAIT_MS: u64 = 10_000;
/// Bumped when the journal's layout changes incompatibly (2: shard URLs as a digest; 3: a
/// snapshot with a log of deltas).
const FORMAT: u32 = 3;

/// Where the journal lives and which run it belongs to.
#[derive(Debug, Clone)]
pub struct Journal {
    pub url: String,
    s3_endpoint: String,
    /// Fingerprint of the job token ("" without one: in-process tests).
    run: String,
}

#[derive(Serialize)]
struct Record<'a> {
    format: u32,
    run: &'a str,
    snapshot: u64,
    saved_unix_ms: u64,
    book: &'a JobBook,
}

/// A snapshot (its format was read first, by `Head`).
#[derive(Deserialize)]
struct Loaded {
    run: String,
    #[serde(default)]
    snapshot: u64,
    book: JobBook,
}

#[derive(Serialize, Deserialize)]
struct Delta {
    format: u32,
    run: String,
    snapshot: u64,
    seq: u64,
    ops: Vec<ShardOp>,
}

/// What reading the journal found.
pub enum Found {
    /// No journal yet.
    Nothing,
    /// A journal this coordinator should not take over, and why.
    Ignored(String),
    /// The running job's books as of the snapshot, and the lease-book changes logged after
    /// it (for [`JobBook::recovered`]).
    Book {
        book: Box<JobBook>,
        log: Vec<ShardOp>,
        deltas: u64,
    },
}

/// A fresh snapshot id.
pub fn new_snapshot_id() -> Result<u64> {
    Ok(u64::from_le_bytes(
        random_bytes().context("drawing a journal snapshot id")?,
    ))
}

impl Journal {
    /// The journal of a job whose token is `token`, at `url`.
    pub fn new(url: String, s3_endpoint: &str, token: Option<&JobToken>) -> Self {
        let run = token
            .map(|t| hex(&t.mac(&[b"contrail coordinator journal"])[..16]))
            .unwrap_or_default();
        Self {
            url,
            s3_endpoint: s3_endpoint.to_string(),
            run,
        }
    }

    /// Where the deltas live (one folder for every snapshot's).
    fn log_dir(&self) -> String {
        format!("{}.log", self.url)
    }

    fn delta_name(snapshot: u64) -> String {
        format!("{snapshot:016x}-")
    }

    pub fn delta_url(&self, snapshot: u64, seq: u64) -> String {
        format!(
            "{}/{}{seq:08}.json",
            self.log_dir(),
            Self::delta_name(snapshot)
        )
    }

    /// Reads the journal; a journal of another run or of an ended job is reported, not
    /// taken. An unreadable journal (or delta) is an error (never silently replaced: it may
    /// be the only record of a running job).
    pub async fn load(&self) -> Result<Found> {
        let Some(bytes) = read_bytes(&self.url, &self.s3_endpoint)
            .await
            .with_context(|| format!("reading the coordinator journal {}", self.url))?
        else {
            return Ok(Found::Nothing);
        };
        let unreadable = |what: &str| {
            format!("the coordinator journal {what} is not readable; delete the journal (and its .log folder) to start the job afresh")
        };
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(&bytes).with_context(|| unreadable(&self.url))?;
        if head.format != FORMAT {
            return Ok(Found::Ignored(format!(
                "it has format {} (this coordinator writes {FORMAT})",
                head.format
            )));
        }
        let loaded: Loaded =
            serde_json::from_slice(&bytes).with_context(|| unreadable(&self.url))?;
        if loaded.run != self.run {
            return Ok(Found::Ignored(
                "it belongs to another run of the job (another job token)".into(),
            ));
        }
        if loaded.book.state().is_terminal() {
            return Ok(Found::Ignored(format!(
                "that run already ended ({:?})",
                loaded.book.state()
            )));
        }
        let mut log = Vec::new();
        let mut deltas = 0;
        loop {
            let url = self.delta_url(loaded.snapshot, deltas + 1);
            let Some(bytes) = read_bytes(&url, &self.s3_endpoint)
                .await
                .with_context(|| format!("reading the coordinator journal's delta {url}"))?
            else {
                break;
            };
            let d: Delta = serde_json::from_slice(&bytes).with_context(|| unreadable(&url))?;
            if (d.format, &d.run, d.snapshot, d.seq)
                != (FORMAT, &loaded.run, loaded.snapshot, deltas + 1)
            {
                bail!(
                    "{} names another journal (format {}, snapshot {:x}, delta {})",
                    unreadable(&url),
                    d.format,
                    d.snapshot,
                    d.seq
                );
            }
            log.extend(d.ops);
            deltas += 1;
        }
        Ok(Found::Book {
            book: Box::new(loaded.book),
            log,
            deltas,
        })
    }

    /// The snapshot's bytes for `book` (taken under the book's lock; written without it).
    pub fn encode(&self, book: &JobBook, snapshot: u64) -> Result<Vec<u8>> {
        serde_json::to_vec(&Record {
            format: FORMAT,
            run: &self.run,
            snapshot,
            saved_unix_ms: unix_ms(),
            book,
        })
        .context("encoding the coordinator journal")
    }

    /// Delta `seq` (1, 2, ...) after snapshot `snapshot`.
    pub fn encode_delta(&self, snapshot: u64, seq: u64, ops: Vec<ShardOp>) -> Result<Vec<u8>> {
        serde_json::to_vec(&Delta {
            format: FORMAT,
            run: self.run.clone(),
            snapshot,
            seq,
            ops,
        })
        .context("encoding a coordinator journal delta")
    }

    /// Writes a snapshot.
    pub async fn write(&self, bytes: Vec<u8>) -> Result<()> {
        write_bytes(&self.url, &self.s3_endpoint, bytes)
            .await
            .with_context(|| format!("writing the coordinator journal {}", self.url))
    }

    pub async fn write_delta(&self, snapshot: u64, seq: u64, bytes: Vec<u8>) -> Result<()> {
        let url = self.delta_url(snapshot, seq);
        write_bytes(&url, &self.s3_endpoint, bytes)
            .await
            .with_context(|| format!("writing the coordinator journal's delta {url}"))
    }

    /// Every delta there is now. Listed before this coordinator writes anything, they are
    /// all earlier coordinators' (each snapshot has a new id), to delete once this one's
    /// first snapshot is written; listed later, the list would take in this one's own.
    pub async fn list_deltas(&self) -> Result<Vec<String>> {
        contrail_common::storage::list_objects(&self.log_dir(), &self.s3_endpoint, ".json").await
    }

    /// Deletes the objects at `urls` (deltas no snapshot will read again).
    pub async fn remove(&self, urls: &[String]) -> Result<()> {
        for url in urls {
            delete_object(url, &self.s3_endpoint).await?;
        }
        Ok(())
    }
}
