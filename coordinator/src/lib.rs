//! contrail-coordinator: membership, rendezvous, shard leases and status for a contrail job.
//! No libtorch: it runs on a CPU-only pod, or in-process inside `contrail local`.
//!
//! - [`job`]: the state machine, one method per RPC, with time passed in (testable without
//!   sleeping). Built from [`membership`] (workers, ranks, generation, fencing),
//!   [`leases`] (per-epoch shard pools and leases) and [`progress`] (step, loss, throughput,
//!   ETA).
//! - [`experts`]: the MoE expert placement, the router load rank 0 reports, and when to
//!   re-plan.
//! - [`service`]: the tonic gRPC service over a shared [`Coordinator`].
//! - [`access`]: the job token on every gRPC call, the optional status bearer token.
//! - [`http`]: `GET /` (the live status page, [`page`]), `GET /status` (JSON
//!   [`StatusReport`]), `GET /metrics` and `GET /healthz`.
//! - [`metrics`]: the status report in Prometheus' text format.
//! - [`journal`]: the books on object storage, so a restarted coordinator takes the job over.
//! - [`tensorboard`]: TensorBoard event files of the training curves (`log.tensorboard`).
//!
//! ```no_run
//! # async fn demo(cfg: contrail_common::JobConfig, toml: String) -> anyhow::Result<()> {
//! let coord = contrail_coordinator::Coordinator::new(cfg, toml, None).await?;
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let done = coord.clone();
//! let access = contrail_coordinator::access::Access::default(); // open: tests only
//! coord.serve(grpc, http, access, async move { let _ = done.wait_for_end().await; }).await?;
//! # Ok(()) }
//! ```

pub mod access;
pub mod error;
pub mod experts;
pub mod http;
pub mod job;
pub mod journal;
pub mod leases;
pub mod listeners;
pub mod manifest;
pub mod membership;
pub mod metrics;
pub mod page;
pub mod progress;
pub mod service;
pub mod tensorboard;

use anyhow::{bail, Context, Result};
use contrail_common::auth::JobToken;
use contrail_common::checkpoint::{read_latest, CheckpointMeta};
use contrail_common::config::JobConfig;
pub use contrail_common::status::{JobState, StatusReport};
use error::RpcError;
use job::JobBook;
use journal::{Found, Journal};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A running coordinator: the state machine behind a lock, its clock, and a watch on the job
/// state. Shared (`Arc`) between the gRPC service, the HTTP server and the caller.
pub struct Coordinator {
    cfg: JobConfig,
    started: Instant,
    book: Mutex<JobBook>,
    state_tx: watch::Sender<JobState>,
    journal: Option<Journal>,
    /// The book's change count the journal holds.
    journaled: watch::Sender<u64>,
    /// Wakes the journal writer at once (an RPC waits for its change to be journaled).
    journal_now: tokio::sync::Notify,
    /// What the journal writes have cost (for `/status` and `/metrics`).
    journal_stats: Mutex<contrail_common::status::JournalStatus>,
    /// When the books' housekeeping last ran (ms since start; see [`HOUSEKEEPING_EVERY_MS`]).
    housekept_ms: std::sync::atomic::AtomicU64,
}

/// The books' housekeeping (expired leases, silent workers) scans every lease and worker, so
/// it runs at most this often, not on every RPC: at 2,000 ranks the RPCs come ~10,000 a
/// second. Every timeout it serves is hundreds of milliseconds or more.
const HOUSEKEEPING_EVERY_MS: u64 = 10;

impl Coordinator {
    /// Lists the dataset's shards, then takes the running job over from its journal
    /// (`cluster.journal_url`) when a coordinator of this run (same `token`) wrote one, else
    /// loads the latest checkpoint (if `checkpoint.url` has one) so a restarted job resumes
    /// where it stopped.
    pub async fn new(
        cfg: JobConfig,
        job_toml: String,
        token: Option<&JobToken>,
    ) -> Result<Arc<Self>> {
        let shards = contrail_common::storage::list_shards(&cfg.data.url, &cfg.data.s3_endpoint)
            .await
            .with_context(|| {
                format!("listing the dataset's shards (data.url = {})", cfg.data.url)
            })?;
        let journal = cfg
            .cluster
            .journal(&cfg.checkpoint.url)
            .map(|url| Journal::new(url, &cfg.data.s3_endpoint, token));
        if let Some(j) = &journal {
            match j.load().await? {
                Found::Nothing => tracing::info!(journal = %j.url, "no journal yet; a new run"),
                Found::Ignored(why) => {
                    tracing::info!(journal = %j.url, "not taking over the journal: {why}; a new run")
                }
                Found::Book { book, log, deltas } => {
                    let changes = log.len();
                    let book = book
                        .recovered(cfg.clone(), &job_toml, shards.clone(), log, 0)
                        .map_err(|why| {
                            anyhow::anyhow!(
                                "the coordinator journal {} belongs to this run, but {why}; \
                                 restore the job file (or delete the journal to start afresh)",
                                j.url
                            )
                        })?;
                    let s = book.status(0);
                    tracing::warn!(
                        journal = %j.url,
                        generation = s.generation,
                        deltas,
                        logged_changes = changes,
                        workers = s.workers.len(),
                        epoch = s.epoch,
                        step = s.step,
                        "took the running job over from the journal; its workers re-attach"
                    );
                    return Ok(Self::from_book(cfg, book, journal));
                }
            }
        }
        let resume = read_latest(&cfg.checkpoint.url, &cfg.data.s3_endpoint)
            .await
            .with_context(|| {
                format!(
                    "reading the latest checkpoint (checkpoint.url = {})",
                    cfg.checkpoint.url
                )
            })?;
        if let Some((dir, meta)) = &resume {
            tracing::info!(checkpoint = %dir, step = meta.step, epoch = meta.epoch, "resuming");
            if meta.world_size != cfg.cluster.world_size {
                tracing::warn!(
                    checkpoint_world_size = meta.world_size,
                    world_size = cfg.cluster.world_size,
                    "resuming with a different cluster.world_size than the checkpoint was written with"
                );
            }
        }
        let samples =
            manifest::samples_per_epoch(&cfg.data.url, &cfg.data.s3_endpoint, &shards).await;
        let mut book = fresh_book(&cfg, job_toml, shards, resume)?;
        book.set_manifest_samples(samples);
        Ok(Self::from_book(cfg, book, journal))
    }

    /// Like [`Coordinator::new`] with the shard list and resume point given (no storage I/O,
    /// no journal).
    pub fn with_shards(
        cfg: JobConfig,
        job_toml: String,
        shards: Vec<String>,
        resume: Option<(String, CheckpointMeta)>,
    ) -> Result<Arc<Self>> {
        let book = fresh_book(&cfg, job_toml, shards, resume)?;
        Ok(Self::from_book(cfg, book, None))
    }

    fn from_book(cfg: JobConfig, book: JobBook, journal: Option<Journal>) -> Arc<Self> {
        let (state_tx, _) = watch::channel(book.state());
        Arc::new(Self {
            cfg,
            started: Instant::now(),
            book: Mutex::new(book),
            state_tx,
            journal,
            journaled: watch::channel(0).0,
            journal_now: tokio::sync::Notify::new(),
            journal_stats: Mutex::default(),
            housekept_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// An MoE worker died: reads the latest checkpoint and rolls the books back to it
    /// ([`JobBook::apply_rollback`]).
    async fn roll_back_if_due(&self) {
        if !self.lock().rollback_due() {
            return;
        }
        let url = &self.cfg.checkpoint.url;
        let latest = match read_latest(url, &self.cfg.data.s3_endpoint).await {
            Ok(Some(found)) => Ok(found),
            Ok(None) if url.is_empty() => Err("checkpoint.url is not set".to_string()),
            Ok(None) => Err(format!("{url} holds no checkpoint yet")),
            Err(e) => Err(format!("{e:#}")),
        };
        self.with_book(|b, _| b.apply_rollback(latest));
    }

    /// Returns once the journal holds every change made so far (at once without a journal).
    /// Called by the RPCs whose answer a worker acts on, before they answer.
    pub async fn durable(&self) -> Result<(), RpcError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let target = self.lock().changes();
        let mut rx = self.journaled.subscribe();
        if *rx.borrow_and_update() >= target {
            return Ok(());
        }
        self.journal_now.notify_one();
        let wait = Duration::from_millis(journal::DURABLE_WAIT_MS);
        let done = tokio::time::timeout(wait, rx.wait_for(|w| *w >= target))
            .await
            .is_ok_and(|r| r.is_ok());
        match done {
            true => Ok(()),
            false => Err(RpcError::Unavailable(format!(
                "the coordinator could not write its journal {} within {wait:?}; retry",
                j.url
            ))),
        }
    }

    /// Starts [`Coordinator::write_journal`] on a thread of its own: on the RPCs' runtime a
    /// burst of thousands of requests (every rank leasing after a rendezvous) queued ahead of
    /// each of the writer's wake-ups, and a write the RPCs were waiting for took 0.5 s.
    fn spawn_journal_writer(self: Arc<Self>) -> Result<JournalWriter> {
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the journal writer's runtime")?;
        // Snapshot ids: a random start (no earlier coordinator's), then counting up.
        let first_id = journal::new_snapshot_id()?;
        let me = self.clone();
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || rt.block_on(me.write_journal(first_id, stopping)))
            .context("starting the journal writer's thread")?;
        Ok(JournalWriter {
            coord: self,
            stop,
            thread: Some(thread),
        })
    }

    /// Writes the journal whenever the books changed: at once when an RPC waits for it, else
    /// within `LAZY_WRITE_MS`; a snapshot of the whole book when one is due, else a delta of
    /// the lease book's changes (see [`journal`]). Runs until `stop` is set.
    async fn write_journal(self: Arc<Self>, mut next_id: u64, stop: Arc<AtomicBool>) {
        let Some(j) = self.journal.clone() else {
            return;
        };
        // Earlier coordinators' deltas, deleted once this one's first snapshot is written.
        let mut stale = j.list_deltas().await.unwrap_or_else(|e| {
            tracing::warn!("{e:#}; earlier journal deltas are left behind");
            Vec::new()
        });
        let lazy = Duration::from_millis(journal::LAZY_WRITE_MS);
        let mut gap = Duration::from_millis(journal::WRITE_GAP_MS);
        let mut failing = false;
        let mut last_start = Instant::now();
        let mut last_whole = Instant::now();
        // The latest snapshot written and the last delta tried after it (written or not).
        let mut current: Option<(u64, u64)> = None;
        // At start, and after a failed write, the next write is a snapshot: it holds
        // everything, the failed write's changes included.
        let mut whole_next = true;
        while !stop.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(lazy, self.journal_now.notified()).await;
            // Spacing the writes groups more changes into one.
            tokio::time::sleep_until((last_start + gap).into()).await;
            let t0 = Instant::now();
            last_start = t0;
            let next = {
                let mut book = self.lock();
                let changes = book.changes();
                if changes <= *self.journaled.borrow() {
                    None
                } else {
                    Some(match current {
                        Some((id, seq))
                            if !whole_next
                                && seq < journal::SNAPSHOT_EVERY
                                && !book.snapshot_due(last_whole.elapsed() >= lazy) =>
                        {
                            (
                                changes,
                                id,
                                seq + 1,
                                JournalWrite::Delta(book.take_shard_log()),
                            )
                        }
                        _ => {
                            let id = next_id;
                            next_id = next_id.wrapping_add(1);
                            let encoded = j.encode(&book, id);
                            book.encoded_whole();
                            (changes, id, 0, JournalWrite::Whole(encoded))
                        }
                    })
                }
            };
            let Some((changes, id, seq, write)) = next else {
                continue;
            };
            let bytes = match write {
                JournalWrite::Whole(encoded) => encoded,
                JournalWrite::Delta(ops) => j.encode_delta(id, seq, ops),
            };
            let encode_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
            let written = match bytes {
                Ok(bytes) if seq == 0 => j.write(bytes).await,
                Ok(bytes) => j.write_delta(id, seq, bytes).await,
                Err(e) => Err(e),
            };
            let write_s = t1.elapsed().as_secs_f64();
            self.journal_stat(|st| {
                st.writes += 1;
                st.last_write_bytes = len;
                st.encode_seconds_total += encode_s;
                st.write_seconds_total += write_s;
                st.write_seconds_max = st.write_seconds_max.max(write_s);
                if seq == 0 && written.is_ok() {
                    st.snapshots += 1;
                    st.last_snapshot_bytes = len;
                }
            });
            let replaced = match (seq, &written) {
                (0, Ok(())) => current.replace((id, 0)),
                (0, Err(_)) => None,
                _ => current.replace((id, seq)),
            };
            match written {
                Ok(()) => {
                    if failing {
                        tracing::info!(journal = %j.url, "journal written again");
                    }
                    failing = false;
                    whole_next = false;
                    gap = Duration::from_millis(match seq {
                        0 => journal::SNAPSHOT_GAP_MS,
                        _ => journal::WRITE_GAP_MS,
                    });
                    if seq == 0 {
                        last_whole = t0;
                        // The older snapshot's deltas are never read again. Only names
                        // fixed by now are deleted (the writer goes on meanwhile).
                        let mut old = std::mem::take(&mut stale);
                        if let Some((old_id, n)) = replaced {
                            old.extend((1..=n).map(|s| j.delta_url(old_id, s)));
                        }
                        if !old.is_empty() {
                            let j = j.clone();
                            tokio::spawn(async move {
                                if let Err(e) = j.remove(&old).await {
                                    tracing::warn!("{e:#}; old journal deltas left behind");
                                }
                            });
                        }
                    }
                    self.journaled.send_replace(changes);
                }
                Err(e) => {
                    if !failing {
                        tracing::error!("{e:#}; retrying (RPCs that need it wait)");
                    }
                    failing = true;
                    whole_next = true;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.journal_now.notify_one();
                }
            }
        }
    }

    fn journal_stat(&self, f: impl FnOnce(&mut contrail_common::status::JournalStatus)) {
        f(&mut self.journal_stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Writes the books' pending scalars to the TensorBoard event files every
    /// `tensorboard::FLUSH_MS` until `stop` resolves, then once more. Nothing without
    /// `log.tensorboard`.
    async fn write_tensorboard(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let dir = &self.cfg.log.tensorboard;
        if dir.is_empty() {
            return;
        }
        let mut writer = tensorboard::EventWriter::new(dir, &self.cfg.data.s3_endpoint);
        tracing::info!(file = %writer.url(), "writing TensorBoard events");
        let mut failing = false;
        tokio::pin!(stop);
        loop {
            let stopping = tokio::select! {
                _ = &mut stop => true,
                _ = tokio::time::sleep(Duration::from_millis(tensorboard::FLUSH_MS)) => false,
            };
            let scalars = self.lock().take_scalars();
            match writer.append(&scalars).await {
                Ok(()) if failing => {
                    tracing::info!("TensorBoard events written again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!("{e:#}; retrying at the next flush");
                    }
                    failing = true;
                }
            }
            if stopping {
                break;
            }
        }
    }

    pub fn config(&self) -> &JobConfig {
        &self.cfg
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, JobBook> {
        // A panic while holding the lock leaves consistent-enough books for status and
        // shutdown; refusing every later RPC would be worse.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the books at the current time (after housekeeping) and publishes any
    /// change of the job state.
    pub(crate) fn with_book<R>(&self, f: impl FnOnce(&mut JobBook, u64) -> R) -> R {
        let now = self.now_ms();
        let mut book = self.lock();
        let last = self.housekept_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now >= last + HOUSEKEEPING_EVERY_MS {
            book.tick(now);
            self.housekept_ms
                .store(now, std::sync::atomic::Ordering::Relaxed);
        }
        let out = f(&mut book, now);
        let state = book.state();
        drop(book);
        self.state_tx.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
        out
    }

    pub fn status(&self) -> StatusReport {
        let mut r = self.with_book(|b, now| b.status(now));
        if self.journal.is_some() {
            r.journal = Some(
                self.journal_stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            );
        }
        r
    }

    /// Follows the job state (waiting_for_workers → running → finished | failed).
    pub fn watch_state(&self) -> watch::Receiver<JobState> {
        self.state_tx.subscribe()
    }

    /// Resolves when the job ends: Ok when it finished, Err with the reason when it failed.
    pub async fn wait_for_end(&self) -> Result<()> {
        let mut rx = self.watch_state();
        let state = *rx
            .wait_for(|s| s.is_terminal())
            .await
            .context("coordinator dropped while waiting for the job to end")?;
        match state {
            JobState::Finished => Ok(()),
            _ => bail!("job failed: {}", self.lock().reason()),
        }
    }

    /// Serves gRPC on `grpc` and HTTP status on `http` until `shutdown` resolves, running the
    /// lease-expiry and dead-worker checks in the background. `access` says who may call.
    pub async fn serve(
        self: Arc<Self>,
        grpc: tokio::net::TcpListener,
        http: tokio::net::TcpListener,
        access: access::Access,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        // Checks at twice the heartbeat rate so a dead worker is noticed within a heartbeat
        // of its timeout, without relying on other RPCs to arrive.
        let reaper = {
            let me = self.clone();
            let period = Duration::from_millis((self.cfg.cluster.heartbeat_ms / 2).max(10));
            let stop = stopped(stop_rx.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tick.tick() => {
                            me.with_book(|_, _| ());
                            me.roll_back_if_due().await;
                        }
                    }
                }
            })
        };

        let journal_writer = self.clone().spawn_journal_writer()?;
        let events_writer = tokio::spawn(self.clone().write_tensorboard(stopped(stop_rx.clone())));

        let grpc_addr = grpc
            .local_addr()
            .context("reading the gRPC listener's address")?;
        let http_addr = http
            .local_addr()
            .context("reading the HTTP listener's address")?;
        tracing::info!(%grpc_addr, %http_addr, "coordinator serving");
        let grpc_server = tonic::transport::Server::builder()
            .add_service(
                service::CoordinatorService::new(self.clone())
                    .into_server_with(access.grpc_interceptor()),
            )
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY a reply written while the previous one on the
                // connection is unacknowledged waits for the peer's delayed ACK (~40 ms).
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            );
        let http_server = axum::serve(
            http,
            http::router(self.clone(), access.status_token.clone()),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()));
        // The first server to fail stops the other (dropping it closes its listener).
        let served = tokio::try_join!(
            async {
                grpc_server
                    .await
                    .with_context(|| format!("gRPC server on {grpc_addr}"))
            },
            async {
                http_server
                    .await
                    .with_context(|| format!("HTTP status server on {http_addr}"))
            },
        );
        reaper.abort();
        // The last changes (the job's end, the last step reports) reach the journal whole
        // before the coordinator exits.
        self.lock().journal_whole();
        if self.durable().await.is_err() {
            tracing::warn!("the journal may miss the last changes");
        }
        journal_writer.stop().await;
        // The last scalars (the end of training, the final evaluation) reach the event file.
        // Bounded: storage that stopped answering must not keep the coordinator from exiting.
        if tokio::time::timeout(Duration::from_secs(10), events_writer)
            .await
            .is_err()
        {
            tracing::warn!("the TensorBoard event file may miss the last scalars");
        }
        served.map(|_| ())
    }
}

/// The journal writer's thread; stopped (and joined, its current write finished) by
/// [`JournalWriter::stop`].
struct JournalWriter {
    coord: Arc<Coordinator>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JournalWriter {
    /// Stops the writer and waits for its thread (off the async runtime: a write in flight
    /// finishes first).
    async fn stop(mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || t.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the journal writer panicked");
            }
        }
    }

    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.coord.journal_now.notify_one();
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// One journal write: a snapshot (encoded under the books' lock), or the lease book's
/// changes since the last write (encoded after it).
enum JournalWrite {
    Whole(Result<Vec<u8>>),
    Delta(Vec<leases::ShardOp>),
}

/// The books of a job starting (or resuming from a checkpoint) on `shards`; an empty listing
/// is an error.
fn fresh_book(
    cfg: &JobConfig,
    job_toml: String,
    shards: Vec<String>,
    resume: Option<(String, CheckpointMeta)>,
) -> Result<JobBook> {
    if shards.is_empty() {
        bail!(
            "data.url = {} lists no .tar shards; point it at a shard prefix or a brace \
             pattern such as s3://bucket/data-{{000000..000099}}.tar",
            cfg.data.url
        );
    }
    tracing::info!(
        shards = shards.len(),
        world_size = cfg.cluster.world_size,
        "coordinator ready"
    );
    Ok(JobBook::new(cfg.clone(), job_toml, shards, resume))
}

/// Runs a job's coordinator until the job ends or Ctrl-C: binds `cluster.grpc_addr` and
/// `cluster.http_addr` (or adopts the sockets its parent bound there, [`listeners`]), serves,
/// prints the final status. Returns the process exit code: 0 when the job finished, 1 when it
/// failed, 130 when interrupted.
pub async fn run_standalone(cfg: JobConfig) -> Result<i32> {
    let access = access::Access::with_job_token(
        contrail_common::auth::JobToken::require_env().context("the coordinator's job token")?,
    );
    // Workers get the effective config, overrides included.
    let job_toml = cfg.to_toml();
    let (grpc, http) = listeners::listeners(&cfg).await?;
    // After a failure, keep answering long enough for every survivor's next heartbeat to
    // learn why it must stop; after success, just long enough to flush the last replies.
    // Twice the worker timeout, so a worker that died at the moment of failure is still
    // declared dead (and its leases returned) while status is being served.
    let failure_grace = Duration::from_millis(cfg.cluster.worker_timeout_ms * 2);
    let finish_grace = Duration::from_millis(cfg.cluster.heartbeat_ms * 2);

    let coord = Coordinator::new(cfg, job_toml, access.job_token.as_ref()).await?;
    let (interrupted_tx, mut interrupted_rx) = tokio::sync::watch::channel(false);
    let watcher = coord.clone();
    let shutdown = async move {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                if let Err(e) = r {
                    tracing::error!("cannot listen for Ctrl-C: {e}");
                    std::future::pending::<()>().await;
                }
                tracing::warn!("interrupted; shutting down");
                let _ = interrupted_tx.send(true);
            }
            end = watcher.wait_for_end() => {
                tokio::time::sleep(if end.is_ok() { finish_grace } else { failure_grace }).await;
            }
        }
    };
    coord.clone().serve(grpc, http, access, shutdown).await?;

    let status = coord.status();
    println!("{}", contrail_common::status::render_status_text(&status));
    if *interrupted_rx.borrow_and_update() {
        return Ok(130);
    }
    Ok(match status.state {
        JobState::Finished => 0,
        _ => 1,
    })
}
