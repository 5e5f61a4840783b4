//! MoCo's key side: an EMA copy of the query encoder + projector, and the queue of keys that
//! serve as negatives.
//!
//! The branch has its own `VarStore`, frozen, so its variables are never optimizer
//! parameters nor part of the gradient all-reduce; the model reports them under the prefix
//! `momentum.` so checkpoints hold them (and the queue) next to the query network.

use super::projector::Projector;
use super::resnet::ResNet;
use crate::nn::compute::{self, Compute};
use crate::nn::{l2_normalize, write_ring};
use anyhow::{bail, Context, Result};
use contrail_common::config::ModelConfig;
use tch::{nn, Device, Kind, Tensor};

#[derive(Debug)]
pub struct MomentumBranch {
    vs: nn::VarStore,
    encoder: ResNet,
    projector: Projector,
    /// K × D unit-norm keys; rows are overwritten oldest first.
    queue: Tensor,
    /// [1] float32 holding the next row to write (a variable, so checkpoints keep it; exact
    /// for any queue below 2^24 rows).
    queue_next: Tensor,
    compute: Compute,
}

impl MomentumBranch {
    /// A branch shaped like the query network of `cfg`, with a queue of `queue_size` random
    /// unit keys (MoCo's initialisation). Call [`MomentumBranch::copy_from_query`] before
    /// training so that the key encoder starts equal to the query encoder.
    pub fn new(cfg: &ModelConfig, queue_size: i64, device: Device) -> Result<Self> {
        if queue_size <= 0 {
            bail!("objective.moco.queue_size must be at least 1, got {queue_size}");
        }
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let (encoder, projector) = super::resnet_and_projector(&root, cfg);
        let projector = projector.context("MoCo's key encoder needs model.projector = true")?;
        let dim = cfg.projector_out as i64;
        let queue = root.zeros_no_train("queue", &[queue_size, dim]);
        let queue_next = root.zeros_no_train("queue_next", &[1]);
        tch::no_grad(|| {
            let init = l2_normalize(&Tensor::randn([queue_size, dim], (Kind::Float, device)));
            queue.shallow_clone().copy_(&init);
        });
        vs.freeze();
        Ok(Self {
            vs,
            encoder,
            projector,
            queue,
            queue_next,
            compute: Compute::default(),
        })
    }

    /// Sets every encoder and projector variable (weights and norm statistics) to the query
    /// network's value of the same name.
    pub fn copy_from_query(&self, query: &[(String, Tensor)]) -> Result<()> {
        let mine = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, src) in query {
                if name.starts_with("prototypes") {
                    continue;
                }
                let dst = mine
                    .get(name)
                    .with_context(|| format!("key encoder has no variable \"{name}\""))?;
                dst.shallow_clone().copy_(src);
            }
            Ok(())
        })
    }

    /// L2-normalised keys of `xs` (N × 3 × H × W), without autograd. BatchNorm runs in train
    /// mode (batch statistics, running averages updated), as in MoCo.
    pub fn keys(&self, xs: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let z = self.compute.run(xs, |xs| {
                self.projector
                    .forward_t(&self.encoder.forward_t(xs, true), true)
            });
            l2_normalize(&z)
        })
    }

    /// The query network's compute settings, applied to the key encoder too.
    pub fn set_compute(&mut self, compute: Compute) {
        if compute.channels_last && !self.compute.channels_last {
            compute::convert_to_channels_last(&self.vs);
        }
        self.compute = compute;
    }

    /// key ← m · key + (1 − m) · query for every trainable query parameter except SwAV-style
    /// heads (norm running statistics stay the key encoder's own, as in MoCo).
    pub fn ema_update(&self, query_params: &[(String, Tensor)], momentum: f64) -> Result<()> {
        let mine = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, q) in query_params {
                let k = mine
                    .get(name)
                    .with_context(|| format!("key encoder has no parameter \"{name}\""))?;
                let mut k = k.shallow_clone();
                let _ = k.g_mul_scalar_(momentum);
                let _ = k.g_add_(&(q * (1.0 - momentum)));
            }
            Ok(())
        })
    }

    /// The queue (K × D) itself, without gradient, for the negatives of a step: it changes
    /// only in [`MomentumBranch::enqueue`], after the step's loss and backward are done, so
    /// no copy is needed.
    pub fn queue(&self) -> Tensor {
        self.queue.detach()
    }

    /// Writes `keys` (N × D) into the ring buffer; when N exceeds the queue only the last
    /// K rows are kept. Every rank calls it with the same keys, so queues stay identical.
    pub fn enqueue(&self, keys: &Tensor) -> Result<()> {
        let (size, dim) = (self.queue.size()[0], self.queue.size()[1]);
        let ks = keys.size();
        if ks.len() != 2 || ks[1] != dim {
            bail!("MoCo queue of {size} × {dim} cannot take keys of shape {ks:?}");
        }
        let next = self.queue_next.double_value(&[0]) as i64 % size;
        let take = write_ring(&self.queue, next, keys);
        tch::no_grad(|| {
            let _ = self
                .queue_next
                .shallow_clone()
                .fill_(((next + take) % size) as f64);
        });
        Ok(())
    }

    /// Every variable of the branch (unprefixed names).
    pub fn variables(&self) -> std::collections::HashMap<String, Tensor> {
        self.vs.variables()
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    pub fn vs_ref(&self) -> &nn::VarStore {
        &self.vs
    }
}
