//! One epoch of data for one rank: lease shards from the coordinator, stream them, and run the
//! decode/augment pipeline.
//!
//! ```text
//!  tokio task: lease ─► read_shard ─samples─► (bounded channel) ─► EpochPipeline ─► batches
//!        ▲                                                              │
//!        └──────── CompleteShard(lease, good, bad) ◄── shard reports ◄──┘
//! ```
//! A shard is reported complete only after the pipeline has processed every one of its
//! samples and every sample it put into a batch was trained in a committed step
//! ([`OpenShards`]), so the counts the coordinator records are final and a failure never
//! loses a prefetched sample.
//!
//! A thread of the feed turns the pipeline's batches into tensors ahead of the training loop
//! ([`PREFETCH_BATCHES`]), in pinned host memory on a GPU job, so the copy into pinned
//! memory is off the training thread and the step's upload to the GPU is asynchronous.

use super::client::{Coordinator, Lease};
use super::ledger::{OpenShards, TrainedSet};
use super::HeartbeatState;
use crate::tokenize::Tokenizer;
use crate::train::trainer::{BatchSource, LocalBatch};
use anyhow::{Context, Result};
use contrail_common::audit::SampleRef;
use contrail_common::JobConfig;
use contrail_data::pipeline::{EpochPipeline, PipelineInput, PipelineOptions, ShardReport};
use contrail_data::shard_reader::read_shard;
use contrail_data::shuffle::ShuffleBuffer;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use tch::{Device, Tensor};

/// Samples buffered between the shard reader and the pipeline.
const READ_AHEAD_SAMPLES: usize = 256;

/// Batches made into tensors ahead of the training loop.
pub const PREFETCH_BATCHES: usize = 2;

pub struct EpochFeed {
    /// From the batch thread; `Ok(None)` once the epoch's data ran out.
    batches: std::sync::mpsc::Receiver<Result<Option<LocalBatch>>>,
    /// The epoch's data ran out (every later call says so too).
    ended: bool,
    reader: tokio::task::JoinHandle<()>,
}

/// How the batch thread makes tensors of a pipeline batch.
struct BatchMaker {
    open: Arc<OpenShards>,
    image_size: i64,
    /// CLIP: captions become the batch's second half as tokens.
    captions: Option<CaptionTokens>,
    /// A GPU job's device: the tensors are made in pinned memory for it.
    pin_for: Option<Device>,
}

/// How a CLIP job turns captions into token ids.
#[derive(Clone)]
pub struct CaptionTokens {
    pub tokenizer: Arc<dyn Tokenizer>,
    pub context_length: usize,
}

/// What an epoch's feed shares with the rest of the worker.
pub struct FeedLinks {
    pub progress: Arc<HeartbeatState>,
    /// This rank's open leases (the step hook counts trained samples into it).
    pub open: Arc<OpenShards>,
    /// Samples of the epoch already trained (by any rank): a shard leased again skips them.
    pub trained: Arc<Mutex<TrainedSet>>,
}

impl EpochFeed {
    pub fn start(
        rt: tokio::runtime::Handle,
        coord: Coordinator,
        cfg: &JobConfig,
        rank: usize,
        epoch: u32,
        links: FeedLinks,
        captions: Option<CaptionTokens>,
        device: Device,
    ) -> Result<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<PipelineInput>(READ_AHEAD_SAMPLES);
        let reader = rt.spawn(lease_and_read(
            coord,
            epoch,
            cfg.data.s3_endpoint.clone(),
            cfg.data.read_retries,
            tx,
            links.open.clone(),
            links.trained,
            links.progress,
        ));
        // Seeded per (job, epoch, rank): reproducible for the same lease order.
        let shuffle_seed =
            cfg.train.seed ^ (u64::from(epoch) << 32) ^ (rank as u64).wrapping_mul(0x9E37_79B9);
        let pipeline = EpochPipeline::spawn(
            ShuffleBuffer::new(
                std::iter::from_fn(move || rx.blocking_recv()),
                cfg.data.shuffle_buffer,
                shuffle_seed,
            ),
            &cfg.data,
            PipelineOptions {
                micro_batch: cfg.train.micro_batch as usize,
                seed: cfg.train.seed,
                rank: rank as u32,
                epoch,
            },
        );
        let maker = BatchMaker {
            open: links.open,
            image_size: i64::from(cfg.data.image_size),
            captions,
            pin_for: device.is_cuda().then_some(device),
        };
        let (tx, batches) = std::sync::mpsc::sync_channel(PREFETCH_BATCHES);
        std::thread::Builder::new()
            .name(format!("batches-e{epoch}"))
            .spawn(move || loop {
                let next = maker.next_batch(&pipeline);
                let last = !matches!(next, Ok(Some(_)));
                // The feed was dropped (training stopped mid-epoch), or the epoch ended.
                if tx.send(next).is_err() || last {
                    break;
                }
            })
            .context("starting the batch thread")?;
        Ok(Self {
            batches,
            ended: false,
            reader,
        })
    }
}

impl BatchSource for EpochFeed {
    fn next_batch(&mut self) -> Result<Option<LocalBatch>> {
        if self.ended {
            return Ok(None);
        }
        let next = self
            .batches
            .recv()
            .context("the batch thread stopped before the epoch's data ran out")?;
        self.ended = !matches!(next, Ok(Some(_)));
        next
    }
}

impl BatchMaker {
    /// The pipeline's next batch as tensors (None: the epoch's data ran out); passes the
    /// pipeline's shard reports on.
    fn next_batch(&self, pipeline: &EpochPipeline) -> Result<Option<LocalBatch>> {
        let batch = pipeline.next_batch();
        // The pipeline closes its report channel only after its last batch, so at the end of
        // the epoch this drains every remaining report.
        let reports: Vec<ShardReport> = if batch.is_some() {
            pipeline.shard_reports().try_iter().collect()
        } else {
            pipeline.shard_reports().iter().collect()
        };
        for r in reports {
            self.open.reported(r);
        }
        let Some(b) = batch else { return Ok(None) };
        let shape = [b.len as i64, 3, self.image_size, self.image_size];
        let images = self.host_tensor(&b.view1, shape);
        let pair = match &self.captions {
            None => self.host_tensor(&b.view2, shape),
            Some(c) => {
                let texts: Vec<&str> = b.captions.iter().map(String::as_str).collect();
                c.tokenizer
                    .encode_batch(&texts, c.context_length)
                    .context("tokenizing captions")?
            }
        };
        let samples = b
            .shards
            .into_iter()
            .zip(b.keys)
            .map(|(shard, key)| SampleRef { shard, key })
            .collect();
        Ok(Some(LocalBatch {
            images,
            pair,
            samples,
        }))
    }

    /// `values` as a host tensor of `shape`, pinned for a GPU job.
    fn host_tensor(&self, values: &[f32], shape: [i64; 4]) -> Tensor {
        let t = Tensor::from_slice(values).view(shape);
        match self.pin_for {
            Some(device) => t.pin_memory(device),
            None => t,
        }
    }
}

impl Drop for EpochFeed {
    fn drop(&mut self) {
        // Training may stop mid-epoch (max_steps); the shards still leased simply expire.
        self.reader.abort();
    }
}

async fn lease_and_read(
    mut coord: Coordinator,
    epoch: u32,
    s3_endpoint: String,
    retries: u32,
    tx: tokio::sync::mpsc::Sender<PipelineInput>,
    open: Arc<OpenShards>,
    trained: Arc<Mutex<TrainedSet>>,
    progress: Arc<HeartbeatState>,
) {
    loop {
        let (url, lease_id) = match coord.lease_shard(epoch).await {
            Ok(Lease::Shard { url, lease_id }) => (url, lease_id),
            Ok(Lease::Exhausted) => break,
            Err(e) => {
                // The heartbeat task decides when the coordinator is gone for good; this rank
                // just has no more data, and the in-band step agreement keeps the others safe.
                tracing::warn!("leasing a shard of epoch {epoch} failed: {e:#}");
                break;
            }
        };
        if let Ok(mut s) = progress.shard.lock() {
            s.clone_from(&url);
        }
        open.opened(&url, lease_id);
        let sent = read_shard(&url, &s3_endpoint, retries, |sample| {
            let tx = tx.clone();
            // Trained before a failure (by this rank or a dead one): not again.
            let done = trained
                .lock()
                .map(|t| t.contains(epoch, &url, &sample.key))
                .unwrap_or(false);
            async move {
                if done {
                    return ControlFlow::Continue(());
                }
                match tx.send(PipelineInput::Sample(sample)).await {
                    Ok(()) => ControlFlow::Continue(()),
                    // The pipeline is gone (training stopped): stop downloading.
                    Err(_) => ControlFlow::Break(()),
                }
            }
        })
        .await;
        let reader_bad = match sent {
            Ok(stats) => stats.bad,
            Err(e) => {
                tracing::warn!("shard {url} failed: {e:#}");
                open.failed(&url, format!("{e:#}"));
                Default::default()
            }
        };
        if tx
            .send(PipelineInput::ShardEnd {
                shard: url,
                reader_bad,
            })
            .await
            .is_err()
        {
            break;
        }
    }
    if let Ok(mut s) = progress.shard.lock() {
        s.clear();
    }
}
