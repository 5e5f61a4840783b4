//! The worker's side of the coordinator protocol: a thin wrapper that carries the worker id and
//! generation on every call and turns gRPC statuses into errors a person can act on.
//!
//! A coordinator that does not answer may be restarting (it takes the job over from its
//! journal): the calls a worker cannot go on without (register, rendezvous, lease, complete,
//! shard state, leave) retry with backoff for up to `cluster.coordinator_timeout_ms`. Their
//! requests are idempotent: a repeated registration carries the same instance id, a repeated
//! lease request the same request id, so a reply lost in the crash costs nothing.

use super::node::{host_name, NodeRank};
use anyhow::{Context, Result};
use contrail_common::auth::{GrpcProof, JobToken};
use contrail_common::proto::{self, coordinator_client::CoordinatorClient};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The gRPC client, every call stamped with a job-token proof.
type Client = CoordinatorClient<InterceptedService<Channel, GrpcProof>>;

#[derive(Clone)]
pub struct Coordinator {
    client: Client,
    pub endpoint: String,
    pub worker_id: u64,
    /// Shared by every clone (the heartbeat task's too), so a regroup moves them all to the
    /// new generation at once.
    generation: Arc<AtomicU64>,
    /// How long (ms) a call retries while the coordinator does not answer; shared by clones.
    outage_ms: Arc<AtomicU64>,
    /// This run's public id (`JobToken::run_id`; "" without a token), stamped on checkpoints.
    pub run_id: String,
}

/// What rendezvous tells a worker.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub rank: usize,
    pub world_size: usize,
    /// Collective addresses indexed by rank: "" for a rank this one does not link to (the
    /// coordinator sends only the linked ranks' addresses; see `peers_by_rank`).
    pub peers: Vec<String>,
    pub job_toml: String,
    pub resume_checkpoint: String,
    pub resume_step: u64,
    pub resume_epoch: u32,
    /// Where the experts of the MoE blocks live (None without MoE).
    pub placement: Option<contrail_common::experts::ExpertPlacement>,
    /// The membership generation this assignment belongs to.
    pub generation: u64,
    /// A replacement joining a running job: its state comes from the other members.
    pub joining: bool,
    /// Every member rolls back to `resume_checkpoint` on `placement` (an MoE worker died).
    pub rollback: bool,
    /// Samples in one epoch from the dataset's manifest; 0 when it has none.
    pub dataset_samples: u64,
}

pub enum Lease {
    Shard { url: String, lease_id: u64 },
    Exhausted,
}

/// The linked peers' addresses of a rendezvous reply, placed by rank in a list of the whole
/// world ("" where the reply has none); a rank outside the world is dropped (the
/// collective then reports the link it lacks).
fn peers_by_rank(world: usize, peers: &[proto::PeerAddress]) -> Vec<String> {
    let mut by_rank = vec![String::new(); world];
    for p in peers {
        if let Some(slot) = by_rank.get_mut(p.rank as usize) {
            slot.clone_from(&p.address);
        }
    }
    by_rank
}

impl Coordinator {
    /// Connects (retrying for up to `wait`, since the coordinator may still be starting) and
    /// registers this worker with its collective address and its place on its node (None: a
    /// node of its own). Every call carries a proof made with `token` (the job's token; see
    /// `contrail_common::auth`).
    pub async fn register(
        endpoint: &str,
        collective_address: &str,
        node: Option<&NodeRank>,
        wait: Duration,
        token: Option<JobToken>,
    ) -> Result<Self> {
        let endpoint = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let target = Endpoint::from_shared(endpoint.clone())
            .with_context(|| format!("the coordinator address {endpoint} is not a URL"))?;
        let deadline = tokio::time::Instant::now() + wait;
        let run_id = token.as_ref().map(JobToken::run_id).unwrap_or_default();
        let client = loop {
            match target.connect().await {
                Ok(c) => break CoordinatorClient::with_interceptor(c, GrpcProof::new(token)),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("coordinator at {endpoint} not reachable yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("connecting to the coordinator at {endpoint} (waited {wait:?})")
                    })
                }
            }
        };
        // Random per process: a registration repeated after a lost reply is recognised.
        let instance = u64::from_le_bytes(
            contrail_common::auth::random_bytes().context("drawing this worker's instance id")?,
        );
        let mut me = Self {
            client,
            endpoint,
            worker_id: 0,
            generation: Arc::new(AtomicU64::new(0)),
            outage_ms: Arc::new(AtomicU64::new(wait.as_millis() as u64)),
            run_id,
        };
        let request = proto::RegisterRequest {
            host: host_name(),
            collective_address: collective_address.to_string(),
            instance,
            node: node.map(|n| n.node.clone()).unwrap_or_default(),
            local_rank: node.map_or(0, |n| n.local_rank),
            local_ranks: node.map_or(1, |n| n.local_ranks),
        };
        let reply = me
            .retry_status(|mut c| {
                let r = request.clone();
                async move { c.register(r).await }
            })
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::Unauthenticated {
                    anyhow::anyhow!(
                        "the coordinator at {} refused this worker: it needs the job's token in \
                         {} ({})",
                        me.endpoint,
                        contrail_common::auth::TOKEN_ENV,
                        s.message()
                    )
                } else {
                    anyhow::Error::new(s).context(format!(
                        "registering with the coordinator at {}",
                        me.endpoint
                    ))
                }
            })?;
        me.worker_id = reply.worker_id;
        me.generation.store(reply.generation, Ordering::SeqCst);
        Ok(me)
    }

    /// The membership generation this worker belongs to.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// How long calls keep retrying while the coordinator does not answer (every clone).
    pub fn set_outage(&self, wait: Duration) {
        self.outage_ms
            .store(wait.as_millis() as u64, Ordering::SeqCst);
    }

    /// Runs `call` until it answers, retrying with backoff while the coordinator cannot be
    /// reached (for up to the outage budget); other errors return at once.
    async fn retry_status<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.retry_status_for(self.outage(), call).await
    }

    /// [`Coordinator::retry_status`] for up to `budget`.
    async fn retry_status_for<T, F, Fut>(
        &self,
        budget: Duration,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let mut pause = Duration::from_millis(50);
        let mut retried = false;
        loop {
            match call(self.client.clone()).await {
                Ok(r) => {
                    if retried {
                        tracing::info!("the coordinator at {} answers again", self.endpoint);
                    }
                    return Ok(r.into_inner());
                }
                Err(s) if unreachable(&s) && tokio::time::Instant::now() < deadline => {
                    if !retried {
                        tracing::warn!(
                            "the coordinator at {} does not answer ({}); retrying for up to \
                             {budget:?}",
                            self.endpoint,
                            s.message()
                        );
                    }
                    retried = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// [`Coordinator::retry_status`] with the error as context for `what`.
    async fn retry<T, F, Fut>(&self, what: impl FnOnce() -> String, call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.retry_status(call)
            .await
            .map_err(|s| anyhow::Error::new(s).context(what()))
    }

    /// After a failure: waits (up to `wait`) for the coordinator to start a generation newer
    /// than this worker's, and returns this worker's place in it. Fails when this worker is
    /// not a member (it was declared dead) or the job ended.
    /// `suspect_rank`: the peer (rank of this worker's generation) whose connection failed;
    /// `rollback_reason`: why the members must roll back to the latest checkpoint ("" when
    /// they need not).
    pub async fn regroup(
        &mut self,
        wait: Duration,
        suspect_rank: Option<usize>,
        rollback_reason: &str,
    ) -> Result<Assignment> {
        let after = self.generation();
        let request = proto::RendezvousRequest {
            worker_id: self.worker_id,
            generation: after,
            after_generation: after,
            suspect_rank: suspect_rank.map(|r| r as u32),
            rollback_reason: rollback_reason.to_string(),
        };
        let call = self.retry(
            || "regrouping with the coordinator".into(),
            |mut c| {
                let r = request.clone();
                async move { c.rendezvous(r).await }
            },
        );
        let r = tokio::time::timeout(wait, call).await.map_err(|_| {
            anyhow::anyhow!(
                "the coordinator started no new generation within {wait:?} after a \
                 collective failure"
            )
        })??;
        Ok(self.adopt(r))
    }

    /// Waits until the whole world has registered and returns this worker's place in it.
    pub async fn rendezvous(&mut self) -> Result<Assignment> {
        let request = proto::RendezvousRequest {
            worker_id: self.worker_id,
            generation: self.generation(),
            after_generation: 0,
            suspect_rank: None,
            rollback_reason: String::new(),
        };
        let r = self
            .retry(
                || "rendezvous with the coordinator".into(),
                |mut c| {
                    let r = request.clone();
                    async move { c.rendezvous(r).await }
                },
            )
            .await?;
        Ok(self.adopt(r))
    }

    /// Takes the generation of a rendezvous reply and reads the assignment from it.
    fn adopt(&mut self, r: proto::RendezvousReply) -> Assignment {
        self.generation.store(r.generation, Ordering::SeqCst);
        Assignment {
            rank: r.rank as usize,
            world_size: r.world_size as usize,
            peers: peers_by_rank(r.world_size as usize, &r.peers),
            job_toml: r.job_config_toml,
            resume_checkpoint: r.resume_checkpoint,
            resume_step: r.resume_step,
            resume_epoch: r.resume_epoch,
            joining: r.joining,
            rollback: r.rollback,
            dataset_samples: r.dataset_samples,
            placement: r.placement.as_ref().map(Into::into),
            generation: r.generation,
        }
    }

    /// The coordinator's answer ([`HeartbeatAnswer`]). One try: the heartbeat loop decides
    /// how long an unreachable coordinator is tolerated ([`unreachable`] tells).
    pub async fn heartbeat(
        &mut self,
        step: u64,
        state: &str,
        shard: &str,
    ) -> Result<HeartbeatAnswer, tonic::Status> {
        let generation = self.generation();
        let r = self
            .client
            .heartbeat(proto::HeartbeatRequest {
                worker_id: self.worker_id,
                generation,
                step,
                state: state.to_string(),
                shard: shard.to_string(),
            })
            .await?
            .into_inner();
        Ok(HeartbeatAnswer {
            stop: r.stop.then_some(r.reason),
            regroup: r.regroup,
            peer_lost: r.peer_lost,
            generation,
        })
    }

    pub async fn lease_shard(&mut self, epoch: u32) -> Result<Lease> {
        let request = proto::LeaseRequest {
            worker_id: self.worker_id,
            generation: self.generation(),
            epoch,
            request_id: u64::from_le_bytes(contrail_common::auth::random_bytes()?),
        };
        let r = self
            .retry(
                || format!("leasing a shard of epoch {epoch}"),
                |mut c| {
                    let r = request;
                    async move { c.lease_shard(r).await }
                },
            )
            .await?;
        Ok(if r.exhausted {
            Lease::Exhausted
        } else {
            Lease::Shard {
                url: r.shard_url,
                lease_id: r.lease_id,
            }
        })
    }

    /// `step`: the committed step that trained the shard's last sample.
    pub async fn complete_shard(
        &mut self,
        lease_id: u64,
        samples: u64,
        bad_samples: BTreeMap<String, u64>,
        error: String,
        step: u64,
    ) -> Result<()> {
        let request = proto::CompleteRequest {
            worker_id: self.worker_id,
            generation: self.generation(),
            lease_id,
            samples,
            bad_samples: bad_samples.into_iter().collect(),
            error,
            step,
        };
        self.retry(
            || format!("reporting shard lease {lease_id} complete"),
            |mut c| {
                let r = request.clone();
                async move { c.complete_shard(r).await }
            },
        )
        .await?;
        Ok(())
    }

    /// Reports a step; the reply may carry a new expert placement (rank 0 only).
    pub async fn report_step(&mut self, report: proto::StepReport) -> Result<proto::StepReply> {
        let report = proto::StepReport {
            worker_id: self.worker_id,
            generation: self.generation(),
            ..report
        };
        let reply = self
            .client
            .report_step(report)
            .await
            .context("reporting step progress")?;
        Ok(reply.into_inner())
    }

    /// Reports one round of online evaluation (rank 0).
    pub async fn report_eval(&mut self, report: proto::EvalReport) -> Result<()> {
        let report = proto::EvalReport {
            worker_id: self.worker_id,
            generation: self.generation(),
            ..report
        };
        self.client
            .report_eval(report)
            .await
            .context("reporting an evaluation")?;
        Ok(())
    }

    /// The shard state as of committed step `step` of `epoch`, for a checkpoint of that
    /// step; retries for up to `wait` while the coordinator cannot be reached (the error then
    /// says so: [`unreachable`]).
    pub async fn shard_state_json_at(
        &self,
        epoch: u32,
        step: u64,
        wait: Duration,
    ) -> Result<String, tonic::Status> {
        let request = proto::ShardStateRequest {
            worker_id: self.worker_id,
            generation: self.generation(),
            at_step: Some(step),
            epoch,
        };
        Ok(self
            .retry_status_for(wait, |mut c| {
                let r = request;
                async move { c.shard_state(r).await }
            })
            .await?
            .json)
    }

    /// How long calls retry while the coordinator does not answer.
    pub fn outage(&self) -> Duration {
        Duration::from_millis(self.outage_ms.load(Ordering::SeqCst))
    }

    /// Tells the coordinator this worker is done. A worker that failed tries for a few
    /// seconds only: nothing waits for its leave (its silence is noticed anyway).
    pub async fn leave(&mut self, finished: bool, error: String) -> Result<()> {
        let budget = match finished {
            true => self.outage(),
            false => self.outage().min(Duration::from_secs(5)),
        };
        let request = proto::LeaveRequest {
            worker_id: self.worker_id,
            generation: self.generation(),
            finished,
            error,
        };
        self.retry_status_for(budget, |mut c| {
            let r = request.clone();
            async move { c.leave(r).await }
        })
        .await
        .context("leaving the job")?;
        Ok(())
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// Why this worker must stop, when it must.
    pub stop: Option<String>,
    /// A replacement waits to join: the members of `generation` regroup at the next step
    /// boundary.
    pub regroup: bool,
    /// A member of `generation` was lost: its collective can never complete.
    pub peer_lost: bool,
    /// The generation the heartbeat carried, which both flags are about: a reply that
    /// arrives after this worker moved on to a newer generation is no news.
    pub generation: u64,
}

/// Whether a call failed because the coordinator could not be reached (it may be
/// restarting), rather than because it refused the request.
pub fn unreachable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}
