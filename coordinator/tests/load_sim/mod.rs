//! A load generator for the coordinator: many simulated ranks on few nodes drive the real
//! `contrail-coordinator` binary (job token and journal on) through a whole job: registration,
//! rendezvous, heartbeats every `heartbeat_ms`, shard leases and completions for a few epochs,
//! one node lost mid-epoch and replaced by a new one. No libtorch: a rank's "training" is a
//! sleep per shard.
//!
//! The simulated ranks follow the worker's protocol: a lost peer (`peer_lost` in a heartbeat
//! reply) or a waiting replacement (`regroup`) makes them rendezvous again; a rank that finds
//! an epoch exhausted waits at an epoch gate for every member of its generation (the in-band
//! epoch agreement of real workers), and goes back to leasing the epoch if it had to regroup
//! meanwhile, since a dead node's leases return to the epoch's pool.
//!
//! What it checks, from the ranks' side: no shard of an epoch is leased to a live rank while
//! another live rank holds it, and every shard of every epoch is completed. What it measures:
//! latency per RPC kind, the coordinator's CPU time and peak memory, its journal (bytes and
//! write time, from `/metrics`), and the time from the node's loss to the survivors' next
//! generation. Shared by `tests/load.rs` (CI-sized) and `examples/load_gen.rs` (2,000 ranks).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use contrail_common::auth::{GrpcProof, JobToken, TOKEN_ENV};
use contrail_common::proto::{self, coordinator_client::CoordinatorClient};
use tokio::sync::Notify;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

type Client = CoordinatorClient<InterceptedService<Channel, GrpcProof>>;

/// The shape and pace of one simulated job.
#[derive(Debug, Clone)]
pub struct Load {
    pub nodes: usize,
    pub ranks_per_node: usize,
    pub shards: usize,
    pub epochs: u32,
    pub heartbeat_ms: u64,
    pub worker_timeout_ms: u64,
    /// Simulated training time per shard.
    pub shard_ms: u64,
    /// The node lost (all its ranks stop at once) once this fraction of epoch 0's shards is
    /// complete; a replacement node registers right after.
    pub kill_at: f64,
    /// Journal the coordinator's state (`cluster.journal_url`), as a real job does.
    pub journal: bool,
    /// Every rank heartbeats at the same instants (on a timer started at rendezvous), as
    /// workers did before they drew a random phase; otherwise each rank's first beat comes
    /// at its own fraction of the period and the next a period after each reply, as a
    /// worker's (`worker::process::coordinated::heartbeat_loop`).
    pub lockstep_heartbeats: bool,
}

impl Load {
    pub fn ranks(&self) -> usize {
        self.nodes * self.ranks_per_node
    }
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Report {
    /// RPC kind → latencies in seconds.
    pub latencies: BTreeMap<&'static str, Vec<f64>>,
    /// RPC kind → (seconds into the run when the call started, its latency), for the
    /// latency over time.
    pub timeline: BTreeMap<&'static str, Vec<(f64, f64)>>,
    pub wall_s: f64,
    pub coordinator_cpu_s: f64,
    pub coordinator_peak_rss_mib: f64,
    pub journal_writes: f64,
    pub journal_snapshots: f64,
    pub journal_bytes: f64,
    pub journal_encode_seconds_total: f64,
    pub journal_write_seconds_total: f64,
    pub journal_write_seconds_max: f64,
    /// From the node's loss to the first survivor's rendezvous in the next generation.
    pub loss_to_regroup_s: f64,
    /// From the node's loss to the last survivor's.
    pub loss_to_all_regrouped_s: f64,
    /// A shard leased to a live rank while another live rank held it.
    pub double_leases: Vec<String>,
    /// (epoch, shard) never completed.
    pub lost: Vec<String>,
    pub completed: usize,
    pub duplicate_completions: usize,
    pub coordinator_exit: Option<i32>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

impl Report {
    /// (p50, p99, max, count) of an RPC kind, in milliseconds.
    pub fn latency_ms(&self, kind: &str) -> (f64, f64, f64, usize) {
        let mut v = self.latencies.get(kind).cloned().unwrap_or_default();
        v.sort_by(f64::total_cmp);
        (
            percentile(&v, 0.5) * 1e3,
            percentile(&v, 0.99) * 1e3,
            v.last().copied().unwrap_or(f64::NAN) * 1e3,
            v.len(),
        )
    }

    /// (p99 ms, calls) of an RPC kind per `window_s` of the run.
    pub fn windows(&self, kind: &str, window_s: f64) -> Vec<(f64, usize)> {
        let mut by: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for (at, l) in self.timeline.get(kind).into_iter().flatten() {
            by.entry((at / window_s) as usize).or_default().push(*l);
        }
        let last = by.keys().next_back().copied().unwrap_or(0);
        (0..=last)
            .map(|w| {
                let mut v = by.remove(&w).unwrap_or_default();
                v.sort_by(f64::total_cmp);
                (percentile(&v, 0.99) * 1e3, v.len())
            })
            .collect()
    }

    pub fn print(&self, load: &Load) {
        println!(
            "coordinator load: {} ranks on {} nodes, {} shards x {} epochs, heartbeat {} ms, \
             {} ms per shard; wall {:.1} s",
            load.ranks(),
            load.nodes,
            load.shards,
            load.epochs,
            load.heartbeat_ms,
            load.shard_ms,
            self.wall_s
        );
        println!("| RPC | calls | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|");
        for kind in self.latencies.keys() {
            let (p50, p99, max, n) = self.latency_ms(kind);
            println!("| {kind} | {n} | {p50:.2} | {p99:.2} | {max:.1} |");
        }
        println!("p99 ms per 5 s of the run (calls started in it):");
        for kind in ["Heartbeat", "LeaseShard", "CompleteShard"] {
            let line: Vec<String> = self
                .windows(kind, 5.0)
                .iter()
                .map(|(p99, n)| format!("{p99:.0}({n})"))
                .collect();
            println!("  {kind}: {}", line.join(" "));
        }
        println!(
            "coordinator: {:.1} s CPU over {:.1} s wall ({:.0}% of one core), peak RSS {:.0} MiB",
            self.coordinator_cpu_s,
            self.wall_s,
            100.0 * self.coordinator_cpu_s / self.wall_s,
            self.coordinator_peak_rss_mib
        );
        if load.journal {
            println!(
                "journal: {:.0} writes ({:.0} snapshots), last {:.1} MiB, encode mean {:.1} ms, \
                 write mean {:.1} ms max {:.1} ms",
                self.journal_writes,
                self.journal_snapshots,
                self.journal_bytes / (1 << 20) as f64,
                1e3 * self.journal_encode_seconds_total / self.journal_writes.max(1.0),
                1e3 * self.journal_write_seconds_total / self.journal_writes.max(1.0),
                1e3 * self.journal_write_seconds_max
            );
        } else {
            println!("journal: off");
        }
        println!(
            "node lost -> next generation: first survivor {:.2} s, last {:.2} s (includes \
             worker_timeout_ms = {} ms to declare it dead)",
            self.loss_to_regroup_s, self.loss_to_all_regrouped_s, load.worker_timeout_ms
        );
        println!(
            "shards completed {} (duplicates {}), double leases {}, lost {}, coordinator exit \
             {:?}",
            self.completed,
            self.duplicate_completions,
            self.double_leases.len(),
            self.lost.len(),
            self.coordinator_exit
        );
    }
}

/// Runs `load` against `coordinator_bin` in a scratch folder under `work`.
pub async fn run(load: &Load, coordinator_bin: &Path, work: &Path) -> Result<Report> {
    let dir = work.join(format!("contrail-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run_in(load, coordinator_bin, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn job_file(load: &Load, dir: &Path) -> Result<PathBuf> {
    let ranks = load.ranks();
    let text = format!(
        "[data]\nurl = \"file://{dir}/data/shard-{{{first:06}..{last:06}}}.tar\"\n\
         [checkpoint]\nurl = \"\"\n\
         [train]\nepochs = {epochs}\nmicro_batch = 1\nglobal_batch = {ranks}\n\
         [cluster]\nworld_size = {ranks}\nlocal_ranks = {per}\nmin_workers = {min}\n\
         heartbeat_ms = {hb}\nworker_timeout_ms = {wt}\nlease_ttl_ms = {ttl}\n\
         replacement_wait_ms = 600000\ncollective_timeout_ms = 600000\n\
         coordinator_timeout_ms = 600000\njournal_url = \"{journal}\"\n",
        dir = dir.display(),
        first = 0,
        last = load.shards - 1,
        epochs = load.epochs,
        per = load.ranks_per_node,
        min = ranks - load.ranks_per_node,
        hb = load.heartbeat_ms,
        wt = load.worker_timeout_ms,
        ttl = (load.worker_timeout_ms * 4).max(10_000),
        journal = if load.journal {
            format!("file://{}/journal.json", dir.display())
        } else {
            "off".into()
        },
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Everything the simulated ranks share.
struct Shared {
    load: Load,
    started: Instant,
    latencies: Mutex<HashMap<&'static str, Vec<(f64, f64)>>>,
    /// (epoch, shard url) → the worker id holding a lease on it and the generation it was
    /// granted in (a regroup voids every lease of the generation before: the members restart
    /// their data feeds, and the coordinator returns what they held to the pool).
    held: Mutex<HashMap<(u32, String), (u64, u64)>>,
    double: Mutex<Vec<String>>,
    completed: Mutex<HashMap<(u32, String), usize>>,
    /// Worker ids of the ranks stopped with their node.
    dead: Mutex<HashSet<u64>>,
    /// Shards completed in epoch 0 (to time the node's loss).
    epoch0_done: AtomicU64,
    killed_at: Mutex<Option<Instant>>,
    /// When a survivor's regroup rendezvous answered, and the generation it got.
    regrouped_at: Mutex<Vec<(Instant, u64)>>,
    /// Generations one of whose members was told to regroup (a lost peer, a waiting
    /// replacement): every member stops at its next step, as real ranks agree in-band.
    regroup_asked: Mutex<HashSet<u64>>,
    gate: Gate,
}

impl Shared {
    fn ask_regroup(&self, generation: u64) {
        self.regroup_asked.lock().unwrap().insert(generation);
    }

    fn regroup_asked(&self, generation: u64) -> bool {
        self.regroup_asked.lock().unwrap().contains(&generation)
    }

    fn record(&self, kind: &'static str, since: Instant) {
        let s = since.elapsed().as_secs_f64();
        let at = (since - self.started).as_secs_f64();
        self.latencies
            .lock()
            .unwrap()
            .entry(kind)
            .or_default()
            .push((at, s));
    }
}

/// The epoch agreement real ranks reach in-band: a rank out of shards for an epoch moves on
/// only once every member of its generation is.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    opened: Notify,
}

#[derive(Default)]
struct GateState {
    /// (generation, epoch) → ranks that arrived.
    arrived: HashMap<(u64, u32), HashSet<u64>>,
    /// Gates already opened.
    open: HashSet<(u64, u32)>,
    /// The epoch the members train now (the last opened gate's + 1): where a replacement
    /// starts, as it takes the epoch from its peers.
    current: u32,
}

impl Gate {
    fn current_epoch(&self) -> u32 {
        self.state.lock().unwrap().current
    }

    /// Arrives; true once the gate is open for (generation, epoch) with `world` members. A
    /// generation asked to regroup (`regrouping`, read under the gate's lock) opens no more
    /// gates: as with real ranks, whose epoch end and regroup flag ride the same all-gather,
    /// its members then all go on in the next generation, none a step ahead.
    fn arrive(
        &self,
        generation: u64,
        epoch: u32,
        world: usize,
        worker: u64,
        regrouping: &dyn Fn() -> bool,
    ) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.open.contains(&(generation, epoch)) {
            return true;
        }
        let set = st.arrived.entry((generation, epoch)).or_default();
        set.insert(worker);
        if set.len() >= world && !regrouping() {
            st.open.insert((generation, epoch));
            st.current = st.current.max(epoch + 1);
            self.opened.notify_waiters();
            return true;
        }
        false
    }
}

async fn connect(addr: &str, token: &JobToken) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
        match endpoint.connect().await {
            Ok(c) => {
                return Ok(CoordinatorClient::with_interceptor(
                    c,
                    GrpcProof::new(Some(token.clone())),
                ))
            }
            Err(e) if Instant::now() > deadline => bail!("coordinator at {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn run_in(load: &Load, bin: &Path, dir: &Path) -> Result<Report> {
    let job = job_file(load, dir)?;
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let http = format!("127.0.0.1:{}", free_port()?);
    let token = JobToken::generate()?;
    let mut child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&job)
        .args(["--grpc-addr", &grpc, "--http-addr", &http])
        .env(TOKEN_ENV, token.expose())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            dir.join("coordinator.log"),
        )?))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("the coordinator's pid")?;
    let shared = Arc::new(Shared {
        load: load.clone(),
        started: Instant::now(),
        latencies: Mutex::default(),
        held: Mutex::default(),
        double: Mutex::default(),
        completed: Mutex::default(),
        dead: Mutex::default(),
        epoch0_done: AtomicU64::new(0),
        killed_at: Mutex::new(None),
        regrouped_at: Mutex::default(),
        regroup_asked: Mutex::default(),
        gate: Gate::default(),
    });
    // One gRPC connection per node, as its ranks' requests would share a host's link.
    let mut channels = Vec::new();
    for _ in 0..=load.nodes {
        channels.push(connect(&grpc, &token).await?);
    }
    let mut tasks = Vec::new();
    let mut node_stops = Vec::new();
    for (node, channel) in channels.iter().enumerate().take(load.nodes) {
        let stop = Arc::new(AtomicBool::new(false));
        node_stops.push(stop.clone());
        for local in 0..load.ranks_per_node {
            let (client, shared, stop) = (channel.clone(), shared.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                rank(client, shared, node, local, stop).await
            }));
        }
    }
    // The node loss: the last node, once enough of epoch 0 is done; then its replacement.
    let kill_after = (load.shards as f64 * load.kill_at) as u64;
    while shared.epoch0_done.load(Ordering::Relaxed) < kill_after {
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let victim = load.nodes - 1;
    node_stops[victim].store(true, Ordering::SeqCst);
    *shared.killed_at.lock().unwrap() = Some(Instant::now());
    let replacement_stop = Arc::new(AtomicBool::new(false));
    // The replacement node's index comes after the original nodes'.
    let replacement = load.nodes;
    for local in 0..load.ranks_per_node {
        let (client, shared, stop) = (
            channels[load.nodes].clone(),
            shared.clone(),
            replacement_stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            rank(client, shared, replacement, local, stop).await
        }));
    }
    let progress = {
        let shared = shared.clone();
        let http = http.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let status = scrape_path(&http, "/status").await.unwrap_or_default();
                let body = status.split("\r\n\r\n").nth(1).unwrap_or("");
                let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                eprintln!(
                    "[load {:.0} s] completed {}, regroups {}, coordinator: {} gen {} epoch {} shards {}",
                    shared.started.elapsed().as_secs_f64(),
                    shared.completed.lock().unwrap().len(),
                    shared.regrouped_at.lock().unwrap().len(),
                    v["state"], v["generation"], v["epoch"], v["shards"]
                );
            }
        })
    };
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("a rank task panicked: {e}")),
        }
    }
    progress.abort();
    let wall_s = shared.started.elapsed().as_secs_f64();
    let metrics = scrape(&http).await.unwrap_or_default();
    let (cpu, rss) = process_usage(pid);
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|s| s.code());
    if !errors.is_empty() {
        let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
        bail!(
            "{} simulated rank(s) failed, first: {}\ncoordinator log (last lines, newest first):\n{tail}",
            errors.len(),
            errors[0]
        );
    }
    let completed = shared.completed.lock().unwrap();
    let mut lost = Vec::new();
    for epoch in 0..load.epochs {
        for s in 0..load.shards {
            let url = shard_url(dir, s);
            if !completed.contains_key(&(epoch, url.clone())) {
                lost.push(format!("epoch {epoch} {url}"));
            }
        }
    }
    let killed = shared.killed_at.lock().unwrap().expect("the node was lost");
    let regrouped = shared.regrouped_at.lock().unwrap().clone();
    // The first generation formed after the loss (a later one takes in the replacement).
    let next = regrouped
        .iter()
        .filter(|(t, _)| *t > killed)
        .map(|(_, g)| *g)
        .min();
    let after: Vec<f64> = regrouped
        .iter()
        .filter(|(t, g)| *t > killed && Some(*g) == next)
        .map(|(t, _)| (*t - killed).as_secs_f64())
        .collect();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let timeline: BTreeMap<&'static str, Vec<(f64, f64)>> = shared
        .latencies
        .lock()
        .unwrap()
        .clone()
        .into_iter()
        .collect();
    let latencies = timeline
        .iter()
        .map(|(k, v)| (*k, v.iter().map(|(_, l)| *l).collect()))
        .collect();
    let double_leases = shared.double.lock().unwrap().clone();
    Ok(Report {
        latencies,
        timeline,
        wall_s,
        coordinator_cpu_s: cpu,
        coordinator_peak_rss_mib: rss,
        journal_writes: metric("contrail_journal_writes_total"),
        journal_snapshots: metric("contrail_journal_snapshots_total"),
        journal_bytes: metric("contrail_journal_last_write_bytes"),
        journal_encode_seconds_total: metric("contrail_journal_encode_seconds_total"),
        journal_write_seconds_total: metric("contrail_journal_write_seconds_total"),
        journal_write_seconds_max: metric("contrail_journal_write_seconds_max"),
        loss_to_regroup_s: after.iter().copied().fold(f64::NAN, f64::min),
        loss_to_all_regrouped_s: after.iter().copied().fold(f64::NAN, f64::max),
        double_leases,
        lost,
        completed: completed.values().sum(),
        duplicate_completions: completed.values().filter(|&&n| n > 1).count(),
        coordinator_exit: exit,
    })
}

fn shard_url(dir: &Path, s: usize) -> String {
    format!("file://{}/data/shard-{s:06}.tar", dir.display())
}

async fn scrape(http: &str) -> Result<String> {
    scrape_path(http, "/metrics").await
}

async fn scrape_path(http: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: load\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// (CPU seconds, peak resident MiB) of a process, from /proc.
fn process_usage(pid: u32) -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = rest.get(11)?.parse().ok()?;
            let stime: f64 = rest.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(f64::NAN);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let kb: f64 = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kb / 1024.0)
        })
        .unwrap_or(f64::NAN);
    (cpu, rss)
}

/// One rank's place in its current generation.
struct Place {
    worker_id: u64,
    generation: u64,
    world: usize,
    /// A replacement joining a running job.
    joining: bool,
}

/// Retries an RPC while the coordinator answers UNAVAILABLE (its journal write is slow).
macro_rules! rpc {
    ($shared:expr, $kind:literal, $call:expr) => {{
        let mut tries = 0;
        loop {
            let t0 = Instant::now();
            let r = $call.await;
            $shared.record($kind, t0);
            match r {
                Err(s) if s.code() == tonic::Code::Unavailable && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other,
            }
        }
    }};
}

async fn rendezvous(
    client: &mut Client,
    shared: &Shared,
    worker_id: u64,
    generation: u64,
    after: u64,
) -> Result<Place> {
    let rv = rpc!(
        shared,
        "Rendezvous",
        client.rendezvous(proto::RendezvousRequest {
            worker_id,
            generation,
            after_generation: after,
            ..Default::default()
        })
    )
    .map_err(|s| anyhow!("rendezvous: {s}"))?
    .into_inner();
    if after > 0 {
        shared
            .regrouped_at
            .lock()
            .unwrap()
            .push((Instant::now(), rv.generation));
    }
    Ok(Place {
        worker_id,
        generation: rv.generation,
        world: rv.world_size as usize,
        joining: rv.joining,
    })
}

/// One simulated rank: registers, rendezvous, heartbeats, and leases shards epoch by epoch
/// until the job is done or its node is stopped.
async fn rank(
    mut client: Client,
    shared: Arc<Shared>,
    node: usize,
    local: usize,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let load = shared.load.clone();
    // A replacement started while the lost node is not yet declared dead is refused (the
    // world is full) and tries again, as a restarted pod would.
    let refused_until = Instant::now() + Duration::from_secs(120);
    let reg = loop {
        let r = rpc!(
            shared,
            "Register",
            client.register(proto::RegisterRequest {
                host: format!("node-{node}"),
                collective_address: format!("10.0.{}.{}:{}", node / 250, node % 250, 40000 + local),
                instance: ((node as u64) << 16) | local as u64 | 1 << 40,
                node: format!("node-{node}"),
                local_rank: local as u32,
                local_ranks: load.ranks_per_node as u32,
            })
        );
        match r {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::ResourceExhausted && Instant::now() < refused_until =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => bail!("register: {s}"),
        }
    };
    let mut place = rendezvous(&mut client, &shared, reg.worker_id, reg.generation, 0).await?;
    // Heartbeats on their own task, as a worker's heartbeat thread; they ask the generation
    // to regroup.
    let gen_now = Arc::new(AtomicU64::new(place.generation));
    let hb = {
        let (mut client, shared, stop, gen_now) = (
            client.clone(),
            shared.clone(),
            stop.clone(),
            gen_now.clone(),
        );
        let worker_id = reg.worker_id;
        let every = Duration::from_millis(load.heartbeat_ms);
        // Spread over the period by the rank's place (golden-ratio steps: any prefix of the
        // ranks is spread evenly).
        let phase = ((node * load.ranks_per_node + local) as f64 * 0.618_033_988_7).fract();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            if !load.lockstep_heartbeats {
                tokio::time::sleep(every.mul_f64(phase)).await;
            }
            loop {
                if load.lockstep_heartbeats {
                    tick.tick().await;
                }
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                // The reply is about the generation sent, not one formed meanwhile.
                let generation = gen_now.load(Ordering::SeqCst);
                let r = rpc!(
                    shared,
                    "Heartbeat",
                    client.heartbeat(proto::HeartbeatRequest {
                        worker_id,
                        generation,
                        state: "training".into(),
                        ..Default::default()
                    })
                );
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.stop {
                            return;
                        }
                        if r.peer_lost || r.regroup {
                            shared.ask_regroup(generation);
                        }
                    }
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                        shared.ask_regroup(generation);
                    }
                    Err(_) => {}
                }
                if !load.lockstep_heartbeats {
                    tokio::time::sleep(every).await;
                }
            }
        })
    };
    let first_epoch = if place.joining {
        shared.gate.current_epoch()
    } else {
        0
    };
    let result = lease_epochs(
        &mut client,
        &shared,
        &mut place,
        first_epoch,
        (&gen_now, &stop),
    )
    .await;
    hb.abort();
    if stop.load(Ordering::SeqCst) {
        // A lost node: no goodbye, its ranks just fall silent.
        return Ok(());
    }
    result?;
    let _ = rpc!(
        shared,
        "Leave",
        client.leave(proto::LeaveRequest {
            worker_id: place.worker_id,
            generation: place.generation,
            finished: true,
            error: String::new(),
        })
    );
    Ok(())
}

async fn regroup_now(
    client: &mut Client,
    shared: &Shared,
    place: &mut Place,
    gen_now: &AtomicU64,
) -> Result<()> {
    *place = rendezvous(
        client,
        shared,
        place.worker_id,
        place.generation,
        place.generation,
    )
    .await?;
    gen_now.store(place.generation, Ordering::SeqCst);
    Ok(())
}

/// Leases and completes shards from `first_epoch` on; `flags` are the rank's current
/// generation (for the heartbeats) and its node's stop.
async fn lease_epochs(
    client: &mut Client,
    shared: &Shared,
    place: &mut Place,
    first_epoch: u32,
    flags: (&AtomicU64, &AtomicBool),
) -> Result<()> {
    let (gen_now, stop) = flags;
    let load = &shared.load;
    let mut request = 0u64;
    for epoch in first_epoch..load.epochs {
        'epoch: loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if shared.regroup_asked(place.generation) {
                regroup_now(client, shared, place, gen_now).await?;
            }
            request += 1;
            let r = rpc!(
                shared,
                "LeaseShard",
                client.lease_shard(proto::LeaseRequest {
                    worker_id: place.worker_id,
                    generation: place.generation,
                    epoch,
                    request_id: place.worker_id << 32 | request,
                })
            );
            let lease = match r {
                Ok(l) => l.into_inner(),
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    shared.ask_regroup(place.generation);
                    continue;
                }
                Err(s) => bail!("lease: {s}"),
            };
            if lease.exhausted {
                // The in-band epoch agreement: wait for the generation, or regroup and lease on.
                loop {
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let notified = shared.gate.opened.notified();
                    let generation = place.generation;
                    let arrive = || {
                        shared
                            .gate
                            .arrive(generation, epoch, place.world, place.worker_id, &|| {
                                shared.regroup_asked(generation)
                            })
                    };
                    if arrive() {
                        break 'epoch;
                    }
                    if shared.regroup_asked(generation) {
                        // The gate may have opened since the look above (before the regroup was
                        // asked): then every member went on, and so does this one.
                        if arrive() {
                            break 'epoch;
                        }
                        continue 'epoch;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                }
            }
            let key = (epoch, lease.shard_url.clone());
            let mine = (place.worker_id, place.generation);
            {
                let dead = shared.dead.lock().unwrap();
                let mut held = shared.held.lock().unwrap();
                if let Some(&(other, granted_in)) = held.get(&key) {
                    if other != place.worker_id
                        && granted_in == place.generation
                        && !dead.contains(&other)
                    {
                        shared.double.lock().unwrap().push(format!(
                            "epoch {epoch} {} leased to worker {} while worker {other} held it \
                             (generation {granted_in})",
                            lease.shard_url, place.worker_id
                        ));
                    }
                }
                held.insert(key.clone(), mine);
            }
            tokio::time::sleep(Duration::from_millis(load.shard_ms)).await;
            if stop.load(Ordering::SeqCst) {
                shared.dead.lock().unwrap().insert(place.worker_id);
                return Ok(());
            }
            // Told to regroup while reading: the feed restarts and the shard is dropped (the
            // coordinator returned it to the pool when the new generation formed).
            let abandon = |shared: &Shared| {
                let mut held = shared.held.lock().unwrap();
                if held.get(&key) == Some(&mine) {
                    held.remove(&key);
                }
            };
            if shared.regroup_asked(place.generation) {
                abandon(shared);
                continue;
            }
            let r = rpc!(
                shared,
                "CompleteShard",
                client.complete_shard(proto::CompleteRequest {
                    worker_id: place.worker_id,
                    generation: place.generation,
                    lease_id: lease.lease_id,
                    samples: 1,
                    ..Default::default()
                })
            );
            match r {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    abandon(shared);
                    shared.ask_regroup(place.generation);
                    continue;
                }
                Err(s) => bail!("complete: {s}"),
            }
            shared.held.lock().unwrap().remove(&key);
            *shared.completed.lock().unwrap().entry(key).or_default() += 1;
            if epoch == 0 {
                shared.epoch0_done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}
