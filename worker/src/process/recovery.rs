//! What the survivors of a failure do between the old generation's mesh and the new one's
//! first step (`cluster.min_workers`): tell a peer failure from other errors, and agree on
//! one state.
//!
//! Which way the state flows: a ring all-reduce can complete on some ranks and fail on
//! others, so survivors may disagree by one step. The most advanced survivor (the lowest
//! rank among those with the highest committed step) is the source: every parameter, buffer
//! and optimizer state tensor is broadcast from it, and everyone continues from its step.
//! No committed step is discarded, and all ranks continue with identical state.
//!
//! A rank takes nothing over until it has received everything: if the source dies in the
//! middle, every rank still holds its own consistent state, and the regroup starts again.

use super::ledger::TrainedSet;
use crate::dist::{Collective, CollectiveError};
use crate::model::ContrastiveModel;
use crate::moe::is_expert_param;
use crate::optim::Optimizer;
use crate::train::restore;
use crate::train::trainer::RegroupRequested;
use anyhow::{Context, Result};
use contrail_common::config::OptimConfig;
use contrail_common::experts::ExpertPlacement;
use contrail_common::JobConfig;
use std::sync::Mutex;
use tch::Tensor;

/// Whether `e` comes from a collective peer that failed or fell silent (what a regroup can
/// repair), rather than from this rank's own data, model or storage.
pub fn is_peer_failure(e: &anyhow::Error) -> bool {
    failed_peer(e).is_some() || e.chain().any(|c| c.is::<RegroupRequested>())
}

/// The job as it goes on after a membership change: `world` workers (the global batch stays,
/// so it must divide by the new world), and no evaluation round before the first step again.
pub fn resized(cfg: &JobConfig, world: usize) -> Result<JobConfig> {
    let mut cfg = cfg.clone();
    cfg.cluster.world_size = world as u32;
    cfg.eval.at_start = false;
    cfg.validate_resized()
        .map_err(|e| anyhow::anyhow!("the job cannot go on with {world} workers: {e}"))?;
    Ok(cfg)
}

/// The peer a collective failure names (its rank in the failed generation), if any.
pub fn failed_peer(e: &anyhow::Error) -> Option<usize> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<CollectiveError>() {
            Some(
                CollectiveError::PeerFailed { rank, .. } | CollectiveError::Timeout { rank, .. },
            ) => Some(*rank),
            _ => None,
        })
}

/// Every member's last committed step, and the source of the agreed state: the most
/// advanced rank (the lowest among those with the highest step).
struct Steps {
    steps: Vec<u64>,
    root: usize,
    step: u64,
    epoch: u32,
}

/// Collective: gathers every member's `mine` = (epoch, step).
fn gather_steps(coll: &dyn Collective, mine: (u32, u64)) -> Result<Steps> {
    let world = coll.world_size();
    let local = Tensor::from_slice(&[mine.1 as i64, i64::from(mine.0)]).view([1, 2]);
    let all = coll
        .all_gather(&local, &vec![1; world])
        .context("gathering every survivor's step")?;
    let all: Vec<i64> = Vec::try_from(all.flatten(0, -1)).context("reading the steps")?;
    let (root, step, epoch) = (0..world)
        .map(|r| (r, all[2 * r], all[2 * r + 1]))
        .max_by_key(|&(r, step, _)| (step, std::cmp::Reverse(r)))
        .expect("a world has at least one rank");
    Ok(Steps {
        steps: (0..world).map(|r| all[2 * r] as u64).collect(),
        root,
        step: step as u64,
        epoch: epoch as u32,
    })
}

/// Agrees on (epoch, step) and state over the new mesh: the most advanced rank's wins.
/// `mine` is this rank's last committed (epoch, step).
pub fn agree_on_state(
    coll: &dyn Collective,
    model: &mut ContrastiveModel,
    opt: &mut dyn Optimizer,
    trained: &Mutex<TrainedSet>,
    mine: (u32, u64),
) -> Result<(u32, u64)> {
    let Steps {
        root, step, epoch, ..
    } = gather_steps(coll, mine)?;
    let variables = model.named_variables();
    let mut received = Vec::with_capacity(variables.len());
    for (name, var) in &variables {
        let mut buf = var.detach().copy();
        coll.broadcast(&mut buf, root)
            .with_context(|| format!("broadcasting {name} from rank {root}"))?;
        received.push(buf);
    }
    let mut state = opt.state_tensors();
    for (name, t) in state.iter_mut() {
        let mut buf = t.detach().copy();
        coll.broadcast(&mut buf, root)
            .with_context(|| format!("broadcasting optimizer state {name} from rank {root}"))?;
        *t = buf;
    }
    let (set_epoch, ids) = receive_trained(coll, trained, root)?;
    // Everything arrived: take it over.
    for ((_, var), buf) in variables.into_iter().zip(received) {
        tch::no_grad(|| {
            let mut v = var;
            v.copy_(&buf);
        });
    }
    opt.load_state(&state)
        .context("loading the broadcast optimizer state")?;
    trained
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(set_epoch, &ids);
    Ok((epoch, step))
}

/// How [`agree_on_moe_state`] ended.
pub enum MoeAgreement {
    /// Every member holds the state of (epoch, step) for the new placement.
    Agreed(u32, u64),
    /// An expert survives only a step behind the others: nothing changed, the members must
    /// roll back to the latest checkpoint (why).
    RollBack(String),
}

/// [`agree_on_state`] for a job with MoE blocks: the shared state from the most advanced
/// member, each expert from a surviving replica at that step, the model rebuilt for
/// `placement` (the new generation's, see [`crate::train::restore`]).
#[allow(clippy::too_many_arguments)]
pub fn agree_on_moe_state(
    coll: &dyn Collective,
    model: &mut ContrastiveModel,
    opt: &mut Box<dyn Optimizer>,
    trained: &Mutex<TrainedSet>,
    mine: (u32, u64),
    placement: ExpertPlacement,
    optim_cfg: &OptimConfig,
    rebuild: &mut dyn FnMut(ExpertPlacement) -> Result<ContrastiveModel>,
) -> Result<MoeAgreement> {
    let steps = gather_steps(coll, mine)?;
    let experts = placement.blocks.first().map_or(0, |b| b.experts());
    // Which experts each member holds at the agreed step (none when it is behind).
    let held = restore::held_experts(model, experts)?;
    let at_step = steps.steps[coll.rank()] == steps.step;
    let flags: Vec<i64> = held
        .iter()
        .flatten()
        .map(|&h| i64::from(h && at_step))
        .collect();
    let world = coll.world_size();
    let all = coll
        .all_gather(
            &Tensor::from_slice(&flags).view([1, flags.len() as i64]),
            &vec![1; world],
        )
        .context("gathering which experts every survivor holds")?;
    let all: Vec<i64> = Vec::try_from(all.flatten(0, -1)).context("reading the holdings")?;
    let usable: Vec<Vec<Vec<bool>>> = all
        .chunks(flags.len().max(1))
        .take(world)
        .map(|rank| {
            rank.chunks(experts.max(1))
                .map(|block| block.iter().map(|&f| f != 0).collect())
                .collect()
        })
        .collect();
    let restored = restore::restore_experts(
        coll,
        model,
        opt.as_ref(),
        &usable,
        steps.root,
        placement,
        optim_cfg,
        rebuild,
    )?;
    let (next, next_opt) = match restored {
        restore::Restored::Ready(next, next_opt) => (next, next_opt),
        restore::Restored::ExpertsBehind(why) => return Ok(MoeAgreement::RollBack(why)),
    };
    let (set_epoch, ids) = receive_trained(coll, trained, steps.root)?;
    // Everything arrived: take it over.
    *model = *next;
    *opt = next_opt;
    trained
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(set_epoch, &ids);
    Ok(MoeAgreement::Agreed(steps.epoch, steps.step))
}

/// Collective: the trained-sample set of the epoch as `root` holds it (its epoch and ids).
fn receive_trained(
    coll: &dyn Collective,
    trained: &Mutex<TrainedSet>,
    root: usize,
) -> Result<(u32, Vec<i64>)> {
    // The lock is not held across the broadcasts: shard readers on the runtime's threads
    // take it for every sample, and a reader blocked on it would stall the heartbeats.
    let (set_epoch, ids) = trained.lock().unwrap_or_else(|p| p.into_inner()).export();
    let mut head = Tensor::from_slice(&[ids.len() as i64, i64::from(set_epoch)]);
    coll.broadcast(&mut head, root)
        .context("broadcasting the size of the trained-sample set")?;
    let head: Vec<i64> = Vec::try_from(&head).context("reading the set's size")?;
    let ids: Vec<i64> = if head[0] == 0 {
        Vec::new()
    } else {
        let mut buf = if coll.rank() == root {
            Tensor::from_slice(&ids)
        } else {
            Tensor::zeros([head[0]], (tch::Kind::Int64, tch::Device::Cpu))
        };
        coll.broadcast(&mut buf, root)
            .context("broadcasting the trained-sample set")?;
        Vec::try_from(&buf).context("reading the trained-sample set")?
    };
    Ok((head[1] as u32, ids))
}

/// A digest of every trainable parameter that all ranks share (FNV-1a over their float32
/// bytes, in name order; an MoE model's experts are left out, see [`expert_digests`]): equal
/// on two ranks exactly when those parameters are bit for bit equal (short of a collision).
/// Buffers are left out: BatchNorm running statistics follow each rank's own batches (as
/// DDP's with `broadcast_buffers=False`), and checkpoints keep rank 0's.
pub fn parameter_digest(model: &ContrastiveModel) -> Result<String> {
    let params: Vec<_> = model
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| !is_expert_param(n))
        .collect();
    digest(params)
}

/// One digest per expert this rank holds, as `<block>.experts.<e>=<digest>` joined by
/// spaces: every replica of an expert must show the same.
pub fn expert_digests(model: &ContrastiveModel) -> Result<String> {
    let mut experts: std::collections::BTreeMap<String, Vec<(String, Tensor)>> = Default::default();
    for (name, t) in model.named_parameters() {
        const MARK: &str = ".moe.experts.";
        let Some(at) = name.find(MARK) else { continue };
        let id_len = name[at + MARK.len()..].find('.').unwrap_or(0);
        let key = name[..at + MARK.len() + id_len].to_string();
        experts.entry(key).or_default().push((name, t));
    }
    Ok(experts
        .into_iter()
        .map(|(k, params)| Ok(format!("{k}={}", digest(params)?)))
        .collect::<Result<Vec<_>>>()?
        .join(" "))
}

fn digest(mut params: Vec<(String, Tensor)>) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in params {
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        let values = Vec::<f32>::try_from(
            t.detach()
                .to_device(tch::Device::Cpu)
                .to_kind(tch::Kind::Float)
                .flatten(0, -1),
        )
        .with_context(|| format!("reading {name}"))?;
        for v in values {
            for b in v.to_bits().to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
    }
    Ok(format!("{h:016x}"))
}
