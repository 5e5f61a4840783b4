//! An MoE job through a membership change without a checkpoint: after a worker died, each
//! expert it held is taken from a surviving replica, and the survivors go on with the
//! placement the coordinator sent for the new generation.
//!
//! Which copy is the source: the survivors agree on the most advanced committed step S (as
//! a dense job does, see `process::recovery`); the shared parameters come from the most
//! advanced rank, each expert from the lowest rank that holds it *at step S*. An expert whose
//! surviving replicas all stopped a step behind (a ring all-reduce completed on some ranks
//! only) cannot be brought forward: the survivors then roll back to the latest checkpoint
//! instead ([`Restored::ExpertsBehind`]). Every decision is taken from all-gathered facts, so
//! every rank takes the same one and calls the same collectives.
//!
//! Only experts that some new holder lacks at step S travel; the coordinator's placement for
//! survivors keeps every expert where it was, so usually nothing moves and the model is only
//! rebuilt for the new ranks.

use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::moe::is_expert_param;
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use contrail_common::config::OptimConfig;
use contrail_common::experts::ExpertPlacement;
use std::collections::{BTreeSet, HashMap};
use tch::Tensor;

/// What [`restore_experts`] found.
pub enum Restored {
    /// The model and optimizer for the placement with every expert at the agreed step; the
    /// caller takes them over (after anything else it receives).
    Ready(Box<ContrastiveModel>, Box<dyn Optimizer>),
    /// No rank holds this expert at the agreed step.
    ExpertsBehind(String),
}

/// Which experts the model holds, per MoE block: the model has the variables of its own
/// experts only, so its names tell (whatever placement it was built for).
pub fn held_experts(model: &ContrastiveModel, experts: usize) -> Result<Vec<Vec<bool>>> {
    let rt = model.moe().context("the model has no MoE blocks")?;
    let names: BTreeSet<String> = model
        .named_variables()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    Ok(rt
        .block_params()
        .into_iter()
        .map(|(_, prefix, shapes)| {
            let first = &shapes.params[0].0;
            (0..experts)
                .map(|e| names.contains(&format!("{prefix}.experts.{e}.{first}")))
                .collect()
        })
        .collect())
}

/// For every block and expert, the lowest rank whose copy is usable (`usable[rank][block]
/// [expert]`), or the first (block, expert) that no rank has.
pub fn expert_sources(usable: &[Vec<Vec<bool>>]) -> Result<Vec<Vec<usize>>, (usize, usize)> {
    let Some(first) = usable.first() else {
        return Ok(Vec::new());
    };
    first
        .iter()
        .enumerate()
        .map(|(b, block)| {
            (0..block.len())
                .map(|e| (0..usable.len()).find(|&r| usable[r][b][e]).ok_or((b, e)))
                .collect()
        })
        .collect()
}

/// Collective, right after a regroup: gives this rank the state of step `step` for
/// `placement` (in the new generation's ranks). `usable[r]` says which experts rank r holds
/// at `step` (all-gathered, the same on every rank); `root` is the most advanced rank, the
/// source of every shared variable and optimizer state. `rebuild` builds the job's model for
/// a placement. The current model and optimizer are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn restore_experts(
    coll: &dyn Collective,
    model: &ContrastiveModel,
    opt: &dyn Optimizer,
    usable: &[Vec<Vec<bool>>],
    root: usize,
    placement: ExpertPlacement,
    optim_cfg: &OptimConfig,
    rebuild: &mut dyn FnMut(ExpertPlacement) -> Result<ContrastiveModel>,
) -> Result<Restored> {
    let rank = coll.rank();
    let world = coll.world_size();
    if usable.len() != world {
        bail!(
            "expert holdings of {} ranks for a world of {world}",
            usable.len()
        );
    }
    for (b, block) in placement.blocks.iter().enumerate() {
        block
            .validate(world as u32)
            .map_err(|e| anyhow::anyhow!("the new generation's placement, block {b}: {e}"))?;
    }
    let sources = match expert_sources(usable) {
        Ok(s) => s,
        Err((b, e)) => {
            return Ok(Restored::ExpertsBehind(format!(
                "no surviving replica of expert {e} of MoE block {b} holds the most advanced \
                 step"
            )))
        }
    };
    let rt = model.moe().context("the model has no MoE blocks")?.clone();
    let blocks = rt.block_params();
    if blocks.len() != placement.blocks.len() || blocks.len() != sources.len() {
        bail!(
            "the model has {} MoE blocks, the placement {}, the holdings {}",
            blocks.len(),
            placement.blocks.len(),
            sources.len()
        );
    }

    let variables = model.named_variables();
    let optim_state = opt.state_tensors();
    // Shared variables and optimizer states, from the most advanced rank (names and order
    // are the same on every rank: only expert names differ).
    let mut vars = Vec::new();
    for (name, t) in variables.iter().filter(|(n, _)| !is_expert_param(n)) {
        vars.push((name.clone(), broadcast_copy(coll, t, root, name)?));
    }
    let state_of_expert = |n: &str| n.split_once('.').is_some_and(|(_, p)| is_expert_param(p));
    let mut state = Vec::new();
    for (name, t) in optim_state.iter().filter(|(n, _)| !state_of_expert(n)) {
        state.push((name.clone(), broadcast_copy(coll, t, root, name)?));
    }
    // Which optimizer states an expert parameter has (the same for every parameter).
    let expert_states: BTreeSet<&str> = optim_state
        .iter()
        .filter(|(n, _)| state_of_expert(n))
        .filter_map(|(n, _)| n.split_once('.').map(|(s, _)| s))
        .collect();

    let local_vars: HashMap<&str, &Tensor> =
        variables.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let local_state: HashMap<&str, &Tensor> =
        optim_state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (b, prefix, shapes) in &blocks {
        let mine: Vec<u32> = placement.blocks[*b].local_experts(rank as u32);
        // A tensor of any expert this rank holds (even one a step behind) gives a received
        // tensor's shape and kind.
        let first = &shapes.params[0].0;
        let own = (0..sources[*b].len())
            .find(|&o| local_vars.contains_key(format!("{prefix}.experts.{o}.{first}").as_str()));
        for (e, &source) in sources[*b].iter().enumerate() {
            let keep = mine.contains(&(e as u32));
            let travels = placement.blocks[*b].holders[e]
                .iter()
                .any(|&r| !usable[r as usize][*b][e]);
            for (suffix, _) in &shapes.params {
                let name = format!("{prefix}.experts.{e}.{suffix}");
                let keys = std::iter::once((name.clone(), false))
                    .chain(expert_states.iter().map(|s| (format!("{s}.{name}"), true)));
                for (key, is_state) in keys {
                    let local = if is_state { &local_state } else { &local_vars };
                    let t = if travels {
                        let template = match (rank == source, own) {
                            (true, _) => key.clone(),
                            (false, Some(o)) => key.replacen(
                                &format!("{prefix}.experts.{e}."),
                                &format!("{prefix}.experts.{o}."),
                                1,
                            ),
                            (false, None) => {
                                bail!("rank {rank} holds no expert of MoE block {b}")
                            }
                        };
                        let have = local
                            .get(template.as_str())
                            .with_context(|| format!("expert tensor {template} is missing"))?;
                        let mut buf = if rank == source {
                            have.detach().copy()
                        } else {
                            have.zeros_like()
                        };
                        coll.broadcast(&mut buf, source)
                            .with_context(|| format!("receiving {key} from rank {source}"))?;
                        buf
                    } else if keep {
                        // Every new holder has it at the agreed step already.
                        local
                            .get(key.as_str())
                            .with_context(|| format!("expert tensor {key} is missing"))?
                            .detach()
                            .copy()
                    } else {
                        continue;
                    };
                    if keep {
                        if is_state { &mut state } else { &mut vars }.push((key, t));
                    }
                }
            }
        }
    }

    let version = placement.version;
    let mut next = rebuild(placement)
        .with_context(|| format!("building the model for expert placement v{version}"))?;
    // Before the optimizer exists, so its state takes the weights' layout.
    next.set_compute(model.compute());
    next.set_grad_sync(model.grad_sync());
    next.load_named(&vars)
        .context("loading the restored variables")?;
    let mut next_opt = next.optimizer(optim_cfg);
    next_opt
        .load_state(&state)
        .context("loading the restored optimizer state")?;
    Ok(Restored::Ready(Box::new(next), next_opt))
}

/// A copy of `t` as `root` holds it.
fn broadcast_copy(coll: &dyn Collective, t: &Tensor, root: usize, name: &str) -> Result<Tensor> {
    let mut buf = t.detach().copy();
    coll.broadcast(&mut buf, root)
        .with_context(|| format!("broadcasting {name} from rank {root}"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_expert_comes_from_its_lowest_usable_holder() {
        // 3 ranks, one block of 2 experts: expert 0 only on rank 2, expert 1 on ranks 0 and 1.
        let usable = vec![
            vec![vec![false, true]],
            vec![vec![false, true]],
            vec![vec![true, false]],
        ];
        assert_eq!(expert_sources(&usable), Ok(vec![vec![2, 0]]));
    }

    #[test]
    fn an_expert_no_rank_holds_is_named() {
        let usable = vec![
            vec![vec![true, true], vec![true, false]],
            vec![vec![false, true], vec![true, false]],
        ];
        assert_eq!(expert_sources(&usable), Err((1, 1)));
    }
}
