//! Switching to a new expert placement in the middle of a run: every rank agrees on the
//! placement (rank 0 has it from the coordinator and broadcasts it in-band, so all ranks
//! switch after the same step), then the experts' weights and optimizer state move by
//! rebuilding the model and optimizer around the new placement from the full state.

use crate::dist::Collective;
use crate::model::ContrastiveModel;
use crate::moe::MoeRuntime;
use crate::optim::Optimizer;
use anyhow::{Context, Result};
use contrail_common::config::OptimConfig;
use contrail_common::experts::ExpertPlacement;
use tch::{Kind, Tensor};

/// Collective: rank 0 offers `offer` (ignored elsewhere); every rank returns it if it is
/// newer than the placement `rt` runs with, None otherwise (also when rank 0 offers nothing).
pub fn agree_on_placement(
    rt: &MoeRuntime,
    offer: Option<ExpertPlacement>,
    coll: &dyn Collective,
) -> Result<Option<ExpertPlacement>> {
    let rank = coll.rank();
    let current = rt.placement().version;
    let bytes = match offer.filter(|p| rank == 0 && p.version > current) {
        Some(p) => serde_json::to_vec(&p).context("encoding the expert placement")?,
        None => Vec::new(),
    };
    let mut len = Tensor::from_slice(&[bytes.len() as i64]);
    coll.broadcast(&mut len, 0)
        .with_context(|| format!("rank {rank}: agreeing on the expert placement"))?;
    let len = len.int64_value(&[0]);
    if len == 0 {
        return Ok(None);
    }
    let mut data = if rank == 0 {
        Tensor::from_slice(&bytes)
    } else {
        Tensor::zeros([len], (Kind::Uint8, tch::Device::Cpu))
    };
    coll.broadcast(&mut data, 0)
        .with_context(|| format!("rank {rank}: receiving the expert placement"))?;
    let data = Vec::<u8>::try_from(&data).context("placement bytes")?;
    let placement: ExpertPlacement =
        serde_json::from_slice(&data).context("decoding the expert placement")?;
    Ok(Some(placement))
}

/// Moves the experts to `placement`: gathers every expert's weights and optimizer state (a
/// collective: every rank calls it at the same step), builds the model with `rebuild` (the
/// job's model on the new placement, same compute settings) and a fresh optimizer from
/// `optim_cfg`, and loads into them what this rank now holds. Every rank briefly holds every
/// expert in memory.
pub fn move_experts(
    model: &mut ContrastiveModel,
    opt: &mut Box<dyn Optimizer>,
    placement: ExpertPlacement,
    optim_cfg: &OptimConfig,
    rebuild: &mut dyn FnMut(ExpertPlacement) -> Result<ContrastiveModel>,
) -> Result<()> {
    let rt = model.moe().context("the model has no MoE blocks")?;
    let version = placement.version;
    let (variables, state) = rt
        .full_state(model.named_variables(), opt.state_tensors())
        .context("collecting the experts before moving them")?;
    let mut next = rebuild(placement)
        .with_context(|| format!("building the model for expert placement v{version}"))?;
    // Before the optimizer exists, so its state takes the weights' layout.
    next.set_compute(model.compute());
    next.set_grad_sync(model.grad_sync());
    let next_rt = next
        .moe()
        .context("the rebuilt model has no MoE blocks")?
        .clone();
    next.load_named(&next_rt.keep_local(variables))?;
    let mut next_opt = next.optimizer(optim_cfg);
    next_opt.load_state(&next_rt.keep_local(state))?;
    *model = next;
    *opt = next_opt;
    Ok(())
}
