//! The MoE feed-forward block: `h + Σ_k w_k · expert_k(ln(h))`, replacing the MLP half of a
//! transformer block. The gate is a bias-free linear layer computed in float32 (outside
//! autocast); each expert is the dense block's MLP (`c_fc → GELU → c_proj`).
//!
//! Names: `<block>.moe.gate.weight` (E × D) and `<block>.moe.experts.<e>.{c_fc,c_proj}.*`
//! with e the *global* expert id, so a checkpoint names every expert the same way whatever
//! the placement. A worker creates only the experts it holds, but draws the initial values of
//! every expert in id order, so all ranks' random streams stay aligned (the non-expert
//! parameters stay identical everywhere) and expert e starts equal to expert e of a
//! one-process model.
//!
//! With one worker the block is ordinary autograd. With several, tokens travel to the
//! experts' holders and back through the all-to-alls of [`super::exchange`], where the graph
//! is cut (see [`super::runtime`]).

use super::dispatch::{self, DispatchPlan};
use super::exchange::{self, Outgoing};
use super::gate::{self, Capacity, Routing};
use super::runtime::{ExpertShapes, MoeRuntime, Record};
use crate::nn::compute::without_autocast;
use anyhow::{Context, Result};
use std::sync::Arc;
use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

/// The nonlinearity between an expert's two layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// A transformer block's MLP.
    Gelu,
    /// A projection head.
    Relu,
}

/// `c_fc → activation → c_proj`, as the dense MLP it replaces.
#[derive(Debug)]
struct ExpertMlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    activation: Activation,
}

impl ExpertMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.c_fc);
        let h = match self.activation {
            Activation::Gelu => h.gelu("none"),
            Activation::Relu => h.relu(),
        };
        h.apply(&self.c_proj)
    }
}

/// How a block's expert weights are drawn (the dense MLP's initialisers).
#[derive(Debug, Clone, Copy)]
pub struct ExpertInit {
    pub fc_weight: Init,
    pub fc_bias: Init,
    pub proj_weight: Init,
    pub proj_bias: Init,
}

#[derive(Debug)]
pub struct MoeFeedForward {
    runtime: Arc<MoeRuntime>,
    block: usize,
    gate: Tensor,
    /// The experts this rank holds: (global id, expert), ascending id.
    local: Vec<(u32, ExpertMlp)>,
    in_width: i64,
    out_width: i64,
    /// A transformer block (`h + moe(norm(h))`) or a head (`moe(x)`).
    residual: bool,
}

impl MoeFeedForward {
    /// A transformer block's mixture (GELU experts, residual); `p` is the block's `moe` path,
    /// `hidden` the experts' hidden width.
    pub fn new(
        p: &nn::Path,
        runtime: &Arc<MoeRuntime>,
        width: i64,
        hidden: i64,
        init: ExpertInit,
    ) -> Result<Self> {
        Self::build(
            p,
            runtime,
            [width, hidden, width],
            Activation::Gelu,
            true,
            init,
        )
    }

    /// A projection head as a mixture of `in_width → hidden → ReLU → out_width` experts,
    /// without residual or norm: `moe(x)`. A token whose assignments are all dropped maps to
    /// zero, so heads are best trained dropless.
    pub fn head(
        p: &nn::Path,
        runtime: &Arc<MoeRuntime>,
        in_width: i64,
        hidden: i64,
        out_width: i64,
        init: ExpertInit,
    ) -> Result<Self> {
        Self::build(
            p,
            runtime,
            [in_width, hidden, out_width],
            Activation::Relu,
            false,
            init,
        )
    }

    fn build(
        p: &nn::Path,
        runtime: &Arc<MoeRuntime>,
        [width, hidden, out_width]: [i64; 3],
        activation: Activation,
        residual: bool,
        init: ExpertInit,
    ) -> Result<Self> {
        let s = runtime.settings();
        let experts = s.experts as i64;
        let gate = (p / "gate").var(
            "weight",
            &[experts, width],
            crate::nn::torch_default_uniform(width),
        );
        let shapes = ExpertShapes {
            params: vec![
                ("c_fc.weight".into(), vec![hidden, width]),
                ("c_fc.bias".into(), vec![hidden]),
                ("c_proj.weight".into(), vec![out_width, hidden]),
                ("c_proj.bias".into(), vec![out_width]),
            ],
            device: p.device(),
        };
        let prefix = path_name(p);
        let block = runtime
            .register_block(prefix, shapes.clone())
            .context("creating an MoE block")?;
        let rank = runtime.coll().rank() as u32;
        let placement = &runtime.placement().blocks[block];
        let inits = [
            init.fc_weight,
            init.fc_bias,
            init.proj_weight,
            init.proj_bias,
        ];
        let mut local = Vec::new();
        for e in 0..experts as u32 {
            if placement.holders[e as usize].contains(&rank) {
                let ep = p / "experts" / e;
                let linear = |name: &str, c_in: i64, c_out: i64, w: Init, b: Init| {
                    nn::linear(
                        &ep / name,
                        c_in,
                        c_out,
                        nn::LinearConfig {
                            ws_init: w,
                            bs_init: Some(b),
                            bias: true,
                        },
                    )
                };
                let c_fc = linear("c_fc", width, hidden, inits[0], inits[1]);
                let c_proj = linear("c_proj", hidden, out_width, inits[2], inits[3]);
                local.push((
                    e,
                    ExpertMlp {
                        c_fc,
                        c_proj,
                        activation,
                    },
                ));
            } else {
                // Same draws as the holder makes (weight before bias, as nn::linear does).
                for ((_, shape), i) in shapes.params.iter().zip(inits) {
                    let _ = nn::init(i, shape, p.device());
                }
            }
        }
        Ok(Self {
            runtime: runtime.clone(),
            block,
            gate,
            local,
            in_width: width,
            out_width,
            residual,
        })
    }

    /// `h + moe(norm(h))` for `h` of shape (…, D); `norm` is the block's `ln_2`.
    pub fn forward_residual(&self, h: &Tensor, norm: &impl Module) -> Tensor {
        assert!(self.residual, "a head has no residual form");
        let norm = |t: &Tensor| t.apply(norm);
        self.forward_any(h, Some(&norm))
    }

    /// Width of the tokens the block takes.
    pub fn in_width(&self) -> i64 {
        self.in_width
    }

    /// `moe(x)` for a head: (…, in_width) → (…, out_width).
    pub fn forward_head(&self, x: &Tensor) -> Tensor {
        assert!(
            !self.residual,
            "a transformer block's mixture has a residual form"
        );
        self.forward_any(x, None)
    }

    fn forward_any(&self, h: &Tensor, norm: Option<&dyn Fn(&Tensor) -> Tensor>) -> Tensor {
        let mut shape = h.size();
        let d = *shape.last().expect("MoE input has a feature dimension");
        assert_eq!(
            d, self.in_width,
            "MoE block of input width {} got {shape:?}",
            self.in_width
        );
        let h2 = h.reshape([-1, d]);
        let out = if self.runtime.coll().world_size() == 1 {
            self.forward_local(&h2, norm)
        } else if self.runtime.failed() {
            // An earlier exchange failed: the peers are gone, the step will report it.
            self.placeholder(&h2)
        } else {
            match self.forward_distributed(&h2, norm) {
                Ok(out) => out,
                Err(e) => {
                    self.runtime
                        .fail(&e.context(format!("MoE block {}", self.block)));
                    self.placeholder(&h2)
                }
            }
        };
        *shape.last_mut().expect("non-empty shape") = self.out_width;
        out.view(shape.as_slice())
    }

    /// An output of the right shape for a forward whose exchange failed (never trained on:
    /// the step checks the runtime before using it).
    fn placeholder(&self, h: &Tensor) -> Tensor {
        Tensor::zeros([h.size()[0], self.out_width], (h.kind(), h.device()))
    }

    /// Routing of `y` (tokens × D) under the current pass, its load counted, its auxiliary
    /// losses kept when the pass records.
    fn route(&self, y: &Tensor, differentiable: bool, separate_aux_graph: bool) -> Routing {
        let pass = self.runtime.pass();
        let s = self.runtime.settings();
        let capacity = if pass.train && !s.dropless {
            Capacity::Factor {
                factor: s.capacity_factor,
                min: s.min_capacity,
            }
        } else if !pass.train && s.eval_capacity_factor > 0.0 {
            Capacity::Factor {
                factor: s.eval_capacity_factor,
                min: s.min_capacity,
            }
        } else {
            Capacity::Unlimited
        };
        let x = y.to_kind(Kind::Float);
        let factor = (pass.train && s.jitter > 0.0).then(|| gate::jitter_factor(&x, s.jitter));
        let logits = || {
            without_autocast(|| {
                let x = match &factor {
                    Some(f) => &x * f,
                    None => x.shallow_clone(),
                };
                x.linear::<Tensor>(&self.gate, None)
            })
        };
        let r = gate::route(&logits(), s.top_k, capacity);
        if pass.count_load {
            self.runtime
                .count_load(self.block, &r.routed_per_expert, r.dropped);
        }
        if differentiable && pass.aux_weight != 0.0 {
            // Across exchange cuts the auxiliary losses are backpropagated in the first
            // backward call, before the combine weights' graph is reached: they get a graph
            // of their own (a second, tiny gate matmul), or that call would free it.
            let (balance, z) = if separate_aux_graph {
                gate::balance_and_z_loss(&logits(), &r.first_choice_fraction)
            } else {
                (r.balance_loss.shallow_clone(), r.z_loss.shallow_clone())
            };
            let aux = balance * s.balance_loss_coef + z * s.z_loss_coef;
            self.runtime.add_aux(aux * pass.aux_weight);
        }
        r
    }

    /// One worker holds every expert: plain autograd.
    fn forward_local(&self, h: &Tensor, norm: Option<&dyn Fn(&Tensor) -> Tensor>) -> Tensor {
        let y = norm.map_or_else(|| h.shallow_clone(), |n| n(h));
        let r = self.route(&y, y.requires_grad() || self.gate.requires_grad(), false);
        let mut out = Tensor::zeros([h.size()[0], self.out_width], (h.kind(), h.device()));
        let mut start = 0;
        for (e, expert) in &self.local {
            let n = r.kept_per_expert[*e as usize];
            if n > 0 {
                let tokens = r.token.narrow(0, start, n);
                let w = r.weight.narrow(0, start, n).unsqueeze(1);
                let o = expert.forward(&y.index_select(0, &tokens));
                out = out.index_add(0, &tokens, &(o.to_kind(h.kind()) * w));
            }
            start += n;
        }
        if self.residual {
            h + out
        } else {
            out
        }
    }

    fn forward_distributed(
        &self,
        h: &Tensor,
        norm: Option<&dyn Fn(&Tensor) -> Tensor>,
    ) -> Result<Tensor> {
        let coll = self.runtime.coll();
        let world = coll.world_size();
        let record = self.runtime.pass().record;
        let leaf = |t: &Tensor| {
            if record {
                t.detach().set_requires_grad(true)
            } else {
                t.shallow_clone()
            }
        };
        // Without a residual the input is only the tokens: no separate leaf for it.
        let h_leaf = self.residual.then(|| leaf(h));
        let y_in = norm.map_or_else(|| h.shallow_clone(), |n| n(h));
        let y = leaf(&y_in);
        let r = self.route(&y, record, true);

        let placement = &self.runtime.placement().blocks[self.block];
        let DispatchPlan {
            order,
            send_counts,
            header,
            header_counts,
        } = dispatch::plan(placement, &r.kept_per_expert, world);
        let order = Tensor::from_slice(&order).to_device(h.device());
        let send_token = r.token.index_select(0, &order);
        let send_weight = r.weight.index_select(0, &order);
        let send_rows = y.index_select(0, &send_token);
        let outgoing = Outgoing {
            rows: &send_rows,
            send_counts,
            header,
            header_counts,
            local_experts: self.local.len(),
        };
        let tape = exchange::forward(coll, outgoing, record, |recv, rows| {
            self.run_local_experts(recv, rows)
        })?;
        if self.runtime.pass().count_load {
            self.runtime
                .count_received(self.block, tape.recv_leaf.size()[0]);
        }
        let c_leaf = &tape.returned;

        let combined = (c_leaf.to_kind(h.kind()) * send_weight.unsqueeze(1)).to_kind(h.kind());
        let out = Tensor::zeros([h.size()[0], self.out_width], (h.kind(), h.device())).index_add(
            0,
            &send_token,
            &combined,
        );
        let result = match &h_leaf {
            Some(h_leaf) => h_leaf + out,
            None => out,
        };
        if record {
            self.runtime.record(Record {
                h: h_leaf.map(|leaf| (h.shallow_clone(), leaf)),
                y_in,
                y_leaf: y,
                send_token,
                exchange: tape,
            });
        }
        Ok(result)
    }

    /// Each local expert on its received rows; the outputs in received-row order.
    fn run_local_experts(&self, recv: &Tensor, rows: &[Vec<i64>]) -> Tensor {
        let n = recv.size()[0];
        if n == 0 {
            return Tensor::zeros([0, self.out_width], (recv.kind(), recv.device()));
        }
        let mut outputs = Vec::new();
        let mut positions = Vec::new();
        for ((_, expert), rows) in self.local.iter().zip(rows) {
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::from_slice(rows).to_device(recv.device());
            outputs.push(expert.forward(&recv.index_select(0, &idx)));
            positions.extend_from_slice(rows);
        }
        let stacked = Tensor::cat(&outputs, 0);
        // positions[i] is the received row of stacked row i; invert that permutation.
        let mut inverse = vec![0i64; positions.len()];
        for (i, &p) in positions.iter().enumerate() {
            inverse[p as usize] = i as i64;
        }
        stacked.index_select(0, &Tensor::from_slice(&inverse).to_device(recv.device()))
    }
}

/// The var-store name of `p`, e.g. `visual.transformer.resblocks.3.moe`.
fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}
