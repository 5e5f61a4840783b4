//! The pre-norm residual attention block shared by the CLIP vision and text towers.
//!
//! Layout and names follow open_clip 3.3.0's `ResidualAttentionBlock` / `Transformer`
//! (`resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
//! mlp.c_fc, mlp.c_proj}`), so checkpoints move between the two by name. Activations are
//! batch-first (N, L, D), as open_clip 3.3.0 runs them. Attention goes through
//! `scaled_dot_product_attention`, which picks flash / memory-efficient kernels on GPU.

use super::lora::{adapted, Lora};
use crate::moe::{ExpertInit, MoeFeedForward, MoeRuntime};
use crate::nn::torch_default_uniform;
use contrail_common::config::{Activation, AdapterSettings};
use std::sync::Arc;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// LayerNorm as in open_clip (eps 1e-5, affine): `weight` and `bias` under `p`.
/// A LayerNorm whose epsilon is set after it is built (open_clip's towers use 1e-5, timm's
/// ViTs 1e-6); tch keeps its own LayerNorm's epsilon private.
#[derive(Debug)]
pub(crate) struct Norm {
    ln: nn::LayerNorm,
    eps: f64,
}

impl nn::Module for Norm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            &self.ln.normalized_shape,
            self.ln.ws.as_ref(),
            self.ln.bs.as_ref(),
            self.eps,
            true,
        )
    }
}

impl Norm {
    pub(crate) fn set_eps(&mut self, eps: f64) {
        self.eps = eps;
    }
}

/// PyTorch's `nn.LayerNorm(width)` (epsilon 1e-5).
pub(crate) fn layer_norm(p: nn::Path, width: i64) -> Norm {
    Norm {
        ln: nn::layer_norm(p, vec![width], Default::default()),
        eps: 1e-5,
    }
}

fn linear(p: nn::Path, c_in: i64, c_out: i64, weight: Init, bias: Init) -> nn::Linear {
    nn::linear(
        p,
        c_in,
        c_out,
        nn::LinearConfig {
            ws_init: weight,
            bs_init: Some(bias),
            bias: true,
        },
    )
}

/// How a tower initialises its blocks: open_clip's vision tower leaves PyTorch's module
/// defaults in place, its text tower draws normals with depth-scaled deviations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BlockInit {
    /// `nn.MultiheadAttention` (xavier-uniform in_proj, zero biases) and `nn.Linear` defaults.
    TorchDefault,
    /// open_clip `TextTransformer.init_parameters`: N(0, attn_std) in_proj, N(0, proj_std)
    /// out_proj and c_proj weights, N(0, fc_std) c_fc weight; biases keep module defaults.
    Normal {
        attn_std: f64,
        proj_std: f64,
        fc_std: f64,
    },
}

impl BlockInit {
    /// The deviations open_clip's text tower uses for `width` × `layers`.
    pub fn open_clip_text(width: i64, layers: i64) -> Self {
        let w = width as f64;
        BlockInit::Normal {
            attn_std: w.powf(-0.5),
            proj_std: w.powf(-0.5) * ((2 * layers) as f64).powf(-0.5),
            fc_std: (2.0 * w).powf(-0.5),
        }
    }
}

/// Which attention pattern a forward pass uses.
#[derive(Debug)]
pub enum AttentionMask<'a> {
    /// Every position attends to every position.
    Full,
    /// Position i attends to positions ≤ i (CLIP's text tower).
    Causal,
    /// N × L bool, true where a key may be attended to (padding is false). Query rows of
    /// padding still attend to the valid keys, so no row is empty as long as one key is valid.
    KeyPadding(&'a Tensor),
}

/// Which blocks of a tower replace their MLP with an MoE block, and the runtime those share.
#[derive(Debug, Clone)]
pub struct MoeBlocks {
    pub runtime: Arc<MoeRuntime>,
    /// Block indices, ascending.
    pub blocks: Vec<usize>,
    /// Hidden width of each expert; 0 means the dense MLP's width.
    pub expert_hidden: i64,
}

/// The second half of a block: the dense MLP, or a mixture of experts.
#[derive(Debug)]
enum FeedForward {
    Dense {
        c_fc: nn::Linear,
        c_proj: nn::Linear,
    },
    Moe(MoeFeedForward),
}

/// `ln_1 → multi-head self-attention → + residual → ln_2 → c_fc → GELU → c_proj → + residual`
/// (or `→ ln_2 → mixture of experts → + residual`).
#[derive(Debug)]
pub struct ResidualAttentionBlock {
    ln_1: Norm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    ln_2: Norm,
    ffn: FeedForward,
    heads: i64,
    /// Of the dense MLP (an MoE block's experts use GELU; the config refuses QuickGELU there).
    activation: Activation,
    /// LoRA adapters on the block's projections (`[model.adapters]`).
    lora: BlockLora,
}

/// The adapters of one block, where `[model.adapters] targets` put them.
#[derive(Debug, Default)]
struct BlockLora {
    in_proj: Option<Lora>,
    out_proj: Option<Lora>,
    c_fc: Option<Lora>,
    c_proj: Option<Lora>,
}

impl ResidualAttentionBlock {
    /// `mlp_width` is `int(width * mlp_ratio)`, as open_clip computes it.
    pub fn new(p: &nn::Path, width: i64, heads: i64, mlp_width: i64, init: BlockInit) -> Self {
        Self::build(p, width, heads, mlp_width, init, None).expect("a dense block always builds")
    }

    /// With `moe = Some((runtime, expert_hidden))` the MLP is a mixture of experts under
    /// `p / "moe"`, each expert drawn like the dense MLP would be.
    fn build(
        p: &nn::Path,
        width: i64,
        heads: i64,
        mlp_width: i64,
        init: BlockInit,
        moe: Option<(&Arc<MoeRuntime>, i64)>,
    ) -> anyhow::Result<Self> {
        assert!(
            heads > 0 && width % heads == 0,
            "width {width} must be a positive multiple of heads {heads}"
        );
        let attn = p / "attn";
        let mlp = p / "mlp";
        let (in_w, out_w, fc_w, proj_w) = match init {
            BlockInit::TorchDefault => {
                // xavier_uniform_ on the stacked (3D, D) in_proj_weight, as nn.MultiheadAttention.
                let bound = (6.0 / (4 * width) as f64).sqrt();
                (
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                    torch_default_uniform(width),
                    torch_default_uniform(width),
                    torch_default_uniform(mlp_width),
                )
            }
            BlockInit::Normal {
                attn_std,
                proj_std,
                fc_std,
            } => {
                let normal = |stdev| Init::Randn { mean: 0.0, stdev };
                (
                    normal(attn_std),
                    normal(proj_std),
                    normal(fc_std),
                    normal(proj_std),
                )
            }
        };
        let ln_1 = layer_norm(p / "ln_1", width);
        let in_proj_weight = attn.var("in_proj_weight", &[3 * width, width], in_w);
        let in_proj_bias = attn.var("in_proj_bias", &[3 * width], Init::Const(0.0));
        let out_proj = linear(&attn / "out_proj", width, width, out_w, Init::Const(0.0));
        let ln_2 = layer_norm(p / "ln_2", width);
        let ffn = match moe {
            None => FeedForward::Dense {
                c_fc: linear(
                    &mlp / "c_fc",
                    width,
                    mlp_width,
                    fc_w,
                    torch_default_uniform(width),
                ),
                c_proj: linear(
                    &mlp / "c_proj",
                    mlp_width,
                    width,
                    proj_w,
                    torch_default_uniform(mlp_width),
                ),
            },
            Some((runtime, hidden)) => {
                let hidden = if hidden > 0 { hidden } else { mlp_width };
                // The dense MLP's initialisers, with the fan-in of the expert's own width.
                let proj_w = match init {
                    BlockInit::TorchDefault => torch_default_uniform(hidden),
                    BlockInit::Normal { .. } => proj_w,
                };
                let init = ExpertInit {
                    fc_weight: fc_w,
                    fc_bias: torch_default_uniform(width),
                    proj_weight: proj_w,
                    proj_bias: torch_default_uniform(hidden),
                };
                FeedForward::Moe(MoeFeedForward::new(
                    &(p / "moe"),
                    runtime,
                    width,
                    hidden,
                    init,
                )?)
            }
        };
        Ok(Self {
            ln_1,
            in_proj_weight,
            in_proj_bias,
            out_proj,
            ln_2,
            ffn,
            heads,
            activation: Activation::Gelu,
            lora: BlockLora::default(),
        })
    }

    /// Adds LoRA adapters under the block's path `p` to the projections `settings` targets.
    fn add_adapters(&mut self, p: &nn::Path, settings: &AdapterSettings) {
        let width = self.in_proj_weight.size()[1];
        let attn = p / "attn";
        if settings.targets_attention() {
            self.lora.in_proj = Some(Lora::new(&(&attn / "in_proj"), width, 3 * width, settings));
            self.lora.out_proj = Some(Lora::new(&(&attn / "out_proj"), width, width, settings));
        }
        if let (true, FeedForward::Dense { c_fc, .. }) = (settings.targets_mlp(), &self.ffn) {
            let hidden = c_fc.ws.size()[0];
            let mlp = p / "mlp";
            self.lora.c_fc = Some(Lora::new(&(&mlp / "c_fc"), width, hidden, settings));
            self.lora.c_proj = Some(Lora::new(&(&mlp / "c_proj"), hidden, width, settings));
        }
    }

    /// x: N × L × D → N × L × D.
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Tensor {
        let x = x + self.attention(&x.apply(&self.ln_1), mask);
        match &self.ffn {
            FeedForward::Dense { c_fc, c_proj } => {
                let lin = |x: &Tensor, l: &nn::Linear, lora: &Option<Lora>| {
                    adapted(x, &l.ws, l.bs.as_ref(), lora.as_ref())
                };
                let h = activate(
                    &lin(&x.apply(&self.ln_2), c_fc, &self.lora.c_fc),
                    self.activation,
                );
                &x + lin(&h, c_proj, &self.lora.c_proj)
            }
            FeedForward::Moe(moe) => moe.forward_residual(&x, &self.ln_2),
        }
    }

    /// Takes part in the MoE block's exchanges without tokens (a rank without samples must
    /// still serve its experts); nothing for a dense block.
    fn moe_idle_pass(&self, width: i64, device: tch::Device) {
        if let FeedForward::Moe(moe) = &self.ffn {
            let none = Tensor::zeros([0, width], (Kind::Float, device));
            let _ = moe.forward_residual(&none, &self.ln_2);
        }
    }

    fn attention(&self, x: &Tensor, mask: &AttentionMask) -> Tensor {
        let (n, l, d) = x.size3().expect("attention input must be N × L × D");
        let head_dim = d / self.heads;
        // (N, L, 3D) → (3, N, heads, L, head_dim): q, k, v split the packed projection in
        // that order, as nn.MultiheadAttention's in_proj does.
        let qkv = adapted(
            x,
            &self.in_proj_weight,
            Some(&self.in_proj_bias),
            self.lora.in_proj.as_ref(),
        )
        .view([n, l, 3, self.heads, head_dim])
        .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let (bool_mask, is_causal) = match mask {
            AttentionMask::Full => (None, false),
            AttentionMask::Causal => (None, true),
            AttentionMask::KeyPadding(valid) => {
                let valid = valid.to_kind(Kind::Bool).view([n, 1, 1, l]);
                (Some(valid), false)
            }
        };
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            bool_mask.as_ref(),
            0.0,
            is_causal,
            None,
            false,
        );
        let out = out.transpose(1, 2).reshape([n, l, d]);
        adapted(
            &out,
            &self.out_proj.ws,
            self.out_proj.bs.as_ref(),
            self.lora.out_proj.as_ref(),
        )
    }
}

/// A stack of blocks named `resblocks.0`, `resblocks.1`, … under `p` (open_clip's
/// `Transformer`; callers pass `… / "transformer"`).
#[derive(Debug)]
pub struct Transformer {
    resblocks: Vec<ResidualAttentionBlock>,
    width: i64,
}

impl Transformer {
    /// `moe` turns the listed blocks into MoE blocks.
    pub fn new(
        p: &nn::Path,
        width: i64,
        layers: i64,
        heads: i64,
        mlp_ratio: f64,
        init: BlockInit,
        moe: Option<&MoeBlocks>,
    ) -> anyhow::Result<Self> {
        let mlp_width = mlp_width(width, mlp_ratio);
        let blocks = p / "resblocks";
        let resblocks = (0..layers)
            .map(|i| {
                let expert = moe
                    .filter(|m| m.blocks.contains(&(i as usize)))
                    .map(|m| (&m.runtime, m.expert_hidden));
                ResidualAttentionBlock::build(&(&blocks / i), width, heads, mlp_width, init, expert)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { resblocks, width })
    }

    /// The same tower with `eps` in every block's LayerNorms.
    pub fn with_norm_eps(mut self, eps: f64) -> Self {
        for block in &mut self.resblocks {
            block.ln_1.set_eps(eps);
            block.ln_2.set_eps(eps);
        }
        self
    }

    /// The same tower with `activation` in every dense MLP.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        for block in &mut self.resblocks {
            block.activation = activation;
        }
        self
    }

    /// LoRA adapters on every block (`p` is the path the tower was built on, `… /
    /// "transformer"`). Drawn after the base weights, so those do not depend on them.
    pub fn add_adapters(&mut self, p: &nn::Path, settings: &AdapterSettings) {
        let blocks = p / "resblocks";
        for (i, block) in self.resblocks.iter_mut().enumerate() {
            block.add_adapters(&(&blocks / i as i64), settings);
        }
    }

    /// [`ResidualAttentionBlock::moe_idle_pass`] of every block, in order.
    pub fn moe_idle_pass(&self, device: tch::Device) {
        for block in &self.resblocks {
            block.moe_idle_pass(self.width, device);
        }
    }

    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Tensor {
        let mut x = x.shallow_clone();
        for block in &self.resblocks {
            x = block.forward(&x, mask);
        }
        x
    }

    pub fn width(&self) -> i64 {
        self.width
    }

    pub fn layers(&self) -> usize {
        self.resblocks.len()
    }
}

fn activate(h: &Tensor, activation: Activation) -> Tensor {
    match activation {
        Activation::Gelu => h.gelu("none"),
        // open_clip's QuickGELU.
        Activation::QuickGelu => h * (h * 1.702).sigmoid(),
    }
}

/// Python's `int(width * mlp_ratio)` (truncation).
pub fn mlp_width(width: i64, mlp_ratio: f64) -> i64 {
    (width as f64 * mlp_ratio) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn block(seed: i64) -> (VarStore, ResidualAttentionBlock) {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let b = ResidualAttentionBlock::new(&(vs.root() / "b"), 16, 4, 64, BlockInit::TorchDefault);
        (vs, b)
    }

    #[test]
    fn names_and_shapes_follow_open_clip() {
        let (vs, _) = block(0);
        let vars = vs.variables();
        let want: [(&str, &[i64]); 12] = [
            ("b.ln_1.weight", &[16]),
            ("b.ln_1.bias", &[16]),
            ("b.attn.in_proj_weight", &[48, 16]),
            ("b.attn.in_proj_bias", &[48]),
            ("b.attn.out_proj.weight", &[16, 16]),
            ("b.attn.out_proj.bias", &[16]),
            ("b.ln_2.weight", &[16]),
            ("b.ln_2.bias", &[16]),
            ("b.mlp.c_fc.weight", &[64, 16]),
            ("b.mlp.c_fc.bias", &[64]),
            ("b.mlp.c_proj.weight", &[16, 64]),
            ("b.mlp.c_proj.bias", &[16]),
        ];
        assert_eq!(vars.len(), want.len(), "{:?}", vars.keys());
        for (name, shape) in want {
            assert_eq!(vars[name].size(), shape, "{name}");
        }
    }

    /// The SDPA path against attention written out by hand (softmax(q kᵀ / sqrt(d)) v).
    #[test]
    fn attention_matches_explicit_softmax() {
        let (_vs, b) = block(3);
        let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let (n, l, d, h) = (2, 5, 16, 4);
        let qkv = x
            .linear(&b.in_proj_weight, Some(&b.in_proj_bias))
            .view([n, l, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scores = q.matmul(&k.transpose(-2, -1)) / ((d / h) as f64).sqrt();
        let causal = Tensor::ones([l, l], (Kind::Bool, Device::Cpu)).tril(0);
        for (mask, scores) in [
            (AttentionMask::Full, scores.shallow_clone()),
            (
                AttentionMask::Causal,
                scores.masked_fill(&causal.logical_not(), f64::NEG_INFINITY),
            ),
        ] {
            let want = scores
                .softmax(-1, Kind::Float)
                .matmul(&v)
                .transpose(1, 2)
                .reshape([n, l, d])
                .apply(&b.out_proj);
            let got = b.attention(&x, &mask);
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{mask:?}: {diff}");
        }
    }

    #[test]
    fn key_padding_hides_padded_positions() {
        let (_vs, b) = block(4);
        let x = Tensor::randn([1, 6, 16], (Kind::Float, Device::Cpu));
        let valid = Tensor::from_slice(&[true, true, true, true, false, false]).view([1, 6]);
        let out = b.forward(&x, &AttentionMask::KeyPadding(&valid));
        // Changing the padded tokens must not move the valid ones.
        let x2 = x.copy();
        x2.narrow(1, 4, 2)
            .copy_(&Tensor::randn([1, 2, 16], (Kind::Float, Device::Cpu)));
        let out2 = b.forward(&x2, &AttentionMask::KeyPadding(&valid));
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&out.narrow(1, 0, 4), &out2.narrow(1, 0, 4)) < 1e-6);
        assert!(diff(&out.narrow(1, 4, 2), &out2.narrow(1, 4, 2)) > 1e-3);
        // Without the mask the same change does reach the valid positions.
        let full = b.forward(&x, &AttentionMask::Full);
        let full2 = b.forward(&x2, &AttentionMask::Full);
        assert!(diff(&full.narrow(1, 0, 4), &full2.narrow(1, 0, 4)) > 1e-4);
    }

    #[test]
    fn mlp_width_truncates_like_python() {
        assert_eq!(mlp_width(768, 4.0), 3072);
        assert_eq!(mlp_width(10, 2.66), 26);
    }
}
