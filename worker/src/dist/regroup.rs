//! A TCP collective whose mesh can be rebuilt in place when the membership changes: the
//! survivors of a failure keep using the same `Arc<dyn Collective>` (the training loop, the MoE
//! blocks) while [`Regroupable::regroup`] swaps the mesh underneath for the next generation's.

use std::sync::RwLock;
use std::time::Duration;

use tch::Tensor;

use super::tcp::TcpCollective;
use super::{Collective, CollectiveError, Result};

pub struct Regroupable {
    /// None only while a regroup is under way, or after one failed.
    mesh: RwLock<Option<TcpCollective>>,
}

impl Regroupable {
    pub fn new(mesh: TcpCollective) -> Self {
        Self {
            mesh: RwLock::new(Some(mesh)),
        }
    }

    /// Builds the mesh of the next generation on the same listener: this process becomes
    /// `rank` of `peer_addrs.len()`. Fails when a peer does not join within `timeout`; the
    /// collective is then unusable.
    pub fn regroup(
        &self,
        rank: usize,
        peer_addrs: Vec<String>,
        generation: u64,
        timeout: Duration,
    ) -> Result<()> {
        let mut slot = self.mesh.write().unwrap_or_else(|p| p.into_inner());
        let old = slot.take().ok_or_else(|| {
            CollectiveError::Usage("an earlier regroup failed: no mesh to rebuild".into())
        })?;
        let mesh = old
            .into_bootstrap()
            .with_generation(generation)
            .connect(rank, peer_addrs, timeout)?;
        *slot = Some(mesh);
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&TcpCollective) -> Result<T>) -> Result<T> {
        let slot = self.mesh.read().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(m) => f(m),
            None => Err(CollectiveError::Usage(
                "the collective is being rebuilt after a membership change".into(),
            )),
        }
    }
}

impl Collective for Regroupable {
    fn rank(&self) -> usize {
        self.with(|m| Ok(m.rank())).unwrap_or(0)
    }

    fn world_size(&self) -> usize {
        self.with(|m| Ok(m.world_size())).unwrap_or(0)
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
