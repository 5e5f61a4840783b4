//! The gRPC face of the coordinator: thin adapters from tonic requests to [`JobBook`]
//! methods. Rendezvous is the only call that waits; everything else answers at once.
//!
//! [`JobBook`]: crate::job::JobBook

use crate::Coordinator;
use contrail_common::proto::{
    self,
    coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer},
};
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub struct CoordinatorService {
    coord: Arc<Coordinator>,
}

impl CoordinatorService {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        Self { coord }
    }

    /// The tonic server, every call checked by `interceptor` first ([`crate::access`]).
    pub fn into_server_with(
        self,
        interceptor: crate::access::GrpcInterceptor,
    ) -> InterceptedService<CoordinatorServer<Self>, crate::access::GrpcInterceptor> {
        CoordinatorServer::with_interceptor(self, interceptor)
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn register(
        &self,
        req: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let r = req.into_inner();
        let (worker_id, generation) = self.coord.with_book(|b, now| b.register(&r, now))?;
        self.coord.durable().await?;
        Ok(Response::new(proto::RegisterReply {
            worker_id,
            generation,
        }))
    }

    async fn rendezvous(
        &self,
        req: Request<proto::RendezvousRequest>,
    ) -> Result<Response<proto::RendezvousReply>, Status> {
        let r = req.into_inner();
        if !r.rollback_reason.is_empty() {
            self.coord.with_book(|b, _| {
                b.request_rollback(r.worker_id, r.after_generation, &r.rollback_reason)
            })?;
        }
        let mut state = self.coord.watch_state();
        // Re-checks at least every heartbeat period: that also keeps the waiting worker's
        // last-seen time fresh while the call is open.
        let period = Duration::from_millis(self.coord.config().cluster.heartbeat_ms.max(10));
        loop {
            state.mark_unchanged();
            if let Some(reply) = self.coord.with_book(|b, now| {
                b.rendezvous_reporting(
                    r.worker_id,
                    r.generation,
                    r.after_generation,
                    r.suspect_rank,
                    now,
                )
            })? {
                // A new generation's ranks are journaled before anyone acts on them.
                self.coord.durable().await?;
                return Ok(Response::new(reply));
            }
            let _ = tokio::time::timeout(period, state.changed()).await;
        }
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.coord.with_book(|b, now| b.heartbeat(&r, now))?,
        ))
    }

    async fn lease_shard(
        &self,
        req: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseReply>, Status> {
        let r = req.into_inner();
        let reply = self.coord.with_book(|b, now| b.lease(&r, now))?;
        self.coord.durable().await?;
        Ok(Response::new(reply))
    }

    async fn complete_shard(
        &self,
        req: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteReply>, Status> {
        let r = req.into_inner();
        self.coord.with_book(|b, now| b.complete(&r, now))?;
        self.coord.durable().await?;
        Ok(Response::new(proto::CompleteReply {}))
    }

    async fn report_step(
        &self,
        req: Request<proto::StepReport>,
    ) -> Result<Response<proto::StepReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.coord.with_book(|b, now| b.report_step(&r, now))?,
        ))
    }

    async fn shard_state(
        &self,
        req: Request<proto::ShardStateRequest>,
    ) -> Result<Response<proto::ShardStateReply>, Status> {
        let r = req.into_inner();
        let json = self.coord.with_book(|b, now| {
            let at = r.at_step.map(|step| (r.epoch, step));
            b.shard_state(r.worker_id, r.generation, at, now)
        })?;
        Ok(Response::new(proto::ShardStateReply { json }))
    }

    async fn report_eval(
        &self,
        req: Request<proto::EvalReport>,
    ) -> Result<Response<proto::EvalReply>, Status> {
        let r = req.into_inner();
        self.coord.with_book(|b, now| b.report_eval(&r, now))?;
        Ok(Response::new(proto::EvalReply {}))
    }

    async fn leave(
        &self,
        req: Request<proto::LeaveRequest>,
    ) -> Result<Response<proto::LeaveReply>, Status> {
        let r = req.into_inner();
        self.coord.with_book(|b, now| b.leave(&r, now))?;
        self.coord.durable().await?;
        Ok(Response::new(proto::LeaveReply {}))
    }
}
