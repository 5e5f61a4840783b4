//! Parameters whose learning rate is the step's times their own multiplier (PyTorch's
//! `param_groups` with per-group `lr`), for layer-wise learning-rate decay
//! (`optim.layer_decay`): one inner optimizer per distinct multiplier, each over its own
//! parameters. Every update rule here is per parameter (LARS's trust ratio included), so the
//! groups update exactly as one optimizer with per-parameter rates would. Their state keeps
//! the inner optimizers' names (`<state>.<param>`), so checkpoints look the same.

use super::Optimizer;
use anyhow::Context;
use std::collections::{BTreeMap, HashSet};
use tch::Tensor;

struct Group {
    scale: f64,
    names: HashSet<String>,
    opt: Box<dyn Optimizer>,
}

pub struct ParamGroups {
    groups: Vec<Group>,
}

impl ParamGroups {
    /// `params` with their multipliers `scales` (same order); `make` builds the optimizer of
    /// one group's parameters.
    pub fn new(
        params: Vec<(String, Tensor)>,
        scales: &[f64],
        make: &dyn Fn(Vec<(String, Tensor)>) -> Box<dyn Optimizer>,
    ) -> Self {
        assert_eq!(params.len(), scales.len(), "one multiplier per parameter");
        let mut by_scale: BTreeMap<u64, (f64, Vec<(String, Tensor)>)> = BTreeMap::new();
        for (p, &s) in params.into_iter().zip(scales) {
            by_scale
                .entry(s.to_bits())
                .or_insert((s, Vec::new()))
                .1
                .push(p);
        }
        let groups = by_scale
            .into_values()
            .map(|(scale, params)| Group {
                scale,
                names: params.iter().map(|(n, _)| n.clone()).collect(),
                opt: make(params),
            })
            .collect();
        Self { groups }
    }

    /// The distinct multipliers, smallest first, with their parameter counts.
    pub fn scales(&self) -> Vec<(f64, usize)> {
        let mut s: Vec<(f64, usize)> = self
            .groups
            .iter()
            .map(|g| (g.scale, g.names.len()))
            .collect();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        s
    }
}

impl Optimizer for ParamGroups {
    fn step_skipping(&mut self, lr: f64, skip: &dyn Fn(&str) -> bool) {
        for g in &mut self.groups {
            g.opt.step_skipping(lr * g.scale, skip);
        }
    }

    fn zero_grad(&mut self) {
        for g in &mut self.groups {
            g.opt.zero_grad();
        }
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self
            .groups
            .iter()
            .flat_map(|g| g.opt.state_tensors())
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> anyhow::Result<()> {
        let mut parts: Vec<Vec<(String, Tensor)>> =
            self.groups.iter().map(|_| Vec::new()).collect();
        for (key, t) in state {
            let param = key
                .split_once('.')
                .map(|(_, p)| p)
                .with_context(|| format!("optimizer state key \"{key}\" names no parameter"))?;
            let i = self
                .groups
                .iter()
                .position(|g| g.names.contains(param))
                .with_context(|| format!("optimizer state \"{key}\" is for no parameter"))?;
            parts[i].push((key.clone(), t.shallow_clone()));
        }
        // Each group checks its part before changing anything; a later group's refusal must
        // not leave the earlier ones loaded, so they are put back.
        let before: Vec<Vec<(String, Tensor)>> = self
            .groups
            .iter()
            .map(|g| {
                g.opt
                    .state_tensors()
                    .into_iter()
                    .map(|(n, t)| (n, t.copy()))
                    .collect()
            })
            .collect();
        for (i, part) in parts.iter().enumerate() {
            if let Err(e) = self.groups[i].opt.load_state(part) {
                for (g, old) in self.groups[..i].iter_mut().zip(&before) {
                    g.opt
                        .load_state(old)
                        .expect("an optimizer takes back its own state");
                }
                return Err(e);
            }
        }
        Ok(())
    }
}
