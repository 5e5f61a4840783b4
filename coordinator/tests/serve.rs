//! The coordinator served on 127.0.0.1:0, driven by fake workers over gRPC, watched over HTTP.

mod common;

use contrail_common::auth::{GrpcProof, JobToken};
use contrail_common::checkpoint::{join_url, write_bytes, CheckpointMeta, LATEST};
use contrail_common::config::JobConfig;
use contrail_common::experts::{BlockPlacement, ExpertPlacement};
use contrail_common::proto::{self, coordinator_client::CoordinatorClient};
use contrail_common::shards::{epoch_order, ShardStateSnapshot};
use contrail_common::status::{JobState, StatusReport, WorkerLiveness};
use contrail_common::storage::list_shards;
use contrail_coordinator::access::Access;
use contrail_coordinator::Coordinator;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A client whose calls carry proofs made with one token (or none).
type Client = CoordinatorClient<InterceptedService<Channel, GrpcProof>>;

/// The job token of every coordinator these tests serve.
fn job_token() -> JobToken {
    JobToken::parse("the-token-of-the-served-test-job").unwrap()
}

const SHARDS: usize = 4;

fn config(data_url: &str, checkpoint_url: &str) -> JobConfig {
    let mut cfg = JobConfig::default();
    cfg.data.url = data_url.into();
    cfg.checkpoint.url = checkpoint_url.into();
    cfg.cluster.world_size = 2;
    cfg.cluster.heartbeat_ms = 50;
    cfg.cluster.worker_timeout_ms = 400;
    cfg.cluster.lease_ttl_ms = 300;
    cfg.train.micro_batch = 4;
    cfg.train.global_batch = 8;
    cfg.train.epochs = 1;
    cfg.validate().expect("test config is valid");
    cfg
}

/// Writes `SHARDS` tiny (empty-archive) tar files under `memory://{prefix}/data`.
async fn write_shards(prefix: &str) -> String {
    let base = format!("memory://{prefix}/data");
    for i in 0..SHARDS {
        // Two zero blocks: an empty but well-formed tar archive.
        write_bytes(&format!("{base}/shard-{i:02}.tar"), "", vec![0u8; 1024])
            .await
            .unwrap();
    }
    write_bytes(&format!("{base}/README.txt"), "", b"not a shard".to_vec())
        .await
        .unwrap();
    base
}

struct Served {
    coord: Arc<Coordinator>,
    grpc: SocketAddr,
    http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn serve(cfg: JobConfig) -> Served {
    serve_with(cfg, None).await
}

/// Serves with the test job token and, optionally, a status bearer token.
async fn serve_with(cfg: JobConfig, status_token: Option<&str>) -> Served {
    let coord = Coordinator::new(cfg.clone(), cfg.to_toml(), None)
        .await
        .unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let access = Access {
        job_token: Some(job_token()),
        status_token: status_token.map(str::to_string),
    };
    let task = tokio::spawn(coord.clone().serve(grpc, http, access, async move {
        let _ = rx.await;
    }));
    Served {
        coord,
        grpc: grpc_addr,
        http: http_addr,
        stop: Some(tx),
        task,
    }
}

impl Served {
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("servers stop after the shutdown signal")
            .unwrap()
            .unwrap();
    }

    async fn client(&self) -> Client {
        self.client_with(Some(job_token())).await
    }

    async fn client_with(&self, token: Option<JobToken>) -> Client {
        let channel = Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        CoordinatorClient::with_interceptor(channel, GrpcProof::new(token))
    }
}

/// A plain HTTP/1.0 GET; returns (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (code, _, body) = common::http_get(addr, path).await;
    (code, body)
}

async fn status(addr: SocketAddr) -> StatusReport {
    let (code, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("bad /status JSON ({e}): {body}"))
}

struct FakeWorker {
    client: Client,
    id: u64,
    generation: u64,
    rank: u32,
    /// The expert placement rendezvous gave (None when MoE is off).
    placement: Option<proto::Placement>,
}

/// Registers and completes the rendezvous for `n` workers concurrently.
async fn join_world(served: &Served, n: u32) -> Vec<FakeWorker> {
    let mut tasks = Vec::new();
    for k in 0..n {
        let mut client = served.client().await;
        let reg = client
            .register(proto::RegisterRequest {
                host: format!("host{k}"),
                collective_address: format!("127.0.0.1:{}", 40000 + k),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tasks.push(tokio::spawn(async move {
            let r = client
                .rendezvous(proto::RendezvousRequest {
                    worker_id: reg.worker_id,
                    generation: reg.generation,
                    after_generation: 0,
                    suspect_rank: None,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (client, reg.worker_id, r)
        }));
        // The first worker is now blocked in Rendezvous until the world is complete.
        if k == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let s = status(served.http).await;
            assert_eq!(s.state, JobState::WaitingForWorkers);
            assert!(
                !tasks[0].is_finished(),
                "rendezvous returned before the world was complete"
            );
        }
    }
    let mut workers = Vec::new();
    for t in tasks {
        let (client, id, r) = t.await.unwrap();
        assert_eq!(r.world_size, n);
        // Registration order is rank order; in the worlds of 2 used here every rank is
        // the other's ring neighbour.
        assert_eq!(
            r.peers
                .iter()
                .map(|p| (p.rank, p.address.clone()))
                .collect::<Vec<_>>(),
            (0..n)
                .filter(|&k| k != r.rank)
                .map(|k| (k, format!("127.0.0.1:{}", 40000 + k)))
                .collect::<Vec<_>>()
        );
        workers.push(FakeWorker {
            client,
            id,
            generation: r.generation,
            rank: r.rank,
            placement: r.placement,
        });
    }
    workers.sort_by_key(|w| w.rank);
    workers
}

/// Leases epoch 0's shards round-robin over `workers` until none is left; returns (worker
/// index, lease id, shard URL) of each lease in order.
async fn lease_all(workers: &mut [FakeWorker]) -> Vec<(usize, u64, String)> {
    let mut leased = Vec::new();
    loop {
        let k = leased.len() % workers.len();
        let w = &mut workers[k];
        let r = w
            .client
            .lease_shard(proto::LeaseRequest {
                worker_id: w.id,
                generation: w.generation,
                epoch: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if r.exhausted {
            return leased;
        }
        leased.push((k, r.lease_id, r.shard_url));
    }
}

/// Heartbeats every 50 ms until told to stop by the coordinator; returns the stop reason.
fn heartbeat_loop(w: &FakeWorker) -> tokio::task::JoinHandle<String> {
    let (mut client, worker_id, generation) = (w.client.clone(), w.id, w.generation);
    tokio::spawn(async move {
        loop {
            let r = client
                .heartbeat(proto::HeartbeatRequest {
                    worker_id,
                    generation,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if r.stop {
                return r.reason;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_an_epoch_and_status_adds_up() {
    let data = write_shards("serve-epoch").await;
    let served = serve(config(&data, "")).await;
    assert_eq!(
        http_get(served.http, "/healthz").await,
        (200, "ok".to_string())
    );
    // The Prometheus rendering of the same report (its format: tests/metrics.rs).
    let (code, metrics) = http_get(served.http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("contrail_job_state{state=\"waiting_for_workers\"} 1"),
        "{metrics}"
    );

    let mut workers = join_world(&served, 2).await;
    let beats: Vec<_> = workers.iter().map(heartbeat_loop).collect();
    let listed = list_shards(&data, "").await.unwrap();
    assert_eq!(listed.len(), SHARDS, "README.txt must not be a shard");

    // Alternate leases between the ranks; each shard "holds" 10 + its position samples.
    let leased = lease_all(&mut workers).await;
    let expected: Vec<String> = epoch_order(SHARDS, 0, 0)
        .into_iter()
        .map(|i| listed[i].clone())
        .collect();
    assert_eq!(
        leased.iter().map(|l| l.2.clone()).collect::<Vec<_>>(),
        expected
    );

    let s = status(served.http).await;
    assert_eq!(s.state, JobState::Running);
    assert_eq!(s.shards.total, SHARDS as u64);
    assert_eq!(s.shards.leased, SHARDS as u64);
    assert_eq!(s.workers.len(), 2);
    assert!(s
        .workers
        .iter()
        .all(|w| w.state == WorkerLiveness::Alive && !w.shard.is_empty()));

    // Finish all but the last shard, reporting one step per finished shard.
    let mut samples = 0;
    for (i, (who, lease_id, _)) in leased.iter().enumerate().take(SHARDS - 1) {
        let w = &mut workers[*who];
        let n = 10 + i as u64;
        samples += n;
        let bad = [("decode".to_string(), 1u64)].into_iter().collect();
        w.client
            .complete_shard(proto::CompleteRequest {
                worker_id: w.id,
                generation: w.generation,
                lease_id: *lease_id,
                samples: n,
                bad_samples: bad,
                error: String::new(),
                ..Default::default()
            })
            .await
            .unwrap();
        for w in workers.iter_mut() {
            w.client
                .report_step(proto::StepReport {
                    worker_id: w.id,
                    generation: w.generation,
                    epoch: 0,
                    step: i as u64 + 1,
                    loss: Some(3.0 - i as f64),
                    global_samples: 8,
                    learning_rate: 0.05,
                    step_seconds: 0.5,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let s = status(served.http).await;
    let c = s.shards;
    assert_eq!(c.pending + c.leased + c.done + c.failed, c.total);
    assert_eq!((c.done, c.leased), (SHARDS as u64 - 1, 1));
    assert_eq!(s.step, SHARDS as u64 - 1);
    assert_eq!(s.samples_seen, 8 * (SHARDS as u64 - 1));
    assert_eq!(s.loss, Some(3.0 - (SHARDS - 2) as f64));
    assert_eq!(s.bad_samples["decode"], SHARDS as u64 - 1);
    assert_eq!(s.loss_history.len(), SHARDS - 1);
    // Dataset estimated from the finished shards' average: 4 × 11 = 44 samples → 6 steps
    // (the last partial batch of 4 is trained too).
    let avg = samples as f64 / (SHARDS - 1) as f64;
    let est = ((avg * SHARDS as f64).round() as u64).div_ceil(8);
    assert_eq!(s.total_steps_estimate, Some(est));
    assert!(
        (s.samples_per_sec.unwrap() - 16.0).abs() < 1e-9,
        "{:?}",
        s.samples_per_sec
    );
    assert_eq!(s.eta_seconds, Some((est - s.step) as f64 * 0.5));

    // The last shard fails to read: recorded as failed, so the epoch is complete.
    let (who, lease_id, url) = leased.last().unwrap().clone();
    let w = &mut workers[who];
    w.client
        .complete_shard(proto::CompleteRequest {
            worker_id: w.id,
            generation: w.generation,
            lease_id,
            error: format!("reading {url}: connection reset"),
            ..Default::default()
        })
        .await
        .unwrap();
    let state: ShardStateSnapshot = serde_json::from_str(
        &w.client
            .shard_state(proto::ShardStateRequest {
                worker_id: w.id,
                generation: w.generation,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .json,
    )
    .unwrap();
    assert_eq!(state.done.values().sum::<u64>(), samples);
    assert!(state.failed[&url].contains("connection reset"));
    let s = status(served.http).await;
    assert_eq!(
        (
            s.shards.done,
            s.shards.failed,
            s.shards.pending,
            s.shards.leased
        ),
        (3, 1, 0, 0)
    );
    // Now the dataset size is exact: 39 samples → 5 steps (4 full, 1 partial).
    assert_eq!(s.total_steps_estimate, Some(samples.div_ceil(8)));

    for w in workers.iter_mut() {
        w.client
            .leave(proto::LeaveRequest {
                worker_id: w.id,
                generation: w.generation,
                finished: true,
                error: String::new(),
            })
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(2), served.coord.wait_for_end())
        .await
        .expect("job ends once every worker left")
        .unwrap();
    assert_eq!(status(served.http).await.state, JobState::Finished);
    for b in beats {
        let reason = tokio::time::timeout(Duration::from_secs(2), b)
            .await
            .unwrap()
            .unwrap();
        assert!(reason.contains("finished"), "{reason}");
    }
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_fails_the_job_and_is_fenced() {
    let data = write_shards("serve-dead").await;
    let served = serve(config(&data, "")).await;
    let mut workers = join_world(&served, 2).await;
    let survivor = heartbeat_loop(&workers[0]);
    // Rank 1 takes a shard and then goes silent.
    let w1 = &mut workers[1];
    let lease = w1
        .client
        .lease_shard(proto::LeaseRequest {
            worker_id: w1.id,
            generation: w1.generation,
            epoch: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!lease.exhausted);

    let reason = tokio::time::timeout(Duration::from_secs(3), survivor)
        .await
        .expect("the survivor is told to stop")
        .unwrap();
    assert!(reason.contains("rank 1 (127.0.0.1:40001)"), "{reason}");

    let s = status(served.http).await;
    assert_eq!(s.state, JobState::Failed);
    assert_eq!(s.reason, reason);
    assert_eq!(s.generation, w1.generation + 1);
    assert_eq!(s.workers[1].state, WorkerLiveness::Dead);
    assert!(s.workers[1].last_heartbeat_ms >= 400, "{:?}", s.workers[1]);
    assert_eq!((s.shards.pending, s.shards.leased), (SHARDS as u64, 0));

    // The dead worker wakes up: every request is refused.
    let e = w1
        .client
        .complete_shard(proto::CompleteRequest {
            worker_id: w1.id,
            generation: w1.generation,
            lease_id: lease.lease_id,
            samples: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("declared dead"), "{e}");
    let e = w1
        .client
        .heartbeat(proto::HeartbeatRequest {
            worker_id: w1.id,
            generation: w1.generation,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");

    let end = served.coord.wait_for_end().await.unwrap_err().to_string();
    assert!(end.contains("rank 1"), "{end}");
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_coordinator_resumes_from_the_latest_checkpoint() {
    let data = write_shards("serve-resume").await;
    let listed = list_shards(&data, "").await.unwrap();
    let order = epoch_order(SHARDS, 0, 0);
    let ck = "memory://serve-resume/ck";
    let mut shard_state = ShardStateSnapshot {
        epoch: 0,
        samples_seen: 16,
        ..Default::default()
    };
    shard_state.done.insert(listed[order[0]].clone(), 12);
    shard_state.bad_samples.insert("too_large".into(), 2);
    let meta = CheckpointMeta {
        step: 2,
        epoch: 0,
        world_size: 2,
        shard_state,
        config_toml: String::new(),
        created_unix_ms: 0,
        run: String::new(),
    };
    let dir = join_url(ck, "step-00000002");
    write_bytes(
        &join_url(&dir, "meta.json"),
        "",
        serde_json::to_vec(&meta).unwrap(),
    )
    .await
    .unwrap();
    write_bytes(&join_url(ck, LATEST), "", b"step-00000002\n".to_vec())
        .await
        .unwrap();

    let served = serve(config(&data, ck)).await;
    let s = status(served.http).await;
    assert_eq!(
        (s.step, s.samples_seen, s.bad_samples["too_large"]),
        (2, 16, 2)
    );
    assert_eq!((s.shards.done, s.shards.pending), (1, SHARDS as u64 - 1));

    let mut workers = join_world(&served, 2).await;
    let w = &mut workers[0];
    let r = w
        .client
        .lease_shard(proto::LeaseRequest {
            worker_id: w.id,
            generation: w.generation,
            epoch: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.shard_url, listed[order[1]],
        "the shard done before the checkpoint is skipped"
    );
    // Rendezvous told both ranks where to resume from.
    let mut again = served.client().await;
    let rv = again
        .rendezvous(proto::RendezvousRequest {
            worker_id: workers[1].id,
            generation: workers[1].generation,
            after_generation: 0,
            suspect_rank: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            rv.resume_checkpoint.as_str(),
            rv.resume_step,
            rv.resume_epoch
        ),
        (dir.as_str(), 2, 0)
    );
    served.shutdown().await;
}

/// [`config`] with a ViT of 2 blocks whose second has 4 experts.
fn moe_config(data: &str) -> JobConfig {
    let mut cfg = config(data, "");
    let vit = JobConfig::from_toml(
        "[model]\nencoder = \"vit\"\n[model.vit]\nlayers = 2\npatch_size = 8\n\
         [data]\nimage_size = 32\n[moe]\nexperts = 4\nvit_blocks = [1]\n",
    )
    .unwrap();
    (cfg.model, cfg.data.image_size, cfg.moe) = (vit.model, vit.data.image_size, vit.moe);
    cfg.validate().unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_placement_at_rendezvous_and_expert_load_in_status() {
    let data = write_shards("serve-moe").await;
    let served = serve(moe_config(&data)).await;
    let mut workers = join_world(&served, 2).await;
    for w in &workers {
        let p = ExpertPlacement::from(w.placement.as_ref().expect("MoE is on"));
        assert_eq!(p.version, 1);
        assert_eq!(p.blocks, vec![BlockPlacement::spread(4, 2)]);
    }
    assert_eq!(
        status(served.http).await.experts.unwrap().blocks[0].load,
        Vec::<f64>::new(),
        "no load before the first report"
    );

    for step in 1..=2u64 {
        for w in workers.iter_mut() {
            let reply = w
                .client
                .report_step(proto::StepReport {
                    worker_id: w.id,
                    generation: w.generation,
                    step,
                    global_samples: 8,
                    expert_load: vec![proto::ExpertLoad {
                        block: 0,
                        routed: if w.rank == 0 {
                            vec![5, 1, 1, 1]
                        } else {
                            vec![0; 4]
                        },
                        dropped: if w.rank == 0 { 2 } else { 0 },
                    }],
                    placement_version: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.placement, None, "rebalance is off");
        }
    }
    let (code, body) = http_get(served.http, "/status").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let block = &json["experts"]["blocks"][0];
    assert_eq!(block["label"], "vit 1");
    let load: Vec<f64> = serde_json::from_value(block["load"].clone()).unwrap();
    assert_eq!(load, vec![0.625, 0.125, 0.125, 0.125]);
    assert_eq!(block["dropped_fraction"], 0.25);
    // Experts 0 and 1 on rank 0: 12 of 16 assignments → 1.5 × the mean.
    assert_eq!(block["worker_load_max_mean"], 1.5);
    assert_eq!(block["holders"], serde_json::json!([[0], [0], [1], [1]]));
    assert_eq!(json["experts"]["placement_version"], 1);
    let text = contrail_common::status::render_status_text(&status(served.http).await);
    assert!(
        text.contains("moe block 0 (vit 1): load max/mean 2.50 (experts 0..3: 62% 12% 12% 12%)"),
        "{text}"
    );
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_job_token_are_refused_and_change_nothing() {
    let data = write_shards("serve-token").await;
    let served = serve(config(&data, "")).await;
    let register = |host: &str| proto::RegisterRequest {
        host: host.into(),
        collective_address: "127.0.0.1:41000".into(),
        ..Default::default()
    };
    for token in [
        None,
        Some(JobToken::parse("the-token-of-some-other-job").unwrap()),
    ] {
        let mut rogue = served.client_with(token).await;
        let e = rogue.register(register("rogue")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let e = rogue
            .lease_shard(proto::LeaseRequest {
                worker_id: 1,
                generation: 1,
                epoch: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }
    let s = status(served.http).await;
    assert!(s.workers.is_empty(), "{:?}", s.workers);
    assert_eq!(s.shards.leased, 0);
    // The job's own token works.
    let reg = served
        .client()
        .await
        .register(register("worker"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.worker_id, 1);
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_bearer_token_guards_everything_but_healthz() {
    let data = write_shards("serve-bearer").await;
    let served = serve_with(config(&data, ""), Some("status-secret")).await;
    for path in ["/", "/status", "/metrics"] {
        let (code, body) = common::http_get_with(served.http, path, &[]).await;
        assert_eq!(code, 401, "{path}: {body}");
        let (code, _) =
            common::http_get_with(served.http, path, &["Authorization: Bearer wrong"]).await;
        assert_eq!(code, 401, "{path}");
        let (code, _) =
            common::http_get_with(served.http, path, &["Authorization: Bearer status-secret"])
                .await;
        assert_eq!(code, 200, "{path}");
    }
    assert_eq!(
        common::http_get_with(served.http, "/healthz", &[]).await,
        (200, "ok".to_string())
    );
    served.shutdown().await;
}

/// Random bytes, truncated and oversized frames on both ports, and well-authenticated gRPC
/// calls with nonsense fields: each is dropped or answered with an error, and afterwards two
/// workers still join and lease every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_both_ports_changes_nothing() {
    let data = write_shards("serve-garbage").await;
    let served = serve(config(&data, "")).await;
    // An HTTP/2 preface followed by a frame header that promises 16 MiB and stops.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0x00, 0x00, 0, 0, 0, 1]);
    let cases: Vec<Vec<u8>> = vec![
        common::noise(1, 64),
        common::noise(2, 1 << 20),
        h2,
        b"PRI * HTTP/2.0\r\n".to_vec(),
        b"GET /status HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
        b"GET /".repeat(20_000),
        Vec::new(),
    ];
    for bytes in &cases {
        common::throw_bytes(served.grpc, bytes).await;
        common::throw_bytes(served.http, bytes).await;
    }

    let mut c = served.client().await;
    let bad_lease = c
        .lease_shard(proto::LeaseRequest {
            worker_id: 987_654,
            generation: u64::MAX,
            epoch: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(bad_lease.code(), tonic::Code::Ok);
    let bad_complete = c
        .complete_shard(proto::CompleteRequest {
            worker_id: 0,
            generation: 0,
            lease_id: u64::MAX,
            samples: u64::MAX,
            bad_samples: [("x".repeat(10_000), u64::MAX)].into_iter().collect(),
            error: "\u{0}".repeat(100),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(bad_complete.code(), tonic::Code::Ok);
    let bad_step = c
        .report_step(proto::StepReport {
            worker_id: 5,
            generation: 9,
            step: u64::MAX,
            loss: Some(f64::NAN),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(bad_step.code(), tonic::Code::Ok);

    let s = status(served.http).await;
    assert_eq!(s.state, JobState::WaitingForWorkers);
    assert!(s.workers.is_empty());
    let mut workers = join_world(&served, 2).await;
    assert_eq!(lease_all(&mut workers).await.len(), SHARDS);
    served.shutdown().await;
}

/// `log.tensorboard`: rank 0's step reports (loss, learning rate, samples/s, expert load) and
/// the evaluations become scalars in an event file that TensorBoard's own reader loads (the
/// pinned `tensorboard` in .venv, `tests/fixtures/reference/tensorboard/read_events.py`);
/// the other ranks' reports are not plotted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_become_tensorboard_scalars_that_tensorboard_reads() {
    let data = write_shards("serve-tensorboard").await;
    let dir = std::env::temp_dir().join(format!("contrail-tensorboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = moe_config(&data);
    cfg.log.tensorboard = format!("file://{}/run", dir.display());
    let served = serve(cfg).await;
    let mut workers = join_world(&served, 2).await;
    for step in 1..=3u64 {
        for w in workers.iter_mut() {
            let rank0 = w.rank == 0;
            w.client
                .report_step(proto::StepReport {
                    worker_id: w.id,
                    generation: w.generation,
                    step,
                    loss: Some(if rank0 { 4.0 - step as f64 } else { 99.0 }),
                    learning_rate: 0.1 * step as f64,
                    global_samples: 8,
                    step_seconds: 0.5,
                    expert_load: vec![proto::ExpertLoad {
                        block: 0,
                        routed: if rank0 { vec![5, 1, 1, 1] } else { vec![0; 4] },
                        dropped: if rank0 { 2 } else { 0 },
                    }],
                    placement_version: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let rank0 = &mut workers[0];
    rank0
        .client
        .report_eval(proto::EvalReport {
            worker_id: rank0.id,
            generation: rank0.generation,
            step: 3,
            knn_top1: 0.5,
            knn_top5: 0.75,
            zeroshot_top1: Some(0.25),
            ..Default::default()
        })
        .await
        .unwrap();
    served.shutdown().await;

    let files: Vec<_> = std::fs::read_dir(dir.join("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let ours = contrail_common::tensorboard::read(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(ours.len(), 4, "three steps and one evaluation: {ours:?}");

    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/reference/tensorboard/read_events.py"
        ))
        .arg(dir.join("run"))
        .output()
        .expect("runs .venv/bin/python (scripts/setup-test.sh installs tensorboard there)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: std::collections::BTreeMap<String, Vec<(u64, f64)>> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read["train/loss"], vec![(1, 3.0), (2, 2.0), (3, 1.0)]);
    let lr: Vec<f64> = read["train/learning_rate"].iter().map(|p| p.1).collect();
    assert!((lr[2] - 0.3).abs() < 1e-6, "{lr:?}");
    assert_eq!(read["train/samples_per_second"][0], (1, 16.0));
    assert_eq!(read["moe/block0/expert0_share"][2], (3, 0.625));
    assert_eq!(read["moe/block0/max_over_mean"][0], (1, 2.5));
    assert_eq!(read["moe/block0/dropped_fraction"][0], (1, 0.25));
    assert_eq!(read["eval/knn_top1"], vec![(3, 0.5)]);
    assert_eq!(read["eval/zeroshot_top1"], vec![(3, 0.25)]);
    assert!(!read.contains_key("eval/zeroshot_top5"), "not measured");
    let _ = std::fs::remove_dir_all(&dir);
}
