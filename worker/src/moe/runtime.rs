//! What the MoE blocks of one model share: the collective their exchanges use, the expert
//! placement, the mode of the current forward pass, the backward tape, and the step's load.
//!
//! tch has no custom autograd function, so a distributed MoE block cuts the autograd graph
//! at its exchanges (FasterMoE's pattern; the exchange itself, both directions, is
//! [`super::exchange`]) and the step differentiates through the cuts by hand, in
//! [`MoeRuntime::backward`]:
//!
//! - forward: the block input `h` and its normalised tokens `y` are detached into leaves;
//!   the expert outputs come back from the other workers as a third leaf `c`. The rest of
//!   the network continues from `h_leaf + combine(c, gate weights(y_leaf))`;
//! - backward: the ordinary backward of the loss stops at those leaves. Then, block by block
//!   from the last to the first, `c`'s gradient travels to the expert holders (the forward
//!   exchange), backpropagates through the experts, travels back (the reverse exchange), is
//!   added to `y`'s gradient at the dispatched rows, and `y`'s and `h`'s gradients are pushed
//!   into the previous segment — which ends at the previous block's leaves.
//!
//! Every rank records the same blocks in the same order (a rank without samples runs
//! [`crate::model::ContrastiveModel::moe_idle_pass`] with zero tokens), so every exchange of
//! the backward finds its peers.

use super::exchange::{self, grad_or_zeros, ExchangeTape};
use crate::dist::Collective;
use crate::dist::CollectiveError;
use anyhow::{Context, Result};
use contrail_common::config::MoeConfig;
use contrail_common::experts::{BlockPlacement, ExpertPlacement};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

/// The `[moe]` settings a block needs at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSettings {
    pub experts: u32,
    pub top_k: usize,
    pub capacity_factor: f64,
    pub eval_capacity_factor: f64,
    pub min_capacity: i64,
    pub dropless: bool,
    pub jitter: f64,
    pub balance_loss_coef: f64,
    pub z_loss_coef: f64,
}

impl MoeSettings {
    pub fn from_config(c: &MoeConfig) -> Self {
        Self {
            experts: c.experts,
            top_k: c.top_k as usize,
            capacity_factor: c.capacity_factor,
            eval_capacity_factor: c.eval_capacity_factor,
            min_capacity: c.min_capacity as i64,
            dropless: c.dropless,
            jitter: c.jitter,
            balance_loss_coef: c.balance_loss_coef,
            z_loss_coef: c.z_loss_coef,
        }
    }
}

/// How the blocks behave in the forward passes until the next [`MoeRuntime::begin_pass`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pass {
    /// Training: the train capacity factor and jitter; otherwise evaluation (dropless unless
    /// `moe.eval_capacity_factor` is set, no jitter).
    pub train: bool,
    /// Keep the tape for [`MoeRuntime::backward`] (the pass will be differentiated).
    pub record: bool,
    /// Add the routed and dropped counts to the step's load.
    pub count_load: bool,
    /// Weight of this pass's auxiliary losses in the global loss (the pass's share of the
    /// step's samples), so the shares of all passes and ranks add up to one mean.
    pub aux_weight: f64,
}

/// Routed and dropped assignments of one block since the last [`MoeRuntime::take_load`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockLoad {
    pub routed: Vec<i64>,
    pub dropped: i64,
}

/// One distributed block's forward, kept for the backward (see the module comment).
pub(crate) struct Record {
    /// Block input as the previous segment produced it, and its leaf copy (the residual
    /// path; None for a head, whose input is only the tokens).
    pub h: Option<(Tensor, Tensor)>,
    /// Normalised tokens in the previous segment's graph, and their leaf copy (gate + send).
    pub y_in: Tensor,
    pub y_leaf: Tensor,
    /// Token index of every sent row, in send order.
    pub send_token: Tensor,
    /// The exchange to the experts' holders and back (its leaves hold the expert outputs).
    pub exchange: ExchangeTape,
}

/// Shapes of one expert's parameters (name suffix, shape), for the replica gradient sync.
#[derive(Debug, Clone)]
pub(crate) struct ExpertShapes {
    pub params: Vec<(String, Vec<i64>)>,
    pub device: Device,
}

#[derive(Default)]
struct State {
    pass: Pass,
    tape: Vec<Record>,
    aux: Vec<Tensor>,
    load: Vec<BlockLoad>,
    /// Rows this rank's experts received per block (its share of the work).
    received: Vec<i64>,
}

/// Where a block's parameters live, for the replica gradient sync.
struct BlockInfo {
    /// Var-store path of the block's MoE module, e.g. `visual.transformer.resblocks.3.moe`.
    prefix: String,
    shapes: ExpertShapes,
}

pub struct MoeRuntime {
    coll: Arc<dyn Collective>,
    settings: MoeSettings,
    placement: ExpertPlacement,
    blocks: Mutex<Vec<BlockInfo>>,
    state: Mutex<State>,
    /// The first exchange that failed (a peer died, a timeout): a forward pass cannot return
    /// an error, so it is kept here, later blocks skip their exchanges, and the step reports
    /// it ([`MoeRuntime::check`]).
    /// The first failed exchange: its message, and the peer it names (rank, address).
    failure: Mutex<Option<(String, Option<(usize, String)>)>>,
}

impl std::fmt::Debug for MoeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeRuntime")
            .field("rank", &self.coll.rank())
            .field("world", &self.coll.world_size())
            .field("settings", &self.settings)
            .field("placement", &self.placement)
            .finish()
    }
}

impl MoeRuntime {
    /// `placement` has one entry per MoE block, in the order the model creates (and runs)
    /// them: the ViT's blocks, then the text tower's.
    pub fn new(
        coll: Arc<dyn Collective>,
        settings: MoeSettings,
        placement: ExpertPlacement,
    ) -> Result<Arc<Self>> {
        let world = coll.world_size() as u32;
        for (b, p) in placement.blocks.iter().enumerate() {
            anyhow::ensure!(
                p.experts() == settings.experts as usize,
                "MoE block {b}: the placement has {} experts, moe.experts is {}",
                p.experts(),
                settings.experts
            );
            p.validate(world)
                .map_err(|e| anyhow::anyhow!("MoE block {b}: {e}"))?;
        }
        Ok(Arc::new(Self {
            coll,
            settings,
            placement,
            blocks: Mutex::new(Vec::new()),
            state: Mutex::new(State::default()),
            failure: Mutex::new(None),
        }))
    }

    /// The default placement ([`BlockPlacement::spread`]) for `blocks` MoE blocks.
    pub fn spread(
        coll: Arc<dyn Collective>,
        settings: MoeSettings,
        blocks: usize,
    ) -> Result<Arc<Self>> {
        let p = BlockPlacement::spread(settings.experts, coll.world_size() as u32);
        let placement = ExpertPlacement {
            version: 0,
            blocks: vec![p; blocks],
        };
        Self::new(coll, settings, placement)
    }

    pub fn settings(&self) -> &MoeSettings {
        &self.settings
    }

    pub fn placement(&self) -> &ExpertPlacement {
        &self.placement
    }

    pub fn coll(&self) -> &dyn Collective {
        self.coll.as_ref()
    }

    /// Called by each block's constructor, in block order; returns the block's index.
    pub(crate) fn register_block(&self, prefix: String, shapes: ExpertShapes) -> Result<usize> {
        let mut blocks = lock(&self.blocks);
        let b = blocks.len();
        anyhow::ensure!(
            b < self.placement.blocks.len(),
            "the model has more MoE blocks than the placement ({})",
            self.placement.blocks.len()
        );
        blocks.push(BlockInfo { prefix, shapes });
        let mut state = lock(&self.state);
        state.load.push(BlockLoad {
            routed: vec![0; self.settings.experts as usize],
            dropped: 0,
        });
        state.received.push(0);
        Ok(b)
    }

    /// (block, var-store prefix, expert shapes) of every block, in order.
    pub(crate) fn block_params(&self) -> Vec<(usize, String, ExpertShapes)> {
        lock(&self.blocks)
            .iter()
            .enumerate()
            .map(|(b, i)| (b, i.prefix.clone(), i.shapes.clone()))
            .collect()
    }

    pub fn block_count(&self) -> usize {
        lock(&self.blocks).len()
    }

    /// Records a failed exchange (the first one is kept).
    pub(crate) fn fail(&self, error: &anyhow::Error) {
        let peer = error
            .chain()
            .find_map(|c| match c.downcast_ref::<CollectiveError>() {
                Some(
                    CollectiveError::PeerFailed { rank, addr, .. }
                    | CollectiveError::Timeout { rank, addr, .. },
                ) => Some((*rank, addr.clone())),
                _ => None,
            });
        lock(&self.failure).get_or_insert_with(|| (format!("{error:#}"), peer));
    }

    pub(crate) fn failed(&self) -> bool {
        lock(&self.failure).is_some()
    }

    /// The error of a failed exchange since the runtime was made, if any.
    pub fn check(&self) -> Result<()> {
        match lock(&self.failure).as_ref() {
            // A failed peer stays visible as such, so the survivors can regroup.
            Some((e, Some((rank, addr)))) => Err(anyhow::Error::new(CollectiveError::PeerFailed {
                rank: *rank,
                addr: addr.clone(),
                reason: format!("an MoE exchange failed: {e}"),
            })),
            Some((e, None)) => Err(anyhow::anyhow!("MoE exchange failed: {e}")),
            None => Ok(()),
        }
    }

    /// Sets the mode of the following forward passes and forgets any tape not backpropagated.
    pub fn begin_pass(&self, pass: Pass) {
        let mut s = lock(&self.state);
        s.pass = pass;
        s.tape.clear();
        s.aux.clear();
    }

    pub(crate) fn pass(&self) -> Pass {
        lock(&self.state).pass
    }

    pub(crate) fn record(&self, r: Record) {
        lock(&self.state).tape.push(r);
    }

    /// A block's weighted auxiliary loss (kept only in recording passes).
    pub(crate) fn add_aux(&self, loss: Tensor) {
        lock(&self.state).aux.push(loss);
    }

    pub(crate) fn count_load(&self, block: usize, routed: &[i64], dropped: i64) {
        let mut s = lock(&self.state);
        let l = &mut s.load[block];
        for (a, r) in l.routed.iter_mut().zip(routed) {
            *a += r;
        }
        l.dropped += dropped;
    }

    pub(crate) fn count_received(&self, block: usize, rows: i64) {
        lock(&self.state).received[block] += rows;
    }

    /// Rows this rank's experts received per block since the last call (counted in passes
    /// that count load), and resets them: the worker load the placement gives this rank.
    pub fn take_received(&self) -> Vec<i64> {
        let mut s = lock(&self.state);
        let fresh = vec![0; s.received.len()];
        std::mem::replace(&mut s.received, fresh)
    }

    /// This rank's load per block since the last call, and resets it.
    pub fn take_load(&self) -> Vec<BlockLoad> {
        let mut s = lock(&self.state);
        let fresh: Vec<BlockLoad> = s
            .load
            .iter()
            .map(|l| BlockLoad {
                routed: vec![0; l.routed.len()],
                dropped: 0,
            })
            .collect();
        std::mem::replace(&mut s.load, fresh)
    }

    /// Backpropagates `root` (a scalar of the recorded passes' graph, e.g. `sum(z · dz)`) plus
    /// the recorded auxiliary losses through the whole network, across the exchange cuts.
    /// Every rank must call it after the same recorded passes (a rank without samples passes
    /// a root that needs no gradient).
    pub fn backward(&self, root: &Tensor) -> Result<()> {
        self.check()?;
        let (tape, aux) = {
            let mut s = lock(&self.state);
            (std::mem::take(&mut s.tape), std::mem::take(&mut s.aux))
        };
        let total = aux.iter().fold(root.shallow_clone(), |t, a| t + a);
        if total.requires_grad() {
            total.backward();
        }
        let coll = self.coll.as_ref();
        for (i, r) in tape.iter().enumerate().rev() {
            let label = format!("MoE block record {i}");
            let g_send = exchange::backward(coll, &r.exchange, &label)?;
            let g_send = g_send.to_device(r.y_leaf.device()).to_kind(r.y_leaf.kind());
            let g_y = grad_or_zeros(&r.y_leaf).index_add(0, &r.send_token, &g_send);
            let mut terms = vec![(&r.y_in, g_y)];
            if let Some((h_in, h_leaf)) = &r.h {
                terms.push((h_in, grad_or_zeros(h_leaf)));
            }
            // Both into the previous segment in one call (they share its graph).
            let upstream: Vec<Tensor> = terms
                .into_iter()
                .filter(|(t, _)| t.requires_grad())
                .map(|(t, g)| (t * g).sum(Kind::Float))
                .collect();
            if let Some(first) = upstream.first() {
                upstream[1..]
                    .iter()
                    .fold(first.shallow_clone(), |acc, t| acc + t)
                    .backward();
            }
        }
        Ok(())
    }

    /// Sums the gradients of every replicated expert over the world, so each replica holds
    /// the expert's full gradient (each saw only its share of the tokens). Ranks without a
    /// replica contribute zeros. Unreplicated experts already hold their full gradient.
    /// `params` is the model's named parameters.
    pub fn sync_expert_grads(&self, params: &[(String, Tensor)]) -> Result<()> {
        let rank = self.coll.rank() as u32;
        let blocks = lock(&self.blocks);
        for (b, info) in blocks.iter().enumerate() {
            let placement = &self.placement.blocks[b];
            let replicated: Vec<usize> = (0..placement.experts())
                .filter(|&e| placement.holders[e].len() > 1)
                .collect();
            if replicated.is_empty() {
                continue;
            }
            let mut local: Vec<Tensor> = Vec::new();
            let mut flat: Vec<Tensor> = Vec::new();
            for &e in &replicated {
                let holds = placement.holders[e].contains(&rank);
                for (suffix, shape) in &info.shapes.params {
                    let name = format!("{}.experts.{e}.{suffix}", info.prefix);
                    let g = if holds {
                        let g = params
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, p)| p.grad())
                            .with_context(|| format!("expert parameter {name} is missing"))?;
                        local.push(g.shallow_clone());
                        g
                    } else {
                        Tensor::zeros(shape.as_slice(), (Kind::Float, info.shapes.device))
                    };
                    flat.push(g.reshape([-1]));
                }
            }
            let mut flat = Tensor::cat(&flat, 0);
            self.coll
                .all_reduce_sum(&mut flat)
                .with_context(|| format!("summing replicated expert gradients of MoE block {b}"))?;
            let flat = flat.to_device(info.shapes.device);
            // Copy back into the local replicas, in the order they were flattened.
            let mut at = 0;
            let mut next_local = local.into_iter();
            for &e in &replicated {
                let holds = placement.holders[e].contains(&rank);
                for (_, shape) in &info.shapes.params {
                    let n: i64 = shape.iter().product();
                    if holds {
                        let g = next_local.next().expect("one local gradient per parameter");
                        g.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(&g));
                    }
                    at += n;
                }
            }
        }
        Ok(())
    }
}

/// Whether a parameter belongs to an expert (reduced among its replicas, not data-parallel).
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".moe.experts.")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
