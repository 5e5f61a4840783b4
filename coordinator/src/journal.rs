//! The coordinator's journal: the whole [`JobBook`] (generation, membership, lease book,
//! progress, expert placement, evaluation history) as one JSON object at
//! `cluster.journal_url`, so that a restarted coordinator takes the job over where it was.
//! The dataset's shard URLs are not in it, only their digest: a restarted coordinator lists
//! the dataset again and refuses a journal whose list differs.
//!
//! One object, replaced whole on each write: object stores replace an object atomically (the
//! local store writes a temporary file and renames it), so a reader sees the old or the new
//! book, never half of one. Writes are grouped: the RPCs a worker acts on (register, the
//! rendezvous of a new generation, lease, complete, leave) wait until a write that includes
//! their change has finished; everything else (step reports, evaluations, expiries) is
//! written within [`LAZY_WRITE_MS`].
//!
//! A journal belongs to one run of a job: it carries a fingerprint of the job's token, so a
//! new `contrail local` run (a new token) starts afresh instead of taking over a finished or
//! abandoned run's books. A journal of a finished or failed job is never taken over either.

use crate::job::JobBook;
use anyhow::{Context, Result};
use contrail_common::auth::{hex, unix_ms, JobToken};
use contrail_common::checkpoint::{read_bytes, write_bytes};
use serde::{Deserialize, Serialize};

/// Changes no RPC waits for are written at most this long after they happened.
pub const LAZY_WRITE_MS: u64 = 1_000;
/// Writes start at least this far apart. A write is the whole book (milliseconds of
/// encoding at 100,000 shards): without a gap, 2,000 ranks' leases and completions kept the
/// writer busy half of a core; with it they wait for the next write a little longer.
pub const WRITE_GAP_MS: u64 = 25;
/// An RPC that needs its change journaled waits this long before answering UNAVAILABLE.
pub const DURABLE_WAIT_MS: u64 = 10_000;
/// Bumped when the journal's layout changes incompatibly (2: shard URLs as a digest).
const FORMAT: u32 = 2;

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
    saved_unix_ms: u64,
    book: &'a JobBook,
}

#[derive(Deserialize)]
struct Loaded {
    format: u32,
    run: String,
    book: JobBook,
}

/// What reading the journal found.
pub enum Found {
    /// No journal yet.
    Nothing,
    /// A journal this coordinator should not take over, and why.
    Ignored(String),
    /// The running job's books.
    Book(Box<JobBook>),
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

    /// Reads the journal; a journal of another run or of an ended job is reported, not
    /// taken. An unreadable journal is an error (never silently replaced: it may be the
    /// only record of a running job).
    pub async fn load(&self) -> Result<Found> {
        let Some(bytes) = read_bytes(&self.url, &self.s3_endpoint)
            .await
            .with_context(|| format!("reading the coordinator journal {}", self.url))?
        else {
            return Ok(Found::Nothing);
        };
        let loaded: Loaded = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the coordinator journal {} is not readable; delete it to start the job afresh",
                self.url
            )
        })?;
        if loaded.format != FORMAT {
            return Ok(Found::Ignored(format!(
                "it has format {} (this coordinator writes {FORMAT})",
                loaded.format
            )));
        }
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
        Ok(Found::Book(Box::new(loaded.book)))
    }

    /// The journal's bytes for `book` (taken under the book's lock; written without it).
    pub fn encode(&self, book: &JobBook) -> Result<Vec<u8>> {
        serde_json::to_vec(&Record {
            format: FORMAT,
            run: &self.run,
            saved_unix_ms: unix_ms(),
            book,
        })
        .context("encoding the coordinator journal")
    }

    pub async fn write(&self, bytes: Vec<u8>) -> Result<()> {
        write_bytes(&self.url, &self.s3_endpoint, bytes)
            .await
            .with_context(|| format!("writing the coordinator journal {}", self.url))
    }
}
