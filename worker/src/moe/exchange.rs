//! The token exchange of a distributed MoE block, forward and backward in one place.
//!
//! Forward: the expert counts travel first (so each holder knows which received rows belong
//! to which of its experts), then the routed rows go to the holders, the local experts run on
//! what arrived, and their outputs travel back in send order. Backward: the gradient of those
//! outputs travels to the holders (the forward's return path reversed), backpropagates
//! through the experts, and the experts' input gradient travels back to the tokens' owners.
//!
//! tch has no custom autograd function, so the graph is cut at the exchange: the received
//! rows and the returned outputs are leaves ([`ExchangeTape`]), and [`backward`] joins the
//! cut by hand. [`super::runtime`] keeps the tapes of a pass and runs the backward of the
//! segments between cuts.

use crate::dist::Collective;
use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// What one block sends: rows of the tokens in send order (grouped by destination rank) and
/// the per-expert counts each rank receives first.
pub(crate) struct Outgoing<'a> {
    /// Rows to send, in send order (a leaf of the block's tokens when the pass records).
    pub rows: &'a Tensor,
    pub send_counts: Vec<i64>,
    /// Per destination rank, the rows for each of its local experts.
    pub header: Vec<i64>,
    pub header_counts: Vec<i64>,
    /// Experts this rank holds (the header's stride on arrival).
    pub local_experts: usize,
}

/// One exchange's forward, kept for [`backward`].
pub(crate) struct ExchangeTape {
    pub send_counts: Vec<i64>,
    pub recv_counts: Vec<i64>,
    /// Rows received for the local experts (a leaf) and the experts' outputs for them.
    pub recv_leaf: Tensor,
    pub expert_out: Tensor,
    /// The expert outputs back at this rank, in send order (a leaf).
    pub returned: Tensor,
}

/// Sends `out.rows` to the experts' holders, runs `experts(received rows, rows per local
/// expert)` on what this rank receives, and brings the outputs back in send order. With
/// `record`, the received rows and the returned outputs are leaves that require a gradient.
pub(crate) fn forward(
    coll: &dyn Collective,
    out: Outgoing<'_>,
    record: bool,
    experts: impl FnOnce(&Tensor, &[Vec<i64>]) -> Tensor,
) -> Result<ExchangeTape> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let device = out.rows.device();
    let leaf = |t: Tensor| {
        if record {
            t.detach().set_requires_grad(true)
        } else {
            t
        }
    };
    let (recv_header, _) = coll
        .all_to_all(&Tensor::from_slice(&out.header), &out.header_counts)
        .with_context(|| format!("rank {rank}: exchanging expert counts"))?;
    let recv_header = Vec::<i64>::try_from(&recv_header).expect("Int64 counts");
    // The header already says how many rows each source sends: no second count round.
    let n_local = out.local_experts;
    let recv_counts: Vec<i64> = recv_header
        .chunks(n_local.max(1))
        .map(|c| c.iter().sum())
        .collect();
    let recv = coll
        .all_to_all_known(
            &out.rows.detach().contiguous(),
            &out.send_counts,
            &recv_counts,
        )
        .with_context(|| format!("rank {rank}: dispatching tokens"))?;
    let recv_leaf = leaf(recv.to_device(device));
    let per_expert = super::dispatch::rows_per_local_expert(&recv_header, world, n_local);
    let expert_out = experts(&recv_leaf, &per_expert);
    let back = coll
        .all_to_all_known(
            &expert_out.detach().contiguous(),
            &recv_counts,
            &out.send_counts,
        )
        .with_context(|| format!("rank {rank}: returning expert outputs"))?;
    Ok(ExchangeTape {
        send_counts: out.send_counts,
        recv_counts,
        recv_leaf,
        expert_out,
        returned: leaf(back.to_device(device)),
    })
}

/// Joins the cut of one recorded exchange: takes the gradient that reached
/// [`ExchangeTape::returned`], backpropagates it through the holders' experts, and returns
/// the gradient of the sent rows (in send order) at this rank. `label` names the exchange in
/// errors.
pub(crate) fn backward(coll: &dyn Collective, tape: &ExchangeTape, label: &str) -> Result<Tensor> {
    let rank = coll.rank();
    // The incoming gradient of the expert outputs goes to their holders ...
    let g_returned = grad_or_zeros(&tape.returned);
    let g_out = coll
        .all_to_all_known(
            &g_returned.contiguous(),
            &tape.send_counts,
            &tape.recv_counts,
        )
        .with_context(|| format!("rank {rank}: {label}, gradient to experts"))?;
    if tape.expert_out.numel() > 0 {
        let g_out = g_out.to_device(tape.expert_out.device());
        (&tape.expert_out * g_out.to_kind(tape.expert_out.kind()))
            .sum(Kind::Float)
            .backward();
    }
    // ... and the experts' input gradient comes back to the tokens' owners.
    let g_recv = grad_or_zeros(&tape.recv_leaf);
    coll.all_to_all_known(&g_recv.contiguous(), &tape.recv_counts, &tape.send_counts)
        .with_context(|| format!("rank {rank}: {label}, gradient back"))
}

/// The gradient a leaf received, or zeros when nothing reached it.
pub(crate) fn grad_or_zeros(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g
    } else {
        t.detach().zeros_like()
    }
}
