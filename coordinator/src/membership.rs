//! Who is in the job: registered workers, their ranks, liveness and the generation.
//!
//! Every worker is one rank of a node (`contrail worker --local-ranks N` runs N; a worker
//! started alone is a node of one). Ranks are assigned the moment the world is complete,
//! node-major: nodes in the order their first rank registered, a node's ranks contiguous in
//! local-rank order (NCCL's rings and trees want a node's GPUs next to each other). A node is
//! one failure domain: the job book takes all its ranks out in the same regroup, and a
//! replacement node counts as waiting only once all its ranks registered. The generation
//! changes whenever membership does (a worker dies or fails); requests stamped with an older
//! generation are refused, which fences a worker that was declared dead but is in fact still
//! running and would otherwise keep taking shards.

use crate::error::RpcError;
use contrail_common::proto;
use contrail_common::status::WorkerLiveness;
use serde::{Deserialize, Serialize};

/// Where a rank runs: its node worker and its index there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSlot {
    /// The node worker's identity; a worker registered without one is named a node of its
    /// own when it is added.
    pub node: String,
    pub local_rank: u32,
    /// Ranks the node runs (at least 1).
    pub local_ranks: u32,
}

impl NodeSlot {
    /// The slot a registration names, checked.
    pub fn of(req: &proto::RegisterRequest) -> Result<Self, RpcError> {
        let local_ranks = req.local_ranks.max(1);
        if req.local_rank >= local_ranks {
            return Err(RpcError::InvalidArgument(format!(
                "local rank {} of node {:?} is out of range: the node runs {local_ranks} rank(s)",
                req.local_rank, req.node
            )));
        }
        if req.node.is_empty() && local_ranks > 1 {
            return Err(RpcError::InvalidArgument(format!(
                "a registration of local rank {} of {local_ranks} names no node",
                req.local_rank
            )));
        }
        Ok(Self {
            node: req.node.clone(),
            local_rank: req.local_rank,
            local_ranks,
        })
    }
}

/// Journaled whole (see `crate::journal`); the times are this coordinator's clock and are
/// reset when a restarted coordinator recovers the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    pub id: u64,
    pub host: String,
    pub address: String,
    pub rank: Option<u32>,
    pub liveness: WorkerLiveness,
    pub last_seen_ms: u64,
    pub step: u64,
    /// Why the worker is dead or left with an error ("" otherwise).
    pub reason: String,
    /// Registered while the job was running (a replacement): it takes its state from the
    /// other members when it joins.
    pub joined_running: bool,
    /// When a peer reported this worker's connection failed (cleared by its next heartbeat).
    pub suspected_at_ms: Option<u64>,
    /// The worker process's random instance id: a repeated registration is the same worker.
    #[serde(default)]
    pub instance: u64,
    /// The node it runs on.
    #[serde(default)]
    pub slot: NodeSlot,
}

impl Worker {
    /// "rank 1 (10.0.0.7:29500)", or "worker 3 (...)" before ranks exist: how errors and
    /// the status name a worker.
    pub fn describe(&self) -> String {
        match self.rank {
            Some(r) => format!("rank {r} ({})", self.address),
            None => format!("worker {} ({})", self.id, self.address),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Membership {
    pub world_size: u32,
    pub generation: u64,
    /// In registration order, which is the order of their ids (see `position`).
    pub workers: Vec<Worker>,
    next_id: u64,
}

impl Membership {
    pub fn new(world_size: u32) -> Self {
        Self {
            world_size,
            generation: 1,
            workers: Vec::new(),
            next_id: 1,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.workers.iter().all(|w| w.rank.is_some())
            && self.workers.len() == self.world_size as usize
    }

    /// Adds a worker; assigns every rank, node-major, when this one completes the world.
    /// Returns its id.
    pub fn add(
        &mut self,
        host: &str,
        address: &str,
        instance: u64,
        slot: NodeSlot,
        now_ms: u64,
    ) -> Result<u64, RpcError> {
        if self.workers.len() >= self.world_size as usize {
            return Err(RpcError::ResourceExhausted(format!(
                "the job already has its {} ranks (cluster.world_size, the sum of the nodes' \
                 --local-ranks); a worker joins a running job only as a replacement \
                 (cluster.min_workers > 0)",
                self.world_size
            )));
        }
        self.check_address_free(address)?;
        self.check_slot_free(&slot)?;
        let id = self.push(host, address, instance, slot, now_ms, false);
        if self.workers.len() == self.world_size as usize {
            let ids: Vec<u64> = self.workers.iter().map(|w| w.id).collect();
            for (rank, id) in self.node_major(ids).into_iter().enumerate() {
                if let Some(w) = self.get_mut(id) {
                    w.rank = Some(rank as u32);
                    // The liveness clock starts now: waiting in Rendezvous sends no heartbeats.
                    w.last_seen_ms = now_ms;
                }
            }
        }
        Ok(id)
    }

    /// `ids` ordered node-major: nodes in the order their first worker registered, each
    /// node's workers by local rank.
    fn node_major(&self, mut ids: Vec<u64>) -> Vec<u64> {
        let first_of_node = |node: &str| {
            self.workers
                .iter()
                .position(|w| w.slot.node == node)
                .unwrap_or(usize::MAX)
        };
        ids.sort_by_cached_key(|id| match self.get(*id) {
            Some(w) => (first_of_node(&w.slot.node), w.slot.local_rank, w.id),
            None => (usize::MAX, 0, *id),
        });
        ids
    }

    /// The alive workers other than `id` on `id`'s node: they leave with it.
    pub fn node_mates(&self, id: u64) -> Vec<u64> {
        let Some(node) = self.get(id).map(|w| w.slot.node.clone()) else {
            return Vec::new();
        };
        self.workers
            .iter()
            .filter(|w| w.id != id && w.slot.node == node && w.liveness == WorkerLiveness::Alive)
            .map(|w| w.id)
            .collect()
    }

    /// Where worker `id` is in `workers`. Ids are handed out in increasing order and workers
    /// are only ever appended or removed, so `workers` is sorted by id: a binary search, not
    /// a scan of thousands of workers on every RPC.
    fn position(&self, id: u64) -> Option<usize> {
        self.workers.binary_search_by_key(&id, |w| w.id).ok()
    }

    pub fn get(&self, id: u64) -> Option<&Worker> {
        self.position(id).map(|i| &self.workers[i])
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Worker> {
        self.position(id).map(|i| &mut self.workers[i])
    }

    /// The worker behind a request, refusing dead workers and stale generations (fencing).
    /// `allow_stale` lets a live worker of an older generation through (heartbeats and Leave,
    /// which must still reach the survivors of a failure).
    pub fn check(
        &mut self,
        id: u64,
        generation: u64,
        allow_stale: bool,
    ) -> Result<&mut Worker, RpcError> {
        let current = self.generation;
        let w = self
            .get_mut(id)
            .ok_or_else(|| RpcError::NotFound(format!("unknown worker id {id}; register first")))?;
        if w.liveness == WorkerLiveness::Dead {
            return Err(RpcError::FailedPrecondition(format!(
                "{} was declared dead ({}); its requests of generation {generation} are fenced \
                 (current generation {current})",
                w.describe(),
                w.reason
            )));
        }
        if generation != current && !allow_stale {
            return Err(RpcError::FailedPrecondition(format!(
                "{} sent generation {generation} but the current generation is {current}: \
                 membership changed",
                w.describe()
            )));
        }
        Ok(w)
    }

    /// Ranked, alive workers silent since before `now_ms - timeout_ms`, or reported by a peer
    /// and silent for `suspect_grace_ms` since.
    pub fn silent(&self, now_ms: u64, timeout_ms: u64, suspect_grace_ms: u64) -> Vec<u64> {
        self.workers
            .iter()
            .filter(|w| {
                w.rank.is_some()
                    && w.liveness == WorkerLiveness::Alive
                    && (now_ms.saturating_sub(w.last_seen_ms) > timeout_ms
                        || w.suspected_at_ms
                            .is_some_and(|at| now_ms.saturating_sub(at) > suspect_grace_ms))
            })
            .map(|w| w.id)
            .collect()
    }

    /// A replacement registering while the job runs (`cluster.min_workers`): it waits without
    /// a rank until the next regroup takes it in. At most `max_world` members and waiting
    /// workers together.
    pub fn add_replacement(
        &mut self,
        host: &str,
        address: &str,
        instance: u64,
        slot: NodeSlot,
        now_ms: u64,
        max_world: u32,
    ) -> Result<u64, RpcError> {
        let taken = self
            .workers
            .iter()
            .filter(|w| w.liveness == WorkerLiveness::Alive)
            .count();
        if taken >= max_world as usize {
            return Err(RpcError::ResourceExhausted(format!(
                "the job already has its {max_world} workers (cluster.world_size)"
            )));
        }
        self.check_address_free(address)?;
        self.check_slot_free(&slot)?;
        let id = self.push(host, address, instance, slot, now_ms, true);
        Ok(id)
    }

    /// Refuses a second alive worker in one node's slot, and a node whose ranks disagree on
    /// how many it runs.
    fn check_slot_free(&self, slot: &NodeSlot) -> Result<(), RpcError> {
        if slot.node.is_empty() {
            return Ok(());
        }
        let alive = self
            .workers
            .iter()
            .filter(|w| w.slot.node == slot.node && w.liveness == WorkerLiveness::Alive);
        for other in alive {
            if other.slot.local_rank == slot.local_rank {
                return Err(RpcError::InvalidArgument(format!(
                    "local rank {} of node {} is already registered (worker {})",
                    slot.local_rank, slot.node, other.id
                )));
            }
            if other.slot.local_ranks != slot.local_ranks {
                return Err(RpcError::InvalidArgument(format!(
                    "node {} registered with {} local ranks before, now with {}",
                    slot.node, other.slot.local_ranks, slot.local_ranks
                )));
            }
        }
        Ok(())
    }

    /// Refuses an address an alive worker registered (a replacement may come back on a dead
    /// worker's address).
    fn check_address_free(&self, address: &str) -> Result<(), RpcError> {
        if address.is_empty() {
            return Ok(());
        }
        match self
            .workers
            .iter()
            .find(|w| w.address == address && w.liveness == WorkerLiveness::Alive)
        {
            Some(other) => Err(RpcError::InvalidArgument(format!(
                "collective address {address} is already registered by worker {} on {}; \
                 every worker needs its own host:port",
                other.id, other.host
            ))),
            None => Ok(()),
        }
    }

    /// A new alive worker without a rank; returns its id. A worker that names no node is a
    /// node of its own.
    fn push(
        &mut self,
        host: &str,
        address: &str,
        instance: u64,
        mut slot: NodeSlot,
        now_ms: u64,
        joined_running: bool,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if slot.node.is_empty() {
            slot.node = format!("{host}/worker-{id}");
        }
        self.workers.push(Worker {
            id,
            host: host.to_string(),
            address: address.to_string(),
            rank: None,
            liveness: WorkerLiveness::Alive,
            last_seen_ms: now_ms,
            step: 0,
            reason: String::new(),
            joined_running,
            suspected_at_ms: None,
            instance,
            slot,
        });
        id
    }

    /// The alive worker that registered with `instance` (0 names none): a registration
    /// repeated after its reply was lost.
    pub fn by_instance(&self, instance: u64) -> Option<&Worker> {
        (instance != 0)
            .then(|| {
                self.workers
                    .iter()
                    .find(|w| w.instance == instance && w.liveness == WorkerLiveness::Alive)
            })
            .flatten()
    }

    /// A restarted coordinator's clock starts again: every worker counts as just seen, so
    /// each has a full `worker_timeout_ms` to re-attach.
    pub fn restart_clock(&mut self, now_ms: u64) {
        for w in &mut self.workers {
            w.last_seen_ms = now_ms;
            w.suspected_at_ms = None;
        }
    }

    /// Replacements waiting for the next regroup that fell silent (their rendezvous call,
    /// which counts as a sign of life, stopped) for longer than `timeout_ms`.
    pub fn silent_waiting(&self, now_ms: u64, timeout_ms: u64) -> Vec<u64> {
        self.workers
            .iter()
            .filter(|w| {
                w.rank.is_none()
                    && w.joined_running
                    && w.liveness == WorkerLiveness::Alive
                    && now_ms.saturating_sub(w.last_seen_ms) > timeout_ms
            })
            .map(|w| w.id)
            .collect()
    }

    /// Replacements registered and waiting for the next regroup, of nodes whose every rank
    /// registered (a node joins whole), in registration order.
    pub fn waiting_ids(&self) -> Vec<u64> {
        let waits = |w: &&Worker| w.rank.is_none() && w.liveness == WorkerLiveness::Alive;
        self.workers
            .iter()
            .filter(waits)
            .filter(|w| {
                let registered = self
                    .workers
                    .iter()
                    .filter(waits)
                    .filter(|o| o.slot.node == w.slot.node)
                    .count();
                registered == w.slot.local_ranks.max(1) as usize
            })
            .map(|w| w.id)
            .collect()
    }

    /// How many replacements could join at the next regroup ([`Membership::waiting_ids`]).
    pub fn waiting(&self) -> usize {
        self.waiting_ids().len()
    }

    /// Alive workers of the current membership.
    pub fn alive_members(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.rank.is_some() && w.liveness == WorkerLiveness::Alive)
            .count()
    }

    /// The ranks of the alive members, ascending (the order [`Membership::regroup`] keeps).
    pub fn alive_ranks(&self) -> Vec<u32> {
        let mut ranks: Vec<u32> = self
            .workers
            .iter()
            .filter(|w| w.liveness == WorkerLiveness::Alive)
            .filter_map(|w| w.rank)
            .collect();
        ranks.sort_unstable();
        ranks
    }

    /// The next generation's membership: the alive members, re-ranked 0..n in their old
    /// order, then the waiting replacements of whole nodes, node-major; everyone else loses
    /// their rank. Returns the ids of the members.
    pub fn regroup(&mut self) -> Vec<u64> {
        self.regroup_taking(true)
    }

    /// [`Membership::regroup`]; with `take_waiting` false the replacements keep waiting.
    pub fn regroup_taking(&mut self, take_waiting: bool) -> Vec<u64> {
        let mut members: Vec<&mut Worker> = self
            .workers
            .iter_mut()
            .filter(|w| w.rank.is_some())
            .collect();
        members.sort_by_key(|w| w.rank);
        let mut ids = Vec::new();
        for w in members {
            if w.liveness == WorkerLiveness::Alive {
                w.rank = Some(ids.len() as u32);
                ids.push(w.id);
            } else {
                w.rank = None;
            }
        }
        let waiting = if take_waiting {
            self.waiting_ids()
        } else {
            Vec::new()
        };
        for id in self.node_major(waiting) {
            if let Some(w) = self.get_mut(id) {
                w.rank = Some(ids.len() as u32);
                ids.push(id);
            }
        }
        self.world_size = ids.len() as u32;
        self.generation += 1;
        ids
    }

    /// The collective addresses of the ranks `rank` links to (only meaningful once
    /// complete): every other rank when the collective is a full `mesh`, else its two ring
    /// neighbours (the worker's `dist::tcp::Topology` links the same pairs). Every
    /// rendezvous reply carries this; the whole list to each rank made a regroup of n ranks
    /// send n^2 addresses.
    pub fn linked_peers(&self, rank: u32, mesh: bool) -> Vec<proto::PeerAddress> {
        let world = self.world_size;
        let linked = |peer: u32| {
            peer != rank && (mesh || peer == (rank + 1) % world || (peer + 1) % world == rank)
        };
        let mut peers: Vec<proto::PeerAddress> = self
            .workers
            .iter()
            .filter_map(|w| {
                w.rank.filter(|&r| linked(r)).map(|r| proto::PeerAddress {
                    rank: r,
                    address: w.address.clone(),
                })
            })
            .collect();
        peers.sort_unstable_by_key(|p| p.rank);
        peers
    }
}
