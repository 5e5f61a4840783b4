//! Gather with gradient, written out (tch has no custom autograd functions): every rank's
//! embeddings as one leaf that records gradients, and the gradient of that leaf summed back to
//! the rank that owns each row. SimCLR and CLIP use it.

use crate::dist::Collective;
use anyhow::{Context, Result};
use tch::Tensor;

/// Row offset of this rank's block and the block sizes (2 rows per sample).
pub(crate) fn block_layout(counts: &[i64], rank: usize) -> (Vec<i64>, i64) {
    let rows: Vec<i64> = counts.iter().map(|c| 2 * c).collect();
    let offset = rows[..rank].iter().sum();
    (rows, offset)
}

/// Every rank's embeddings (`rows[r]` from rank r), as a fresh leaf that records gradients. A
/// single rank has nothing to gather.
pub(crate) fn gather_rows(z_local: &Tensor, rows: &[i64], coll: &dyn Collective) -> Result<Tensor> {
    let gathered = if coll.world_size() == 1 {
        z_local.detach().copy()
    } else {
        coll.all_gather(&z_local.contiguous(), rows)
            .with_context(|| {
                format!(
                    "rank {}: all-gathering embeddings ({rows:?} rows)",
                    coll.rank()
                )
            })?
            .to_device(z_local.device())
    };
    Ok(gathered.set_requires_grad(true))
}

/// This rank's rows of the sum over ranks of `d_gathered`: every rank's gradient holds its own
/// anchors' contributions to every row, so the sum is the full gradient of each row.
pub(crate) fn scatter_back(
    d_gathered: Tensor,
    rows: &[i64],
    coll: &dyn Collective,
) -> Result<Tensor> {
    if coll.world_size() == 1 {
        return Ok(d_gathered);
    }
    let device = d_gathered.device();
    Ok(coll
        .reduce_scatter_sum(&d_gathered.contiguous(), rows)
        .with_context(|| {
            format!(
                "rank {}: reduce-scattering embedding gradients",
                coll.rank()
            )
        })?
        .to_device(device))
}
