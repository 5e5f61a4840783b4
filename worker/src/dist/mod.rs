//! Collectives: the [`Collective`] trait every backend implements, and its backends.
//!
//! Rules every caller follows (they are what makes a hang impossible): every rank enters every
//! collective the same number of times and in the same order, with the same `counts`; a rank
//! with no data passes zero rows. A backend turns a peer that disappears or falls silent into
//! an error that names the peer, within `cluster.collective_timeout_ms`.

use tch::Tensor;

pub mod grad_sync;
pub mod local;
pub mod nccl;
pub mod regroup;
mod rows;
pub mod staged;
pub mod tcp;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective peer rank {rank} ({addr}) failed: {reason}")]
    PeerFailed {
        rank: usize,
        addr: String,
        reason: String,
    },
    #[error("collective peer rank {rank} ({addr}) sent nothing for {waited_ms} ms")]
    Timeout {
        rank: usize,
        addr: String,
        waited_ms: u64,
    },
    #[error("collective called wrongly: {0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// Collective operations on tch tensors. Tensors are contiguous CPU tensors for the TCP
/// backend. Sums are supported for Float, Double, BFloat16, Int and Int64; the data-moving operations
/// (gather, broadcast, all-to-all) work for any kind.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// In-place elementwise sum across ranks; every rank ends with identical values.
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()>;

    /// Concatenation along dim 0 of every rank's `local`, in rank order. `counts[r]` is the
    /// number of rows rank r contributes (identical on all ranks; zero is allowed).
    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor>;

    /// Sums `full` (sum(counts) rows, identical shape on all ranks) across ranks and returns
    /// the `counts[rank]` rows that belong to this rank.
    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor>;

    /// Copies `root`'s tensor into `tensor` on every rank (same shape and kind everywhere).
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()>;

    /// Rows `input[offset_p .. offset_p + send_counts[p]]` go to rank p. Returns the rows
    /// received from every rank concatenated in rank order, and how many came from each.
    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)>;

    /// [`Collective::all_to_all`] when this rank already knows how many rows each peer sends
    /// it (`recv_counts`, e.g. from an earlier exchange or the reverse of one): a backend may
    /// skip its round of counts. Every rank of the call must use this form.
    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor> {
        let (out, got) = self.all_to_all(input, send_counts)?;
        if got != recv_counts {
            return Err(CollectiveError::Usage(format!(
                "all_to_all_known: expected {recv_counts:?} rows from the ranks, got {got:?}"
            )));
        }
        Ok(out)
    }

    fn barrier(&self) -> Result<()>;
}

/// Every rank's `local` count, in rank order (used before variable-size gathers).
/// Every rank's micro-batch rows for the step, and whether any rank asks to stop at this
/// step boundary (a replacement waits to join): one collective, so all ranks agree on both.
pub fn all_gather_step_plan(
    c: &dyn Collective,
    local: i64,
    stop_here: bool,
) -> Result<(Vec<i64>, bool)> {
    let counts = vec![1i64; c.world_size()];
    let row = Tensor::from_slice(&[local, i64::from(stop_here)]).view([1, 2]);
    let t = c.all_gather(&row, &counts)?;
    let flat = Vec::<i64>::try_from(&t.view([-1])).expect("an Int64 tensor converts to Vec<i64>");
    let rows: Vec<i64> = flat.chunks_exact(2).map(|r| r[0]).collect();
    let stop = flat.chunks_exact(2).any(|r| r[1] != 0);
    Ok((rows, stop))
}

pub fn all_gather_counts(c: &dyn Collective, local: i64) -> Result<Vec<i64>> {
    let counts = vec![1i64; c.world_size()];
    let t = c.all_gather(&Tensor::from_slice(&[local]), &counts)?;
    Ok(Vec::<i64>::try_from(&t).expect("an Int64 tensor converts to Vec<i64>"))
}
