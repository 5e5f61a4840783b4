//! One epoch of samples → decoded, augmented, batched two-view tensors on a thread pool.
//!
//! ```text
//!  source ──► dispatcher ──jobs──► decode+augment × data.decode_threads ──results──► assembler
//!  (iterator)     │ ▲                                                                 │   │
//!                 │ └──────────── view buffers (the in-flight window) ◄───────────────┘   │
//!                 └──────────── ShardEnd markers (in sequence) ──────────────────────►    │
//!                                               batches (bounded: data.prefetch_batches) ◄┘
//! ```
//!
//! * **Input.** The caller feeds [`PipelineInput`]s from any iterator; the worker runtime turns
//!   its async shard reader into one with `std::iter::from_fn(|| rx.blocking_recv())`. After the
//!   last sample of a shard it sends [`PipelineInput::ShardEnd`] (with the bad samples the
//!   reader itself found, such as a truncated tar).
//! * **Order and determinism.** Every input gets a sequence number and the assembler restores
//!   that order, so batches hold samples in input order whatever the thread timing. Each
//!   sample's augmentation is seeded from (seed, epoch, shard, key), not from the rank or the
//!   thread: the same sample gets the same views wherever it is read.
//! * **Bad samples** (no image, caption not UTF-8, corrupt image, decompression bomb) are
//!   skipped and counted. Counts reach the caller two ways: [`ShardReport`]s, sent when a
//!   `ShardEnd` marker comes out of the assembler (so every sample of that shard is done, and
//!   the worker can report the finished shard to the coordinator with its counts), and
//!   running totals in [`EpochPipeline::stats`].
//! * **Back-pressure.** A fixed pool of per-sample view buffers bounds the samples in flight;
//!   the batch channel holds `data.prefetch_batches` batches. When the trainer stops taking
//!   batches, the assembler blocks, buffers stop coming back, and the dispatcher stops pulling
//!   from the source.
//! * **Shutdown.** Dropping the [`EpochPipeline`] makes every thread exit once it next touches
//!   a channel (the dispatcher after the source yields its next item or ends).

use crate::augment::Augmenter;
use crate::decode::{decode_rgb, DecodeError};
use crate::sample::{count_bad, BadSampleCounts, BadSampleReason, Sample};
use contrail_common::config::DataConfig;
use contrail_common::shards::SplitMix64;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;

/// What the caller feeds the pipeline.
#[derive(Debug, Clone)]
pub enum PipelineInput {
    Sample(Sample),
    /// Every sample of `shard` has been sent. `reader_bad` holds samples the reader already
    /// dropped (e.g. `truncated_tar`); they are added to the shard's report and the totals.
    ShardEnd {
        shard: String,
        reader_bad: BadSampleCounts,
    },
}

/// Per-epoch settings that do not come from the job file's `data` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineOptions {
    pub micro_batch: usize,
    pub seed: u64,
    /// Only used to label log lines: augmentation does not depend on the rank.
    pub rank: u32,
    pub epoch: u32,
}

/// A micro-batch of two-view samples. `view1` and `view2` are NCHW f32, `len × 3 × S × S`.
/// The last batch of an epoch may hold fewer than `micro_batch` samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub view1: Vec<f32>,
    pub view2: Vec<f32>,
    pub len: usize,
    pub keys: Vec<String>,
    /// The shard each sample came from (with its key, the sample's identity).
    pub shards: Vec<String>,
    /// `.cls` value, or -1 when the sample has none.
    pub class_ids: Vec<i64>,
    /// `.txt` caption, or "" when the sample has none.
    pub captions: Vec<String>,
}

/// Outcome of one shard, sent once every sample of it has been processed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardReport {
    pub shard: String,
    /// Samples that made it into batches.
    pub good: u64,
    /// Skipped samples by reason (`BadSampleReason::as_str`).
    pub bad: BadSampleCounts,
}

/// Running totals over the epoch so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub good: u64,
    pub bad: BadSampleCounts,
}

/// A running epoch: take batches with [`EpochPipeline::next_batch`] (or iterate) until `None`.
pub struct EpochPipeline {
    batches: Receiver<Batch>,
    reports: Receiver<ShardReport>,
    stats: Arc<Mutex<PipelineStats>>,
}

impl EpochPipeline {
    /// Starts the dispatcher, `data.decode_threads` decode/augment threads and the assembler.
    pub fn spawn<I>(source: I, data: &DataConfig, opts: PipelineOptions) -> Self
    where
        I: IntoIterator<Item = PipelineInput>,
        I::IntoIter: Send + 'static,
    {
        let threads = data.decode_threads.max(1);
        let micro_batch = opts.micro_batch.max(1);
        let size = data.image_size as usize;
        let sample_len = 2 * 3 * size * size;
        // Enough in flight to keep every thread busy while the assembler waits on the oldest.
        let window = 4 * threads + 2;

        let (pool_tx, pool_rx) = sync_channel::<Vec<f32>>(window);
        for _ in 0..window {
            // Cannot fail: the channel has room for exactly `window` buffers.
            let _ = pool_tx.send(vec![0.0; sample_len]);
        }
        let (job_tx, job_rx) = sync_channel::<Job>(threads);
        let (result_tx, result_rx) = channel::<Done>();
        let (batch_tx, batch_rx) = sync_channel::<Batch>(data.prefetch_batches.max(1));
        let (report_tx, report_rx) = channel::<ShardReport>();
        let stats = Arc::new(Mutex::new(PipelineStats::default()));

        let marker_tx = result_tx.clone();
        let iter = source.into_iter();
        spawn_named(format!("data-dispatch-r{}", opts.rank), move || {
            for (seq, input) in (0u64..).zip(iter) {
                let sent = match input {
                    PipelineInput::Sample(sample) => match pool_rx.recv() {
                        Ok(buf) => job_tx.send(Job { seq, sample, buf }).is_ok(),
                        Err(_) => false,
                    },
                    PipelineInput::ShardEnd { shard, reader_bad } => marker_tx
                        .send(Done {
                            seq,
                            outcome: Outcome::ShardEnd { shard, reader_bad },
                        })
                        .is_ok(),
                };
                if !sent {
                    return; // the pipeline was dropped
                }
            }
        });

        let job_rx = Arc::new(Mutex::new(job_rx));
        for t in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let result_tx = result_tx.clone();
            let ctx = WorkerCtx {
                data: data.clone(),
                opts,
                thread: t,
            };
            spawn_named(format!("data-decode-r{}-{t}", opts.rank), move || {
                ctx.run(&job_rx, &result_tx)
            });
        }
        drop(result_tx);

        let assembler = Assembler {
            micro_batch,
            view_len: sample_len / 2,
            pool_tx,
            batch_tx,
            report_tx,
            stats: Arc::clone(&stats),
            shards: HashMap::new(),
            batch: Batch::default(),
        };
        spawn_named(format!("data-batch-r{}", opts.rank), move || {
            assembler.run(result_rx)
        });

        Self {
            batches: batch_rx,
            reports: report_rx,
            stats,
        }
    }

    /// The next batch, blocking; `None` once the epoch is over.
    pub fn next_batch(&self) -> Option<Batch> {
        self.batches.recv().ok()
    }

    /// Reports of shards whose samples are all processed, in completion order; poll with
    /// `try_recv` between steps.
    pub fn shard_reports(&self) -> &Receiver<ShardReport> {
        &self.reports
    }

    /// Totals so far (samples already batched or skipped).
    pub fn stats(&self) -> PipelineStats {
        self.stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

impl Iterator for EpochPipeline {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }
}

fn spawn_named(name: String, f: impl FnOnce() + Send + 'static) {
    // Spawning fails only when the OS is out of threads; nothing sensible to do but stop.
    thread::Builder::new()
        .name(name)
        .spawn(f)
        .expect("spawning a data pipeline thread");
}

/// The augmentation seed of one sample: the same wherever and whenever (within an epoch) the
/// sample is processed.
pub fn sample_seed(seed: u64, epoch: u32, shard: &str, key: &str) -> u64 {
    // FNV-1a over "shard/key": keys repeat across shards in many WebDatasets.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in shard.bytes().chain([b'/']).chain(key.bytes()) {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut mix = SplitMix64::new(seed ^ u64::from(epoch).wrapping_mul(0xA24B_AED4_963E_E407) ^ h);
    mix.next_u64()
}

struct Job {
    seq: u64,
    sample: Sample,
    /// Receives both views back to back (`2 × 3 × S²`).
    buf: Vec<f32>,
}

struct Done {
    seq: u64,
    outcome: Outcome,
}

enum Outcome {
    Good {
        key: String,
        shard: String,
        class_id: i64,
        caption: String,
        views: Vec<f32>,
    },
    Bad {
        shard: String,
        reason: BadSampleReason,
        buf: Vec<f32>,
    },
    ShardEnd {
        shard: String,
        reader_bad: BadSampleCounts,
    },
}

struct WorkerCtx {
    data: DataConfig,
    opts: PipelineOptions,
    thread: usize,
}

impl WorkerCtx {
    fn run(&self, jobs: &Mutex<Receiver<Job>>, results: &Sender<Done>) {
        let mut aug = Augmenter::new(&self.data.augment, self.data.image_size);
        loop {
            // Hold the lock only for the receive, not while decoding.
            let job = match jobs.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(Job {
                seq,
                sample,
                mut buf,
            }) = job
            else {
                return;
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                self.process(&mut aug, &sample, &mut buf)
            }));
            let outcome = match outcome {
                Ok(Ok((class_id, caption))) => Outcome::Good {
                    key: sample.key,
                    shard: sample.shard,
                    class_id,
                    caption,
                    views: buf,
                },
                Ok(Err(e)) => {
                    tracing::debug!(
                        rank = self.opts.rank,
                        shard = %sample.shard,
                        key = %sample.key,
                        "skipping sample: {e}"
                    );
                    Outcome::Bad {
                        shard: sample.shard,
                        reason: e.reason,
                        buf,
                    }
                }
                Err(_) => {
                    // A decoder bug on hostile input must cost one sample, not the epoch.
                    tracing::error!(
                        rank = self.opts.rank,
                        thread = self.thread,
                        shard = %sample.shard,
                        key = %sample.key,
                        "decode/augment panicked; sample skipped as corrupt_image"
                    );
                    aug = Augmenter::new(&self.data.augment, self.data.image_size);
                    Outcome::Bad {
                        shard: sample.shard,
                        reason: BadSampleReason::CorruptImage,
                        buf,
                    }
                }
            };
            if results.send(Done { seq, outcome }).is_err() {
                return;
            }
        }
    }

    /// Checks, decodes and augments one sample into `buf`; returns its class id and caption.
    fn process(
        &self,
        aug: &mut Augmenter,
        sample: &Sample,
        buf: &mut [f32],
    ) -> Result<(i64, String), DecodeError> {
        let bad = |reason, detail: String| DecodeError { reason, detail };
        let Some((_, bytes)) = sample.image() else {
            let members: Vec<&str> = sample.members.keys().map(String::as_str).collect();
            return Err(bad(
                BadSampleReason::MissingImage,
                format!("no jpg/jpeg/png/webp member (has {members:?})"),
            ));
        };
        let caption = match sample.caption() {
            None => String::new(),
            Some(Ok(text)) => text.to_owned(),
            Some(Err(e)) => return Err(bad(BadSampleReason::InvalidCaption, format!(".txt: {e}"))),
        };
        let img = decode_rgb(bytes, self.data.max_image_pixels)?;
        let seed = sample_seed(self.opts.seed, self.opts.epoch, &sample.shard, &sample.key);
        let (v1, v2) = buf.split_at_mut(buf.len() / 2);
        aug.two_views(&img, &mut SplitMix64::new(seed), v1, v2)
            .map_err(|e| bad(BadSampleReason::CorruptImage, format!("resize: {e}")))?;
        Ok((sample.class_id().unwrap_or(-1), caption))
    }
}

struct Assembler {
    micro_batch: usize,
    view_len: usize,
    pool_tx: SyncSender<Vec<f32>>,
    batch_tx: SyncSender<Batch>,
    report_tx: Sender<ShardReport>,
    stats: Arc<Mutex<PipelineStats>>,
    /// Shards with samples seen but no `ShardEnd` yet.
    shards: HashMap<String, ShardReport>,
    batch: Batch,
}

impl Assembler {
    fn run(mut self, results: Receiver<Done>) {
        let mut pending: BTreeMap<u64, Outcome> = BTreeMap::new();
        let mut next_seq = 0u64;
        for done in results {
            pending.insert(done.seq, done.outcome);
            while let Some(outcome) = pending.remove(&next_seq) {
                next_seq += 1;
                if !self.take(outcome) {
                    return; // the consumer dropped the pipeline
                }
            }
        }
        if self.batch.len > 0 {
            let _ = self.batch_tx.send(std::mem::take(&mut self.batch));
        }
    }

    /// Handles the next outcome in sequence; false when the consumer is gone.
    fn take(&mut self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Good {
                key,
                shard,
                class_id,
                caption,
                views,
            } => {
                if self.batch.len == 0 {
                    self.batch.view1.reserve(self.micro_batch * self.view_len);
                    self.batch.view2.reserve(self.micro_batch * self.view_len);
                }
                self.batch.view1.extend_from_slice(&views[..self.view_len]);
                self.batch.view2.extend_from_slice(&views[self.view_len..]);
                self.batch.len += 1;
                self.batch.keys.push(key);
                self.batch.shards.push(shard.clone());
                self.batch.class_ids.push(class_id);
                self.batch.captions.push(caption);
                // The pool has room for every buffer it handed out.
                let _ = self.pool_tx.try_send(views);
                self.shard(&shard).good += 1;
                self.update_stats(|s| s.good += 1);
                if self.batch.len == self.micro_batch {
                    return self.batch_tx.send(std::mem::take(&mut self.batch)).is_ok();
                }
            }
            Outcome::Bad { shard, reason, buf } => {
                let _ = self.pool_tx.try_send(buf);
                count_bad(&mut self.shard(&shard).bad, reason);
                self.update_stats(|s| count_bad(&mut s.bad, reason));
            }
            Outcome::ShardEnd { shard, reader_bad } => {
                let mut report = self.shards.remove(&shard).unwrap_or_default();
                report.shard = shard;
                for (reason, n) in &reader_bad {
                    *report.bad.entry(reason.clone()).or_insert(0) += n;
                }
                self.update_stats(|s| {
                    for (reason, n) in &reader_bad {
                        *s.bad.entry(reason.clone()).or_insert(0) += n;
                    }
                });
                // Nobody listening for reports is fine; batches still flow.
                let _ = self.report_tx.send(report);
            }
        }
        true
    }

    fn shard(&mut self, shard: &str) -> &mut ShardReport {
        if !self.shards.contains_key(shard) {
            self.shards.insert(shard.to_owned(), ShardReport::default());
        }
        self.shards.get_mut(shard).expect("inserted above")
    }

    fn update_stats(&self, f: impl FnOnce(&mut PipelineStats)) {
        match self.stats.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}
