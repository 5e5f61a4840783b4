//! One distributed training step over K ≥ 1 micro-batches per rank, for any objective that
//! works on the two views' embeddings (SimCLR, MoCo v2, SwAV; see [`crate::objective`]).
//!
//! tch has no custom autograd functions, so a loss that couples samples across ranks is
//! differentiated by hand (ARCHITECTURE.md, "Data flow of one step", items 3–4):
//!
//! 1. forward the rank's micro-batches → `z_local` (2b rows: view 1 of every micro-batch,
//!    then view 2 of every micro-batch). With one micro-batch the graph is kept; with K > 1
//!    each is forwarded without autograd and only its embeddings are kept, so activation
//!    memory does not grow with K;
//! 2. the objective turns the detached `z_local` into this rank's share of the global loss and
//!    d(global loss)/d(z_local) — gathering whatever it needs from the other ranks — and may
//!    add gradients to its own head parameters (SwAV's prototypes);
//! 3. backprop that gradient into the encoder: directly through the kept graph, or (K > 1)
//!    by re-forwarding each micro-batch with autograd and backpropagating its slice, so
//!    parameter gradients accumulate across micro-batches (times the optimizer's loss scale
//!    under fp16, which its step divides out: [`crate::optim::LossScaled`]);
//! 4. all-reduce(sum) the parameter gradients in fixed-order buckets, one optimizer step.
//!    Summing (not averaging) is right because the objective already divided by the global
//!    sample count. With `cluster.overlap` (the default) the buckets are summed while the
//!    last backward pass runs ([`crate::dist::grad_sync`]), as DDP does with `no_sync` on
//!    all micro-batches but the last; MoE models sum after backward, because their token
//!    exchange uses the collective inside backward.
//!
//! A rank with no samples skips the forward but enters every collective with zero rows and
//! zero gradients, so no peer ever waits for it. The result equals one step over the
//! concatenation of every rank's micro-batches as long as the forward pass is batch-
//! independent (GroupNorm); BatchNorm normalises each micro-batch with its own statistics,
//! and with K > 1 its running averages take two updates per micro-batch.

use crate::dist::grad_sync::{all_reduce_in_buckets, reduce_during_backward};
use crate::dist::{all_gather_counts, Collective};
use crate::model::ContrastiveModel;
use crate::moe::{is_expert_param, BlockLoad, Pass};
use crate::objective::simclr::NtXent;
pub use crate::objective::StepClock;
use crate::objective::StepObjective;
use crate::optim::Optimizer;
use crate::torch_ext::upload::{cuda_index, to_gpu_on_copy_stream};
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The global-batch loss, identical on every rank.
    pub loss: f64,
    /// B: samples in the step across all ranks.
    pub global_samples: i64,
    /// MoE blocks: assignments routed to each expert and dropped in this step, summed over
    /// all ranks (empty without MoE).
    pub expert_load: Vec<BlockLoad>,
}

/// A step whose loss has not been read back to the host yet: on a GPU, reading it waits for
/// the step's kernels, so the training loop reads it only when it logs or reports it.
pub struct QueuedStep {
    /// The global-batch loss (a one-element float64 tensor on the model's device).
    loss: Tensor,
    pub global_samples: i64,
    pub expert_load: Vec<BlockLoad>,
}

impl QueuedStep {
    /// The global-batch loss (waits for the step to finish computing it).
    pub fn read_loss(&self) -> f64 {
        self.loss.double_value(&[0])
    }

    /// The loss tensor, to read later (after the step's tensors are gone).
    pub fn loss_tensor(&self) -> Tensor {
        self.loss.shallow_clone()
    }
}

/// One step of `objective` over this rank's `micro_batches` (`(view1, view2)` pairs of
/// `b_k × 3 × H × W` images; sizes may differ, a pair may be empty, the slice may be empty).
/// `counts[r]` is rank r's sample total over its micro-batches, identical on every rank. If
/// all counts are 0 nothing happens and the loss is 0.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &ContrastiveModel,
    opt: &mut dyn Optimizer,
    objective: &mut dyn StepObjective,
    micro_batches: &[(Tensor, Tensor)],
    lr: f64,
    coll: &dyn Collective,
    counts: &[i64],
    clock: StepClock,
) -> Result<StepOutcome> {
    let q = train_step_queued(
        model,
        opt,
        objective,
        micro_batches,
        lr,
        coll,
        counts,
        clock,
    )?;
    Ok(StepOutcome {
        loss: q.read_loss(),
        global_samples: q.global_samples,
        expert_load: q.expert_load,
    })
}

/// [`train_step`] without reading the loss back: the host goes on to the next step while
/// the GPU finishes this one (with NCCL at world size > 1 the collectives still wait).
#[allow(clippy::too_many_arguments)]
pub fn train_step_queued(
    model: &ContrastiveModel,
    opt: &mut dyn Optimizer,
    objective: &mut dyn StepObjective,
    micro_batches: &[(Tensor, Tensor)],
    lr: f64,
    coll: &dyn Collective,
    counts: &[i64],
    clock: StepClock,
) -> Result<QueuedStep> {
    let rank = coll.rank();
    let sizes = micro_batch_sizes(micro_batches, rank)?;
    let b: i64 = sizes.iter().sum();
    let global_samples = checked_global_samples(counts, b, coll)
        .with_context(|| format!("micro-batches of sizes {sizes:?}"))?;
    if global_samples == 0 {
        // Every rank sees the same counts, so every rank skips the same collectives.
        return Ok(QueuedStep {
            loss: Tensor::zeros([1], (Kind::Double, model.device())),
            global_samples: 0,
            expert_load: Vec::new(),
        });
    }
    let device = model.device();
    let non_empty: Vec<usize> = (0..sizes.len()).filter(|&k| sizes[k] > 0).collect();
    // Each micro-batch crosses to the GPU once per step, though K > 1 forwards it twice.
    let uploaded = micro_batches
        .iter()
        .map(|(v1, v2)| Ok((upload(v1, device)?, upload(v2, device)?)))
        .collect::<Result<Vec<(Tensor, Tensor)>>>()?;
    let micro_batches = &uploaded[..];

    opt.zero_grad();
    objective.prepare(model, micro_batches, counts, clock, coll)?;

    let passes = forward_passes(model, non_empty.len(), coll)?;
    // fp16: backward starts from the loss times the scale; the optimizer divides it out.
    let loss_scale = opt.loss_scale();
    // Whether the gradients were already summed during the last backward pass.
    let reduced;
    let local_loss = if passes <= 1 {
        // One forward pass is enough: keep its graph.
        begin_moe_pass(model, true, true, b as f64 / global_samples as f64);
        let z_local = match non_empty.first() {
            Some(&k) => {
                let (v1, v2) = &micro_batches[k];
                model.embed_pair(v1, v2, true)
            }
            None => {
                model.moe_idle_pass();
                Tensor::zeros([0, model.embedding_dim()], (Kind::Float, device))
            }
        };
        check_moe(model)?;
        let (local_loss, d_local) =
            objective.loss_and_grad(model, &z_local.detach(), counts, clock, coll)?;
        ensure_grads_defined(model);
        // d(sum(z · g))/dz = g: backprop a given output gradient without a custom function.
        let root = scaled((&z_local * d_local).sum(Kind::Float), loss_scale);
        reduced = backward_reducing(model, coll, &root)
            .with_context(|| format!("rank {rank}: backward"))?;
        local_loss
    } else {
        let (local_loss, summed) = accumulated_passes(
            model,
            objective,
            micro_batches,
            &sizes,
            passes,
            counts,
            clock,
            coll,
            loss_scale,
        )?;
        reduced = summed;
        local_loss
    };
    let loss = finish_step(model, opt, &local_loss, reduced, lr, coll, &|name| {
        objective.frozen(name, clock)
    })?;
    objective.after_update(model, clock, coll)?;
    if let Some(rt) = model.moe() {
        // Forward passes outside a step (evaluation) route dropless and record nothing.
        rt.begin_pass(Pass::default());
    }
    let expert_load = global_expert_load(model, coll)?;
    Ok(QueuedStep {
        loss,
        global_samples,
        expert_load,
    })
}

/// `t` on `device`: from the host to a GPU through pinned memory, asynchronously on the GPU's
/// copy stream ([`crate::torch_ext::upload`]), so the copy runs under the previous step's
/// kernels and the host goes on queueing the step; the compute stream waits for it through
/// an event. Already there, or on the CPU: `t` itself.
fn upload(t: &Tensor, device: Device) -> Result<Tensor> {
    let Some(index) = cuda_index(device).filter(|_| t.device() != device) else {
        return Ok(t.shallow_clone());
    };
    let pinned = if t.is_pinned(device) {
        t.shallow_clone()
    } else {
        t.pin_memory(device)
    };
    to_gpu_on_copy_stream(&pinned, index)
}

/// How many forward passes this rank makes: one per non-empty micro-batch, except that with
/// MoE blocks every rank makes as many as the busiest one (each pass exchanges tokens with
/// every rank; a rank short of micro-batches makes idle passes).
fn forward_passes(
    model: &ContrastiveModel,
    non_empty: usize,
    coll: &dyn Collective,
) -> Result<usize> {
    if model.moe().is_none() || coll.world_size() == 1 {
        return Ok(non_empty);
    }
    let all = all_gather_counts(coll, non_empty as i64)
        .with_context(|| format!("rank {}: agreeing on the forward passes", coll.rank()))?;
    Ok(all.into_iter().max().unwrap_or(0) as usize)
}

/// The error of an MoE exchange that failed during a forward pass, if one did.
fn check_moe(model: &ContrastiveModel) -> Result<()> {
    model.moe().map_or(Ok(()), |rt| rt.check())
}

/// Sets the MoE blocks' mode for the next forward pass (nothing without MoE blocks).
fn begin_moe_pass(model: &ContrastiveModel, record: bool, count_load: bool, aux_weight: f64) {
    if let Some(rt) = model.moe() {
        rt.begin_pass(Pass {
            train: true,
            record,
            count_load,
            aux_weight,
        });
    }
}

/// The step's expert load summed over the ranks (empty without MoE).
fn global_expert_load(model: &ContrastiveModel, coll: &dyn Collective) -> Result<Vec<BlockLoad>> {
    let Some(rt) = model.moe() else {
        return Ok(Vec::new());
    };
    let mut load = rt.take_load();
    if coll.world_size() > 1 && !load.is_empty() {
        let flat: Vec<i64> = load
            .iter()
            .flat_map(|l| l.routed.iter().copied().chain([l.dropped]))
            .collect();
        let mut t = Tensor::from_slice(&flat);
        coll.all_reduce_sum(&mut t)
            .with_context(|| format!("rank {}: summing the expert load", coll.rank()))?;
        let mut summed = Vec::<i64>::try_from(&t).expect("Int64 load").into_iter();
        for l in &mut load {
            for r in &mut l.routed {
                *r = summed.next().expect("one count per expert");
            }
            l.dropped = summed.next().expect("one dropped count per block");
        }
    }
    Ok(load)
}

/// K > 1: the objective's loss over every micro-batch's embeddings, computed once, with the
/// gradient pushed through one micro-batch at a time. Returns this rank's loss share and
/// whether the gradients were summed across ranks during the last backward pass.
#[allow(clippy::too_many_arguments)]
fn accumulated_passes(
    model: &ContrastiveModel,
    objective: &mut dyn StepObjective,
    micro_batches: &[(Tensor, Tensor)],
    sizes: &[i64],
    passes: usize,
    counts: &[i64],
    clock: StepClock,
    coll: &dyn Collective,
    loss_scale: Option<f64>,
) -> Result<(Tensor, bool)> {
    let rank = coll.rank();
    let b: i64 = sizes.iter().sum();
    let global: i64 = counts.iter().sum();
    let non_empty: Vec<usize> = (0..sizes.len()).filter(|&k| sizes[k] > 0).collect();
    // Pass 1: embeddings only, no graph kept, so memory does not grow with K.
    let z_local = tch::no_grad(|| {
        let mut first = Vec::with_capacity(non_empty.len());
        let mut second = Vec::with_capacity(non_empty.len());
        begin_moe_pass(model, false, true, 0.0);
        for &k in &non_empty {
            let (v1, v2) = &micro_batches[k];
            let z = model.embed_pair(v1, v2, true);
            first.push(z.narrow(0, 0, sizes[k]));
            second.push(z.narrow(0, sizes[k], sizes[k]));
        }
        for _ in non_empty.len()..passes {
            model.moe_idle_pass();
        }
        first.extend(second);
        if first.is_empty() {
            return Tensor::zeros([0, model.embedding_dim()], (Kind::Float, model.device()));
        }
        Tensor::cat(&first, 0)
    });
    check_moe(model)?;
    let (local_loss, d_local) = objective.loss_and_grad(model, &z_local, counts, clock, coll)?;

    // Pass 2: re-forward each micro-batch with a graph and backprop its rows of d_local;
    // `.backward()` adds into the parameters' `.grad()`, which is the accumulation.
    ensure_grads_defined(model);
    let mut at = 0;
    let mut reduced = false;
    for (pass, &k) in non_empty.iter().enumerate() {
        let (v1, v2) = &micro_batches[k];
        let bk = sizes[k];
        let g = Tensor::cat(
            &[d_local.narrow(0, at, bk), d_local.narrow(0, b + at, bk)],
            0,
        );
        begin_moe_pass(model, true, false, bk as f64 / global as f64);
        let z = model.embed_pair(v1, v2, true);
        if z.size() != g.size() {
            bail!(
                "rank {rank}: micro-batch {k} re-forward gave embeddings {:?}, expected {:?}",
                z.size(),
                g.size()
            );
        }
        let root = scaled((&z * g).sum(Kind::Float), loss_scale);
        // Only the last backward overlaps the reduction (DDP's `no_sync` on the others): the
        // earlier ones still add to every gradient.
        let last = pass + 1 == passes;
        reduced = if last {
            backward_reducing(model, coll, &root)
        } else {
            model.backward(&root).map(|()| false)
        }
        .with_context(|| format!("rank {rank}: backward of micro-batch {k}"))?;
        at += bk;
    }
    for _ in non_empty.len()..passes {
        begin_moe_pass(model, true, false, 0.0);
        model.moe_idle_pass();
        model
            .backward(&Tensor::zeros([], (Kind::Float, model.device())))
            .with_context(|| format!("rank {rank}: backward of an idle pass"))?;
    }
    Ok((local_loss, reduced))
}

/// The backward root times the loss scale, when there is one.
fn scaled(root: Tensor, loss_scale: Option<f64>) -> Tensor {
    match loss_scale {
        Some(s) => root * s,
        None => root,
    }
}

/// Backpropagates `root` through the model, summing the gradients across ranks during it where the model's
/// [`crate::dist::grad_sync::GradSync`] overlaps (world size > 1, no MoE blocks). Returns
/// whether they were summed.
fn backward_reducing(
    model: &ContrastiveModel,
    coll: &dyn Collective,
    root: &Tensor,
) -> Result<bool> {
    let sync = model.grad_sync();
    if !sync.overlap || coll.world_size() == 1 || model.moe().is_some() {
        model.backward(root)?;
        return Ok(false);
    }
    reduce_during_backward(coll, &model.named_parameters(), &sync, root, || {
        model.backward(root)
    })?;
    Ok(true)
}

/// One SimCLR step over a single batch (`view1`/`view2`: this rank's `b × 3 × H × W` images,
/// b may be 0). Gathers the per-rank counts first.
pub fn simclr_train_step(
    model: &ContrastiveModel,
    opt: &mut dyn Optimizer,
    view1: &Tensor,
    view2: &Tensor,
    temperature: f64,
    lr: f64,
    coll: &dyn Collective,
) -> Result<StepOutcome> {
    let micro = [(view1.shallow_clone(), view2.shallow_clone())];
    simclr_accumulated_step(model, opt, &micro, temperature, lr, coll)
}

/// One SimCLR step over this rank's micro-batches with embedding caching. Gathers every
/// rank's total sample count first.
pub fn simclr_accumulated_step(
    model: &ContrastiveModel,
    opt: &mut dyn Optimizer,
    micro_batches: &[(Tensor, Tensor)],
    temperature: f64,
    lr: f64,
    coll: &dyn Collective,
) -> Result<StepOutcome> {
    let local: i64 = micro_batch_sizes(micro_batches, coll.rank())?.iter().sum();
    let counts = all_gather_counts(coll, local)
        .with_context(|| format!("rank {}: gathering batch sizes", coll.rank()))?;
    let mut objective = NtXent { temperature };
    train_step(
        model,
        opt,
        &mut objective,
        micro_batches,
        lr,
        coll,
        &counts,
        StepClock::default(),
    )
}

/// Checks that `counts` has one entry per rank and that this rank's is `local` (its samples
/// in this step), and returns the step's global sample count.
pub(crate) fn checked_global_samples(
    counts: &[i64],
    local: i64,
    coll: &dyn Collective,
) -> Result<i64> {
    let rank = coll.rank();
    if counts.len() != coll.world_size() || counts.get(rank) != Some(&local) {
        bail!(
            "rank {rank}: batch-size counts {counts:?} do not match world size {} and local \
             samples {local}",
            coll.world_size()
        );
    }
    Ok(counts.iter().sum())
}

/// Sums the parameter gradients (unless `reduced` says backward already did) and the loss
/// shares across ranks, then takes the optimizer step. Returns the global loss, unread (a
/// one-element float64 tensor where the loss is).
fn finish_step(
    model: &ContrastiveModel,
    opt: &mut dyn Optimizer,
    local_loss: &Tensor,
    reduced: bool,
    lr: f64,
    coll: &dyn Collective,
    frozen: &dyn Fn(&str) -> bool,
) -> Result<Tensor> {
    let rank = coll.rank();
    let mut loss = local_loss.detach().to_kind(Kind::Double).reshape([1]);
    // A single rank has nothing to sum: skipping the copies keeps one-GPU jobs at eager speed.
    if coll.world_size() > 1 {
        if !reduced {
            all_reduce_gradients(model, coll)
                .with_context(|| format!("rank {rank}: all-reducing parameter gradients"))?;
        }
        coll.all_reduce_sum(&mut loss)
            .with_context(|| format!("rank {rank}: all-reducing the loss"))?;
    }
    opt.step_skipping(lr, frozen);
    Ok(loss)
}

/// A micro-batch is two views (both `b × 3 × H × W`) or, for CLIP, images and caption tokens
/// (`b × L`).
fn check_views(view1: &Tensor, view2: &Tensor, rank: usize) -> Result<()> {
    let (s1, s2) = (view1.size(), view2.size());
    let images = s1.len() == 4 && s1[1] == 3;
    let second_ok = s2 == s1 || (s2.len() == 2 && s2.first() == s1.first());
    if !images || !second_ok {
        bail!(
            "rank {rank}: a micro-batch is two b×3×H×W views, or b×3×H×W images with b×L \
             tokens; got {s1:?} and {s2:?}"
        );
    }
    Ok(())
}

/// Validates every micro-batch and returns their sample counts.
fn micro_batch_sizes(micro_batches: &[(Tensor, Tensor)], rank: usize) -> Result<Vec<i64>> {
    micro_batches
        .iter()
        .enumerate()
        .map(|(k, (v1, v2))| {
            check_views(v1, v2, rank).with_context(|| format!("micro-batch {k}"))?;
            Ok(v1.size()[0])
        })
        .collect()
}

/// A rank without samples never runs a backward, so its parameters have no `.grad()` yet; it
/// must still contribute zeros of the right shape to the all-reduce.
fn ensure_grads_defined(model: &ContrastiveModel) {
    let params = model.named_parameters();
    if params.iter().all(|(_, p)| p.grad().defined()) {
        return;
    }
    let zero: Tensor = params.iter().map(|(_, p)| p.sum(Kind::Float) * 0.0).fold(
        Tensor::zeros([], (Kind::Float, model.device())),
        |acc, t| acc + t,
    );
    zero.backward();
}

/// Sums every parameter gradient across ranks a bucket at a time, after backward; expert
/// gradients only among the expert's replicas.
fn all_reduce_gradients(model: &ContrastiveModel, coll: &dyn Collective) -> Result<()> {
    let params = model.named_parameters();
    if let Some(rt) = model.moe() {
        // Experts differ between ranks: only their replicas are summed, among themselves.
        rt.sync_expert_grads(&params)?;
    }
    let grads: Vec<(String, Tensor)> = params
        .into_iter()
        .filter(|(n, _)| !is_expert_param(n))
        .map(|(n, p)| (n, p.grad()))
        .collect();
    all_reduce_in_buckets(coll, &grads, &model.grad_sync())
}
