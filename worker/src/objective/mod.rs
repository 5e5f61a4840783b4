//! Contrastive objectives, one file each holding the loss and its distributed step form
//! ([`StepObjective`]): this rank's detached embeddings → its share of the global loss and the
//! gradient of the global loss with respect to those embeddings.
//!
//! - [`simclr`]: NT-Xent; negatives are every other embedding of every rank; the loss couples
//!   samples across ranks, so the gathered gradient is reduce-scattered back to its owners.
//! - [`moco`]: MoCo v2 (symmetric): each view's query against the momentum encoder's key of
//!   the other view, with the queue as negatives; keys and queue carry no gradient, so each
//!   query's loss is its own.
//! - [`swav`]: codes from Sinkhorn–Knopp over the global batch (sums all-reduced), each view
//!   predicting the other's codes through the shared prototypes.
//! - [`clip`]: images against the captions of every rank (open_clip's `ClipLoss` with
//!   `gather_with_grad`, written as local pairs against the gathered matrices), the gathered
//!   gradient reduce-scattered back as for SimCLR, and the logit scale's gradient summed.
//! - [`gather`]: the gather-with-gradient pieces SimCLR and CLIP share.

pub mod clip;
pub mod gather;
pub mod moco;
pub mod simclr;
pub mod swav;

use crate::dist::Collective;
use crate::model::ContrastiveModel;
use anyhow::Result;
use contrail_common::config::{NormKind, ObjectiveKind};
use contrail_common::JobConfig;
use tch::Tensor;

pub use clip::Clip;
pub use moco::Moco;
pub use simclr::{nt_xent_anchor_losses, nt_xent_loss, LocalAnchors, NtXent};
pub use swav::Swav;

/// Where the step sits in the run (schedules such as MoCo's momentum follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepClock {
    /// 0-based index of this step.
    pub step: u64,
    /// Length of the run in steps, 0 while unknown.
    pub total_steps: u64,
}

/// What one objective does inside a step. Every rank calls every method in the same order;
/// `counts[r]` is rank r's sample count in the step (identical everywhere) and `z_local` holds
/// this rank's `2 b` embeddings, view 1 of every sample first, then view 2.
pub trait StepObjective {
    /// Before any forward pass, with the step's micro-batches (MoCo computes keys here).
    fn prepare(
        &mut self,
        _model: &ContrastiveModel,
        _micro_batches: &[(Tensor, Tensor)],
        _counts: &[i64],
        _clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        Ok(())
    }

    /// This rank's share of the global loss (the shares of all ranks sum to it) and
    /// d(global loss)/d(z_local). May add gradients to head parameters of the model.
    fn loss_and_grad(
        &mut self,
        model: &ContrastiveModel,
        z_local: &Tensor,
        counts: &[i64],
        clock: StepClock,
        coll: &dyn Collective,
    ) -> Result<(Tensor, Tensor)>;

    /// Whether the optimizer leaves parameter `name` alone in this step.
    fn frozen(&self, _name: &str, _clock: StepClock) -> bool {
        false
    }

    /// After the optimizer step.
    fn after_update(
        &mut self,
        _model: &ContrastiveModel,
        _clock: StepClock,
        _coll: &dyn Collective,
    ) -> Result<()> {
        Ok(())
    }
}

/// The objective `objective.kind` names, configured from the job.
pub fn build_objective(cfg: &JobConfig) -> Box<dyn StepObjective> {
    let o = &cfg.objective;
    match o.kind {
        ObjectiveKind::Simclr => Box::new(NtXent {
            temperature: o.temperature,
        }),
        ObjectiveKind::Moco => Box::new(Moco::new(
            o.temperature,
            o.moco.momentum,
            o.moco.shuffle_bn && cfg.model.norm == NormKind::Batch,
            cfg.train.micro_batch as i64,
            cfg.data.image_size as i64,
            cfg.train.seed,
        )),
        ObjectiveKind::Swav => Box::new(Swav::new(
            o.temperature,
            o.swav.epsilon,
            o.swav.sinkhorn_iterations as usize,
            o.swav.freeze_prototypes_steps,
            o.swav.queue_size as i64,
        )),
        ObjectiveKind::Clip => Box::new(Clip),
    }
}
