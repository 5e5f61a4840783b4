//! A TCP collective whose mesh can be rebuilt in place when the membership changes: the
//! survivors of a failure keep using the same `Arc<dyn Collective>` (the training loop, the MoE
//! blocks) while [`Regroupable::regroup`] swaps the mesh underneath for the next generation's.

use std::sync::RwLock;
use std::time::Duration;

use tch::Tensor;

use super::tcp::{TcpBootstrap, TcpCollective};
use super::{Collective, CollectiveError, Result};

pub struct Regroupable {
    mesh: RwLock<Mesh>,
}

enum Mesh {
    Connected(TcpCollective),
    /// No mesh (a regroup failed, or none was built yet): the listener waits for the next
    /// regroup, and the place (rank, world) last assigned is what the collective reports.
    Unconnected(TcpBootstrap, usize, usize),
    /// Only while a regroup is under way.
    Rebuilding,
}

impl Regroupable {
    pub fn new(mesh: TcpCollective) -> Self {
        Self {
            mesh: RwLock::new(Mesh::Connected(mesh)),
        }
    }

    /// A listener with no mesh yet: the first [`Regroupable::regroup`] builds one (a
    /// replacement joining a running job). Until then it reports `rank` of `world`, the place
    /// it was assigned (an MoE model is built for it before the mesh exists).
    pub fn unconnected(bootstrap: TcpBootstrap, rank: usize, world: usize) -> Self {
        Self {
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
            Mesh::Connected(old) => old.into_bootstrap(),
            Mesh::Unconnected(b, ..) => b,
            Mesh::Rebuilding => {
                return Err(CollectiveError::Usage(
                    "a regroup panicked earlier: no listener to rebuild on".into(),
                ))
            }
        };
        let world = peer_addrs.len();
        match bootstrap
            .with_generation(generation)
            .try_connect(rank, peer_addrs, timeout)
        {
            Ok(mesh) => {
                *slot = Mesh::Connected(mesh);
                Ok(())
            }
            Err(failed) => {
                let (e, bootstrap) = *failed;
                *slot = Mesh::Unconnected(bootstrap, rank, world);
                Err(e)
            }
        }
    }

    /// (rank, world) of the mesh, or of the place last assigned while there is none.
    fn place(&self) -> (usize, usize) {
        match &*self.mesh.read().unwrap_or_else(|p| p.into_inner()) {
            Mesh::Connected(m) => (m.rank(), m.world_size()),
            Mesh::Unconnected(_, rank, world) => (*rank, *world),
            Mesh::Rebuilding => (0, 0),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&TcpCollective) -> Result<T>) -> Result<T> {
        let slot = self.mesh.read().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Mesh::Connected(m) => f(m),
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

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.with(|m| m.all_reduce_sum(tensor))
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        self.with(|m| m.all_gather(local, counts))
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        self.with(|m| m.reduce_scatter_sum(full, counts))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        self.with(|m| m.broadcast(tensor, root))
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
