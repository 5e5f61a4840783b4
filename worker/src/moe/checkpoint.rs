//! Checkpoints of a model whose experts are spread over the workers hold every expert under
//! its global id, exactly as a one-process model names it, with its optimizer state. So a job
//! resumes on any number of workers: each rank loads the shared tensors and only the experts
//! its placement gives it.

use super::runtime::{is_expert_param, MoeRuntime};
use anyhow::{Context, Result};
use std::collections::{BTreeSet, HashMap};
use tch::Tensor;

/// Named tensors, as a checkpoint file holds them.
type Named = Vec<(String, Tensor)>;

impl MoeRuntime {
    /// Every rank calls this with its model variables and optimizer state; returns both with
    /// the experts of all ranks (each broadcast from its first holder). Collective: every rank
    /// must call it at the same step. With one rank the inputs come back unchanged.
    pub fn full_state(&self, variables: Named, optim: Named) -> Result<(Named, Named)> {
        let coll = self.coll();
        if coll.world_size() == 1 {
            return Ok((variables, optim));
        }
        let rank = coll.rank() as u32;
        // Optimizer state is named `<state>.<parameter>`; which states exist depends only on
        // the optimizer kind, the same on every rank.
        let expert_names: BTreeSet<&str> = variables
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| is_expert_param(n))
            .collect();
        let states: BTreeSet<String> = optim
            .iter()
            .filter_map(|(n, _)| {
                let (state, param) = n.split_once('.')?;
                expert_names.contains(param).then(|| state.to_string())
            })
            .collect();
        let local_vars: HashMap<String, Tensor> = variables
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let local_optim: HashMap<String, Tensor> = optim
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let mut vars: Vec<(String, Tensor)> = variables
            .into_iter()
            .filter(|(n, _)| !is_expert_param(n))
            .collect();
        let mut opt: Vec<(String, Tensor)> = optim
            .into_iter()
            .filter(|(n, _)| n.split_once('.').is_none_or(|(_, p)| !is_expert_param(p)))
            .collect();
        for (block, prefix, shapes) in self.block_params() {
            let placement = &self.placement().blocks[block];
            // Every rank holds an expert of every block: its tensors give the shape and kind
            // of any expert's (optimizer states need not be parameter-shaped, e.g. a step).
            let mine = placement.local_experts(rank)[0];
            for (e, holders) in placement.holders.iter().enumerate() {
                let root = holders[0];
                for (suffix, _) in &shapes.params {
                    let name = format!("{prefix}.experts.{e}.{suffix}");
                    let own = format!("{prefix}.experts.{mine}.{suffix}");
                    // The parameter first, then its optimizer states (false/true: which list).
                    let keys = std::iter::once((name.clone(), own.clone(), false)).chain(
                        states
                            .iter()
                            .map(|s| (format!("{s}.{name}"), format!("{s}.{own}"), true)),
                    );
                    for (key, own_key, is_state) in keys {
                        let local = if is_state { &local_optim } else { &local_vars };
                        let get = |k: &str| {
                            local
                                .get(k)
                                .with_context(|| format!("expert tensor {k} is missing"))
                        };
                        let mut t = if rank == root {
                            get(&key)?.detach().copy()
                        } else {
                            get(&own_key)?.zeros_like()
                        };
                        coll.broadcast(&mut t, root as usize)
                            .with_context(|| format!("gathering {key} for the checkpoint"))?;
                        if is_state { &mut opt } else { &mut vars }.push((key, t));
                    }
                }
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        opt.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((vars, opt))
    }

    /// Drops the experts (and their optimizer state) that this rank does not hold from a
    /// full checkpoint's tensors.
    pub fn keep_local(&self, named: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
        let rank = self.coll().rank() as u32;
        let foreign: Vec<String> = self
            .block_params()
            .into_iter()
            .flat_map(|(block, prefix, _)| {
                let holders = self.placement().blocks[block].holders.clone();
                holders
                    .into_iter()
                    .enumerate()
                    .filter(move |(_, h)| !h.contains(&rank))
                    .map(move |(e, _)| format!("{prefix}.experts.{e}."))
            })
            .collect();
        named
            .into_iter()
            .filter(|(n, _)| !foreign.iter().any(|f| n.contains(f.as_str())))
            .collect()
    }
}
