//! Vision Transformer image tower of a CLIP model, parameter for parameter open_clip 3.3.0's
//! `VisionTransformer` as the ViT-B-32 / ViT-B-16 configs build it (learnable positional
//! embedding, `ln_pre`, class-token pooling, no attentional pooler, no patch dropout, GELU).
//!
//! Built on `root / "visual"` the names are open_clip's: `visual.conv1.weight`,
//! `visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre.*`,
//! `visual.transformer.resblocks.N.*`, `visual.ln_post.*`, `visual.proj`.
//!
//! `VitStyle::Timm` builds timm's `VisionTransformer` under the same names instead: the patch
//! convolution has a bias (`conv1.bias`), there is no `ln_pre`, and every LayerNorm uses
//! epsilon 1e-6 (timm's own names are translated when weights load, `model::init_weights`).

use super::transformer::{layer_norm, AttentionMask, BlockInit, MoeBlocks, Norm, Transformer};
use crate::nn::torch_default_uniform;
use anyhow::{bail, ensure};
use contrail_common::config::{Activation, VitStyle};
use tch::nn::{self, Init};
use tch::Tensor;

/// Sizes of a ViT tower. `heads` is open_clip's `width / head_width` (head_width 64 in every
/// stock config).
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub mlp_ratio: f64,
    /// Size of the joint image–text embedding (`embed_dim` in open_clip configs).
    pub output_dim: i64,
    pub activation: Activation,
    pub style: VitStyle,
}

impl VitConfig {
    /// open_clip `ViT-B-32`: 224², patch 32, width 768, 12 layers, 12 heads, embed 512.
    pub fn vit_b_32() -> Self {
        Self::base(32)
    }

    /// open_clip `ViT-B-16`: as ViT-B-32 with 16-pixel patches (196 + 1 tokens).
    pub fn vit_b_16() -> Self {
        Self::base(16)
    }

    /// open_clip `ViT-S-32`: width 384, 12 layers, 6 heads, embed 384.
    pub fn vit_s_32() -> Self {
        Self::small(32)
    }

    /// open_clip `ViT-S-16`.
    pub fn vit_s_16() -> Self {
        Self::small(16)
    }

    fn base(patch_size: i64) -> Self {
        Self {
            image_size: 224,
            patch_size,
            width: 768,
            layers: 12,
            heads: 12,
            mlp_ratio: 4.0,
            output_dim: 512,
            activation: Activation::Gelu,
            style: VitStyle::OpenClip,
        }
    }

    fn small(patch_size: i64) -> Self {
        Self {
            image_size: 224,
            patch_size,
            width: 384,
            layers: 12,
            heads: 6,
            mlp_ratio: 4.0,
            output_dim: 384,
            activation: Activation::Gelu,
            style: VitStyle::OpenClip,
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Sequence length: grid² patches plus the class token.
    pub fn num_tokens(&self) -> i64 {
        self.grid() * self.grid() + 1
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let Self {
            image_size,
            patch_size,
            width,
            layers,
            heads,
            mlp_ratio,
            output_dim,
            ..
        } = *self;
        ensure!(
            image_size > 0 && patch_size > 0 && width > 0 && layers > 0 && heads > 0,
            "vit: image_size, patch_size, width, layers and heads must be positive (got {self:?})"
        );
        if image_size % patch_size != 0 {
            bail!("vit: image_size {image_size} is not a multiple of patch_size {patch_size}");
        }
        if width % heads != 0 {
            bail!("vit: width {width} is not a multiple of heads {heads}");
        }
        ensure!(
            mlp_ratio > 0.0 && output_dim > 0,
            "vit: mlp_ratio and output_dim must be positive (got {self:?})"
        );
        Ok(())
    }
}

#[derive(Debug)]
pub struct VisionTransformer {
    conv1: nn::Conv2D,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    /// None in timm's layout.
    ln_pre: Option<Norm>,
    transformer: Transformer,
    ln_post: Norm,
    proj: Tensor,
    cfg: VitConfig,
}

impl VisionTransformer {
    /// Creates the variables under `p` with open_clip's initialisation (PyTorch module
    /// defaults in the blocks, N(0, width^-½) embeddings and projection).
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> anyhow::Result<Self> {
        Self::with_moe(p, cfg, None)
    }

    /// [`Self::new`] with the blocks `moe` lists as mixture-of-experts blocks.
    pub fn with_moe(
        p: &nn::Path,
        cfg: &VitConfig,
        moe: Option<&MoeBlocks>,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let VitConfig {
            patch_size,
            width,
            layers,
            heads,
            mlp_ratio,
            output_dim,
            ..
        } = *cfg;
        let scale = (width as f64).powf(-0.5);
        let normal = Init::Randn {
            mean: 0.0,
            stdev: scale,
        };
        let timm = cfg.style == VitStyle::Timm;
        let fan_in = 3 * patch_size * patch_size;
        let conv1 = nn::conv2d(
            p / "conv1",
            3,
            width,
            patch_size,
            nn::ConvConfig {
                stride: patch_size,
                bias: timm,
                ws_init: torch_default_uniform(fan_in),
                bs_init: torch_default_uniform(fan_in),
                ..Default::default()
            },
        );
        let eps = if timm { 1e-6 } else { 1e-5 };
        let mut ln_post = layer_norm(p / "ln_post", width);
        ln_post.set_eps(eps);
        Ok(Self {
            conv1,
            class_embedding: p.var("class_embedding", &[width], normal),
            positional_embedding: p.var("positional_embedding", &[cfg.num_tokens(), width], normal),
            ln_pre: (!timm).then(|| layer_norm(p / "ln_pre", width)),
            transformer: Transformer::new(
                &(p / "transformer"),
                width,
                layers,
                heads,
                mlp_ratio,
                BlockInit::TorchDefault,
                moe,
            )?
            .with_activation(cfg.activation)
            .with_norm_eps(eps),
            ln_post,
            proj: p.var("proj", &[width, output_dim], normal),
            cfg: cfg.clone(),
        })
    }

    /// LoRA adapters on every block; `p` is the path the tower was built on.
    pub fn add_adapters(
        &mut self,
        p: &nn::Path,
        settings: &contrail_common::config::AdapterSettings,
    ) {
        self.transformer
            .add_adapters(&(p / "transformer"), settings);
    }

    /// The block stack (for the MoE idle pass).
    pub fn transformer(&self) -> &Transformer {
        &self.transformer
    }

    /// Images N × 3 × image_size × image_size → N × output_dim (not normalised).
    ///
    /// Panics (libtorch shape error) on another image size: the positional embedding is
    /// learned for one grid and is not interpolated.
    pub fn forward(&self, images: &Tensor) -> Tensor {
        let pooled = self.forward_tokens(images).select(1, 0);
        pooled.matmul(&self.proj)
    }

    /// Every token after `ln_post`, N × (grid² + 1) × width; index 0 is the class token.
    pub fn forward_tokens(&self, images: &Tensor) -> Tensor {
        let n = images.size()[0];
        let width = self.cfg.width;
        // N × width × grid × grid → N × grid² × width
        let patches = images.apply(&self.conv1).flatten(2, 3).transpose(1, 2);
        let cls = self
            .class_embedding
            .to_kind(patches.kind())
            .view([1, 1, width])
            .expand([n, 1, width], false);
        let x = Tensor::cat(&[cls, patches], 1);
        let x = &x + self.positional_embedding.to_kind(x.kind());
        let x = match &self.ln_pre {
            Some(ln_pre) => x.apply(ln_pre),
            None => x,
        };
        let x = self.transformer.forward(&x, &AttentionMask::Full);
        x.apply(&self.ln_post)
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    pub fn output_dim(&self) -> i64 {
        self.cfg.output_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    fn tiny() -> VitConfig {
        VitConfig {
            image_size: 32,
            patch_size: 16,
            width: 16,
            layers: 2,
            heads: 4,
            mlp_ratio: 4.0,
            output_dim: 8,
            activation: Activation::Gelu,
            style: VitStyle::OpenClip,
        }
    }

    #[test]
    fn names_and_shapes_follow_open_clip() {
        let vs = VarStore::new(Device::Cpu);
        let _vit = VisionTransformer::new(&(vs.root() / "visual"), &tiny()).unwrap();
        let vars = vs.variables();
        let want: [(&str, &[i64]); 8] = [
            ("visual.conv1.weight", &[16, 3, 16, 16]),
            ("visual.class_embedding", &[16]),
            ("visual.positional_embedding", &[5, 16]),
            ("visual.ln_pre.weight", &[16]),
            (
                "visual.transformer.resblocks.1.attn.in_proj_weight",
                &[48, 16],
            ),
            (
                "visual.transformer.resblocks.0.mlp.c_proj.weight",
                &[16, 64],
            ),
            ("visual.ln_post.bias", &[16]),
            ("visual.proj", &[16, 8]),
        ];
        for (name, shape) in want {
            assert_eq!(
                vars.get(name).map(|t| t.size()),
                Some(shape.to_vec()),
                "{name}"
            );
        }
        // conv1 has no bias: conv1, class and positional embeddings, ln_pre (2), ln_post (2),
        // proj, and 12 variables per block.
        assert!(!vars.contains_key("visual.conv1.bias"));
        assert_eq!(vars.len(), 8 + 2 * 12, "{:?}", vars.keys());
    }

    #[test]
    fn output_shape_and_presets() {
        let vs = VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(&vs.root(), &tiny()).unwrap();
        let x = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(vit.forward(&x).size(), vec![3, 8]);
        assert_eq!(vit.forward_tokens(&x).size(), vec![3, 5, 16]);
        assert_eq!(VitConfig::vit_b_32().num_tokens(), 50);
        assert_eq!(VitConfig::vit_b_16().num_tokens(), 197);
        for c in [
            VitConfig::vit_b_32(),
            VitConfig::vit_b_16(),
            VitConfig::vit_s_16(),
            VitConfig::vit_s_32(),
        ] {
            c.validate().unwrap();
            assert_eq!(c.width / c.heads, 64, "{c:?}: open_clip's head_width");
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut c = tiny();
        c.patch_size = 12;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("patch_size 12"), "{e}");
        let mut c = tiny();
        c.heads = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("heads 5"), "{e}");
    }
}
