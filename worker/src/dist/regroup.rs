//! A collective whose mesh can be rebuilt in place when the membership changes: the survivors
//! of a failure keep using the same `Arc<dyn Collective>` (the training loop, the MoE blocks)
//! while [`Regroupable::regroup`] swaps the mesh underneath for the next generation's.
//!
//! The TCP mesh is always there: it is what a generation is formed on (the handshake proves
//! the job token and the generation). Operations run on the [`Transport`] above it: the mesh
//! itself, the mesh with GPU tensors staged through the host, or an NCCL communicator. On a
//! regroup the old NCCL communicator is aborted (its kernels quit; a dead peer can never be
//! waited for), the new mesh is built, and rank 0 of the new generation sends a fresh NCCL
//! unique id over it for the new communicator.

use std::sync::RwLock;
use std::time::Duration;

use tch::{Device, Tensor};

use super::nccl::{self, NcclCollective};
use super::staged::HostStaged;
use super::tcp::{TcpBootstrap, TcpCollective};
use super::{Collective, CollectiveError, Result};

/// What the operations run on above the TCP mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The TCP mesh (CPU tensors).
    Tcp,
    /// The TCP mesh, GPU tensors copied through the host.
    HostStaged,
    /// An NCCL communicator on `cuda:device`; `timeout` bounds its setup and every operation.
    Nccl { device: usize, timeout: Duration },
}

pub struct Regroupable {
    transport: Transport,
    mesh: RwLock<Mesh>,
}

/// A formed generation's collective.
enum Active {
    Tcp(TcpCollective),
    Staged(HostStaged<TcpCollective>),
    Nccl(TcpCollective, NcclCollective),
}

impl Active {
    /// The TCP mesh below the transport.
    fn mesh(&self) -> &TcpCollective {
        match self {
            Active::Tcp(t) | Active::Nccl(t, _) => t,
            Active::Staged(s) => s.inner(),
        }
    }

    fn coll(&self) -> &dyn Collective {
        match self {
            Active::Tcp(t) => t,
            Active::Staged(s) => s,
            Active::Nccl(_, n) => n,
        }
    }

    /// Where a tensor on `device` goes: an NCCL job's host tensors (step plans, sample ids,
    /// the loss) travel over the TCP mesh rather than to the GPU and back, which would cost a
    /// copy each way and a wait for the stream. Every rank passes the same device for the
    /// same call, so all of them take the same path.
    fn coll_for(&self, device: Device) -> &dyn Collective {
        match self {
            Active::Nccl(t, _) if device == Device::Cpu => t,
            _ => self.coll(),
        }
    }

    /// The listener back, for the next generation; an NCCL communicator is aborted first.
    fn into_bootstrap(self, why: &str) -> TcpBootstrap {
        match self {
            Active::Tcp(t) => t.into_bootstrap(),
            Active::Staged(s) => s.into_inner().into_bootstrap(),
            Active::Nccl(t, n) => {
                n.abort(why);
                drop(n);
                t.into_bootstrap()
            }
        }
    }
}

enum Mesh {
    Connected(Box<Active>),
    /// No mesh (a regroup failed, or none was built yet): the listener waits for the next
    /// regroup, and the place (rank, world) last assigned is what the collective reports.
    Unconnected(TcpBootstrap, usize, usize),
    /// Only while a regroup is under way.
    Rebuilding,
}

/// Puts `transport` on a freshly built mesh (collective: every rank of the generation calls
/// it). On failure the mesh comes back for its listener.
fn activate(
    tcp: TcpCollective,
    transport: Transport,
) -> std::result::Result<Box<Active>, Box<(CollectiveError, TcpCollective)>> {
    Ok(Box::new(match transport {
        Transport::Tcp => Active::Tcp(tcp),
        Transport::HostStaged => Active::Staged(HostStaged::new(tcp)),
        Transport::Nccl { device, timeout } => match nccl::join_over(&tcp, device, timeout) {
            Ok(n) => Active::Nccl(tcp, n),
            Err(e) => return Err(Box::new((as_collective_error(e), tcp))),
        },
    }))
}

/// A failed NCCL setup as a collective error: a peer that failed or never joined stays a peer
/// failure (the members regroup again), anything else is a usage error.
fn as_collective_error(e: anyhow::Error) -> CollectiveError {
    let reason = format!("{e:#}");
    match e.chain().find_map(|c| c.downcast_ref::<CollectiveError>()) {
        Some(CollectiveError::PeerFailed { rank, addr, .. }) => CollectiveError::PeerFailed {
            rank: *rank,
            addr: addr.clone(),
            reason,
        },
        Some(CollectiveError::Timeout {
            rank,
            addr,
            waited_ms,
        }) => CollectiveError::Timeout {
            rank: *rank,
            addr: addr.clone(),
            waited_ms: *waited_ms,
        },
        _ => CollectiveError::Usage(reason),
    }
}

impl Regroupable {
    /// The first generation's collective on `mesh` (collective: with NCCL every rank joins the
    /// communicator here).
    pub fn new(mesh: TcpCollective, transport: Transport) -> Result<Self> {
        let active = activate(mesh, transport).map_err(|failed| failed.0)?;
        Ok(Self {
            transport,
            mesh: RwLock::new(Mesh::Connected(active)),
        })
    }

    /// A listener with no mesh yet: the first [`Regroupable::regroup`] builds one (a
    /// replacement joining a running job). Until then it reports `rank` of `world`, the place
    /// it was assigned (an MoE model is built for it before the mesh exists).
    pub fn unconnected(
        bootstrap: TcpBootstrap,
        rank: usize,
        world: usize,
        transport: Transport,
    ) -> Self {
        Self {
            transport,
            mesh: RwLock::new(Mesh::Unconnected(bootstrap, rank, world)),
        }
    }

    /// Builds the mesh of the next generation on the same listener: this process becomes
    /// `rank` of `peer_addrs.len()`. Fails when a peer does not join within `timeout`; the
    /// collective is then unusable until a later regroup succeeds.
    pub fn regroup(
        &self,
        rank: usize,
        peer_addrs: Vec<String>,
        generation: u64,
        timeout: Duration,
    ) -> Result<()> {
        let mut slot = self.mesh.write().unwrap_or_else(|p| p.into_inner());
        let bootstrap = match std::mem::replace(&mut *slot, Mesh::Rebuilding) {
            Mesh::Connected(old) => {
                old.into_bootstrap(&format!("the membership changes (generation {generation})"))
            }
            Mesh::Unconnected(b, ..) => b,
            Mesh::Rebuilding => {
                return Err(CollectiveError::Usage(
                    "a regroup panicked earlier: no listener to rebuild on".into(),
                ))
            }
        };
        let world = peer_addrs.len();
        let (e, bootstrap) = match bootstrap
            .with_generation(generation)
            .try_connect(rank, peer_addrs, timeout)
        {
            Ok(mesh) => match activate(mesh, self.transport) {
                Ok(active) => {
                    *slot = Mesh::Connected(active);
                    return Ok(());
                }
                Err(failed) => {
                    let (e, mesh) = *failed;
                    (e, mesh.into_bootstrap())
                }
            },
            Err(failed) => *failed,
        };
        *slot = Mesh::Unconnected(bootstrap, rank, world);
        Err(e)
    }

    /// Makes the collective of generation `generation` or older fail at once, from any thread
    /// (the coordinator reports one of its members lost): its TCP connections are shut down,
    /// an NCCL communicator is aborted. A newer generation's mesh, or one being rebuilt, is
    /// left alone.
    pub fn interrupt(&self, generation: u64, reason: &str) {
        let Ok(slot) = self.mesh.try_read() else {
            return;
        };
        if let Mesh::Connected(active) = &*slot {
            if active.mesh().generation() > generation {
                return;
            }
            tracing::warn!(generation, "interrupting the collective: {reason}");
            if let Active::Nccl(_, n) = &**active {
                n.abort(reason);
            }
            active.mesh().interrupt();
        }
    }

    /// (rank, world) of the mesh, or of the place last assigned while there is none.
    fn place(&self) -> (usize, usize) {
        match &*self.mesh.read().unwrap_or_else(|p| p.into_inner()) {
            Mesh::Connected(m) => (m.coll().rank(), m.coll().world_size()),
            Mesh::Unconnected(_, rank, world) => (*rank, *world),
            Mesh::Rebuilding => (0, 0),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&dyn Collective) -> Result<T>) -> Result<T> {
        self.with_on(None, f)
    }

    /// [`Regroupable::with`] for a tensor on `device` (see `Active::coll_for`).
    fn with_on<T>(
        &self,
        device: Option<Device>,
        f: impl FnOnce(&dyn Collective) -> Result<T>,
    ) -> Result<T> {
        let slot = self.mesh.read().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Mesh::Connected(m) => f(device.map_or(m.coll(), |d| m.coll_for(d))),
            _ => Err(CollectiveError::Usage(
                "the collective is being rebuilt after a membership change".into(),
            )),
        }
    }
}

impl Collective for Regroupable {
    fn rank(&self) -> usize {
        self.place().0
    }

    fn world_size(&self) -> usize {
        self.place().1
    }

    // Sums, gathers and broadcasts of host tensors take the TCP mesh under NCCL; the
    // operations that carry activations and gradients stay on the transport.
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.with_on(Some(tensor.device()), |m| m.all_reduce_sum(tensor))
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        self.with_on(Some(local.device()), |m| m.all_gather(local, counts))
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        self.with(|m| m.reduce_scatter_sum(full, counts))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        self.with_on(Some(tensor.device()), |m| m.broadcast(tensor, root))
    }

    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)> {
        self.with(|m| m.all_to_all(input, send_counts))
    }

    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor> {
        self.with(|m| m.all_to_all_known(input, send_counts, recv_counts))
    }

    fn barrier(&self) -> Result<()> {
        self.with(|m| m.barrier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(20);

    /// Two ranks on threads: each binds a listener, and `run(rank, bootstraps' addresses,
    /// bootstrap)` runs on its own thread; returns what each returned.
    fn two_ranks<T: Send>(run: impl Fn(usize, Vec<String>, TcpBootstrap) -> T + Sync) -> Vec<T> {
        let boots: Vec<TcpBootstrap> = (0..2)
            .map(|_| TcpCollective::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<String> = boots
            .iter()
            .map(|b| b.local_addr().unwrap().to_string())
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = boots
                .into_iter()
                .enumerate()
                .map(|(rank, b)| {
                    let (addrs, run) = (addrs.clone(), &run);
                    s.spawn(move || run(rank, addrs, b))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn sum_of_ranks(c: &dyn Collective) -> f64 {
        let mut t = Tensor::from_slice(&[c.rank() as f64 + 1.0]);
        c.all_reduce_sum(&mut t).unwrap();
        t.double_value(&[0])
    }

    /// The host-staged transport regroups like the TCP one: a new generation with the ranks
    /// swapped runs on the same listeners, and a generation whose peer never comes leaves the
    /// collective unconnected (reporting its assigned place) until a later regroup succeeds.
    #[test]
    fn a_staged_collective_regroups_on_its_listener() {
        let out = two_ranks(|rank, addrs, boot| {
            let tcp = boot.connect(rank, addrs.clone(), TIMEOUT).unwrap();
            let c = Regroupable::new(tcp, Transport::HostStaged).unwrap();
            let first = sum_of_ranks(&c);
            // Generation 2: the ranks swap.
            let swapped = vec![addrs[1].clone(), addrs[0].clone()];
            c.regroup(1 - rank, swapped, 2, TIMEOUT).unwrap();
            let second = (c.rank(), sum_of_ranks(&c));
            // Generation 3 names a third peer that never comes: only rank 0 tries it.
            let failed = if rank == 0 {
                let dead = TcpCollective::bind("127.0.0.1:0").unwrap();
                let with_dead = vec![addrs[0].clone(), dead.local_addr().unwrap().to_string()];
                let e = c.regroup(0, with_dead, 3, Duration::from_millis(300));
                let err = c
                    .all_reduce_sum(&mut Tensor::from_slice(&[1.0f64]))
                    .unwrap_err();
                Some((e.is_err(), (c.rank(), c.world_size()), err.to_string()))
            } else {
                None
            };
            (first, second, failed)
        });
        assert_eq!(out[0].0, 3.0);
        assert_eq!(out[1].0, 3.0);
        assert_eq!(out[0].1, (1, 3.0), "rank 0 became rank 1");
        assert_eq!(out[1].1, (0, 3.0));
        let (failed, place, err) = out[0].2.clone().unwrap();
        assert!(failed, "a peer that never connects fails the regroup");
        assert_eq!(place, (0, 2), "the assigned place while unconnected");
        assert!(err.contains("being rebuilt"), "{err}");
    }
}
