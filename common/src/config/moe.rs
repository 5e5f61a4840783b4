//! `[moe]`: mixture-of-experts feed-forward blocks, their routing, and how the experts are
//! spread over the workers.

use super::{err, ConfigError, ObjectiveKind};
use crate::experts::spread_fits;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Experts per MoE block, E; 0 turns mixture-of-experts off.
    pub experts: u32,
    /// Indices (0-based) of the ViT blocks whose MLP becomes an MoE block.
    pub vit_blocks: Vec<u32>,
    /// Indices (0-based) of the CLIP text-tower blocks whose MLP becomes an MoE block.
    pub text_blocks: Vec<u32>,
    /// Make the MLP projector a mixture of `projector_hidden`-wide MLP experts (no norm
    /// inside); needs `model.projector`.
    pub projector: bool,
    /// Experts each token is sent to: 1 (Switch) or 2 (GShard; the two gate weights are
    /// renormalised to sum to 1).
    pub top_k: u32,
    /// Hidden width of each expert's MLP; 0 means the dense block's MLP width.
    pub expert_hidden: u32,
    /// Training capacity per expert per worker: ceil(factor × top_k × tokens / experts).
    /// Assignments beyond it are dropped: the token keeps only its residual path.
    pub capacity_factor: f64,
    /// Capacity factor when not training; 0 (the default) is dropless, so an item's
    /// embedding never depends on the batch it came with.
    pub eval_capacity_factor: f64,
    /// Lower bound of the capacity.
    pub min_capacity: u32,
    /// Train without dropping: every assignment is kept (capacity = the largest count).
    pub dropless: bool,
    /// Multiplicative jitter of the gate input while training: x · U(1 − ε, 1 + ε); 0 is off.
    pub jitter: f64,
    /// Coefficient of the Switch/GShard load-balancing loss E · Σ_e f_e · P_e.
    pub balance_loss_coef: f64,
    /// Coefficient of the router z-loss mean(logsumexp(logits)²).
    pub z_loss_coef: f64,
    /// Let the coordinator move, replicate and drop expert replicas when the load stays
    /// imbalanced.
    pub rebalance: bool,
    /// Steps of load the coordinator looks at before it considers a new placement.
    pub rebalance_every_steps: u64,
    /// A new placement is adopted when the busiest worker's load exceeds the mean by this
    /// factor and the new placement lowers it.
    pub rebalance_threshold: f64,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            experts: 0,
            vit_blocks: Vec::new(),
            text_blocks: Vec::new(),
            projector: false,
            top_k: 2,
            expert_hidden: 0,
            capacity_factor: 1.25,
            eval_capacity_factor: 0.0,
            min_capacity: 4,
            dropless: false,
            jitter: 0.0,
            balance_loss_coef: 0.01,
            z_loss_coef: 0.001,
            rebalance: false,
            rebalance_every_steps: 50,
            rebalance_threshold: 1.25,
        }
    }
}

impl MoeConfig {
    pub fn enabled(&self) -> bool {
        self.experts > 0
    }

    /// MoE blocks in the model, in the order the model runs them: the ViT's, the projector,
    /// the text tower's.
    pub fn block_count(&self) -> usize {
        if !self.enabled() {
            return 0;
        }
        self.vit_blocks.len() + usize::from(self.projector) + self.text_blocks.len()
    }

    /// Checks the section against the model it modifies; `vit_layers` is None when the image
    /// encoder is not a ViT, `text_layers` None without a text tower, `has_projector` whether
    /// the model has an MLP projector; `spread_world` the world size the default spread must
    /// serve (None: the coordinator places the experts explicitly).
    pub(super) fn validate(
        &self,
        vit_layers: Option<u32>,
        text_layers: Option<u32>,
        has_projector: bool,
        objective: ObjectiveKind,
        spread_world: Option<u32>,
    ) -> Result<(), ConfigError> {
        if !self.enabled() {
            if !self.vit_blocks.is_empty() || !self.text_blocks.is_empty() || self.projector {
                return Err(err("moe.experts", "is 0 but MoE blocks are listed"));
            }
            return Ok(());
        }
        if self.projector && !has_projector {
            return Err(err(
                "moe.projector",
                "the model has no MLP projector (model.projector = false, or a CLIP ViT)",
            ));
        }
        if !matches!(self.top_k, 1 | 2) || self.top_k > self.experts {
            return Err(err(
                "moe.top_k",
                format!("({}) must be 1 or 2 and at most moe.experts", self.top_k),
            ));
        }
        for (path, blocks, layers) in [
            ("moe.vit_blocks", &self.vit_blocks, vit_layers),
            ("moe.text_blocks", &self.text_blocks, text_layers),
        ] {
            if blocks.is_empty() {
                continue;
            }
            let Some(layers) = layers else {
                return Err(err(
                    path,
                    "lists blocks of a tower this model does not have",
                ));
            };
            if let Some(b) = blocks.iter().find(|&&b| b >= layers) {
                return Err(err(
                    path,
                    format!("block {b} does not exist (the tower has {layers})"),
                ));
            }
            let mut sorted = blocks.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != blocks.len() {
                return Err(err(path, "lists a block twice"));
            }
        }
        if self.block_count() == 0 {
            return Err(err(
                "moe.vit_blocks",
                "moe.experts > 0 but no block is listed in moe.vit_blocks or moe.text_blocks, \
                 and moe.projector is off",
            ));
        }
        if objective == ObjectiveKind::Moco {
            return Err(err(
                "moe.experts",
                "MoE blocks are not supported with objective.kind = \"moco\" (the momentum key \
                 encoder would need its own expert placement)",
            ));
        }
        if let Some(w) = spread_world.filter(|&w| !spread_fits(self.experts, w)) {
            let e = self.experts;
            return Err(err(
                "moe.experts",
                format!(
                    "({e}) must be a multiple or a divisor of cluster.world_size ({w}), so every \
                     worker holds the same number of experts"
                ),
            ));
        }
        if self.capacity_factor.is_nan() || self.capacity_factor <= 0.0 {
            return Err(err("moe.capacity_factor", "must be positive"));
        }
        if self.eval_capacity_factor.is_nan() || self.eval_capacity_factor < 0.0 {
            return Err(err("moe.eval_capacity_factor", "must not be negative"));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(err(
                "moe.jitter",
                format!("({}) must be in [0, 1)", self.jitter),
            ));
        }
        for (path, v) in [
            ("moe.balance_loss_coef", self.balance_loss_coef),
            ("moe.z_loss_coef", self.z_loss_coef),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(err(path, "must not be negative"));
            }
        }
        if self.rebalance_every_steps == 0 {
            return Err(err("moe.rebalance_every_steps", "must be at least 1"));
        }
        if self.rebalance_threshold.is_nan() || self.rebalance_threshold < 1.0 {
            return Err(err("moe.rebalance_threshold", "must be at least 1"));
        }
        Ok(())
    }
}
