//! Models: the image network (ResNet encoder + MLP projector), the heads some objectives add
//! (SwAV's prototypes, MoCo's momentum branch with its queue), and their named variables.
//!
//! Every trainable variable lives in one [`nn::VarStore`] under a torchvision-compatible name;
//! the optimizer and checkpoints address parameters by those names, and the gradient
//! all-reduce walks them in name order so every rank packs its buckets identically.

pub mod bert;
pub mod depth;
pub mod init_weights;
pub mod logit_scale;
pub mod lora;
pub mod momentum;
pub mod projector;
pub mod prototypes;
pub mod resnet;
pub mod text;
pub mod transformer;
pub mod vit;

use crate::dist::grad_sync::GradSync;
use crate::dist::local::LocalGroup;
use crate::dist::Collective;
use crate::moe::{ExpertInit, MoeFeedForward, MoeRuntime, MoeSettings};
use crate::nn::torch_default_uniform;
use crate::tokenize::Tokenizer;
use anyhow::{bail, Context};
use bert::{BertConfig, BertTower};
use contrail_common::config::{EncoderKind, ModelConfig, ObjectiveKind};
use contrail_common::experts::ExpertPlacement;
use contrail_common::JobConfig;
use depth::Depths;
use init_weights::{InitPlan, Tower};
use std::sync::Arc;
use tch::{nn, Device, Tensor};
use text::{TextConfig, TextTransformer};
use transformer::MoeBlocks;
use vit::{VisionTransformer, VitConfig};

use crate::nn::compute::{self, Compute};
use logit_scale::{clamp_logit_scale_, LOGIT_SCALE_INIT};
pub use momentum::MomentumBranch;
pub use projector::Projector;
pub use prototypes::Prototypes;
pub use resnet::{Norm, ResNet};

/// The ResNet `model.*` describes, under `root`.
fn resnet(root: &nn::Path, cfg: &ModelConfig) -> ResNet {
    ResNet::new(
        root,
        &cfg.layers,
        cfg.width as i64,
        cfg.block,
        cfg.norm,
        cfg.stem,
    )
}

/// A ResNet under `root` and, with `model.projector` on, the MLP projector under
/// `root/projector`: the query network's layout, which MoCo's key encoder copies.
pub(crate) fn resnet_and_projector(
    root: &nn::Path,
    cfg: &ModelConfig,
) -> (ResNet, Option<Projector>) {
    let encoder = resnet(root, cfg);
    let projector = cfg.projector.then(|| {
        Projector::new(
            &(root / "projector"),
            encoder.out_dim(),
            cfg.projector_hidden as i64,
            cfg.projector_out as i64,
            cfg.norm,
        )
    });
    (encoder, projector)
}

/// The head on the pooled image features: the MLP projector, or a mixture of MLP experts.
#[derive(Debug)]
pub enum Head {
    Mlp(Projector),
    Experts(MoeFeedForward),
}

impl Head {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Head::Mlp(p) => p.forward_t(xs, train),
            Head::Experts(m) => m.forward_head(xs),
        }
    }
}

/// With `model.projector` on, the head under `root/projector` on `in_dim` features: the MLP
/// projector, or (`experts` given) a mixture of `projector_hidden`-wide MLP experts under
/// `root/projector/moe`, each drawn as `nn.Linear` defaults.
fn projection_head(
    root: &nn::Path,
    in_dim: i64,
    cfg: &ModelConfig,
    experts: Option<&Arc<MoeRuntime>>,
) -> anyhow::Result<Option<Head>> {
    if !cfg.projector {
        return Ok(None);
    }
    let (hidden, out) = (cfg.projector_hidden as i64, cfg.projector_out as i64);
    let p = root / "projector";
    Ok(Some(match experts {
        None => Head::Mlp(Projector::new(&p, in_dim, hidden, out, cfg.norm)),
        Some(rt) => {
            let init = ExpertInit {
                fc_weight: torch_default_uniform(in_dim),
                fc_bias: torch_default_uniform(in_dim),
                proj_weight: torch_default_uniform(hidden),
                proj_bias: torch_default_uniform(hidden),
            };
            Head::Experts(MoeFeedForward::head(
                &(p / "moe"),
                rt,
                in_dim,
                hidden,
                out,
                init,
            )?)
        }
    }))
}

/// Prefix of the momentum branch's variables in [`ContrastiveModel::named_variables`].
pub const MOMENTUM_PREFIX: &str = "momentum.";

/// The image encoder: a ResNet (torchvision names) or a ViT (open_clip names).
#[derive(Debug)]
pub enum ImageEncoder {
    ResNet(Box<ResNet>),
    Vit(Box<VisionTransformer>),
}

impl ImageEncoder {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            ImageEncoder::ResNet(r) => r.forward_t(xs, train),
            ImageEncoder::Vit(v) => v.forward(xs),
        }
    }
}

/// CLIP's text side: the text tower and the learnable logit scale.
#[derive(Debug)]
pub struct ClipText {
    tower: TextTower,
    logit_scale: Tensor,
    context_length: i64,
}

/// CLIP's caption tower (`model.text.kind`).
#[derive(Debug)]
enum TextTower {
    /// open_clip's text transformer.
    Clip(TextTransformer),
    /// A BERT encoder with Chinese-CLIP's projection.
    Bert(BertTower),
}

impl TextTower {
    /// Token ids N × L → N × embedding (not normalised).
    fn forward(&self, tokens: &Tensor) -> Tensor {
        match self {
            TextTower::Clip(t) => t.forward(tokens),
            TextTower::Bert(b) => b.forward(tokens),
        }
    }
}

/// What an objective adds to the image network.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per model, built once and never moved in a hot path"
)]
enum ObjectiveParts {
    /// SimCLR: nothing.
    None,
    /// SwAV: prototypes (`prototypes.weight`, trainable).
    Swav(Prototypes),
    /// MoCo: key encoder and queue (not trainable).
    Moco(MomentumBranch),
    /// CLIP: text tower and logit scale.
    Clip(ClipText),
}

/// Encoder + projector with their variables, plus the objective's extra parts.
#[derive(Debug)]
pub struct ContrastiveModel {
    vs: nn::VarStore,
    encoder: ImageEncoder,
    /// The head on the image features (absent for a CLIP ViT, whose own projection gives
    /// the embedding).
    projector: Option<Head>,
    embedding_dim: i64,
    /// What the objective adds to the image network.
    parts: ObjectiveParts,
    /// bf16 autocast and channels-last (GPU).
    compute: Compute,
    /// What the MoE blocks share, when the model has any.
    moe: Option<Arc<MoeRuntime>>,
    /// How a training step sums its gradients across ranks (as DDP's wrapper holds its
    /// bucket settings): overlapped with backward in 25 MiB buckets unless the job says not.
    grad_sync: GradSync,
    /// The towers' block counts, for layer-wise learning rates and partial unlocking.
    depths: Depths,
    /// alpha / rank of the LoRA adapters, when the model has them.
    adapter_scale: Option<f64>,
}

/// What building a model needs besides the job file.
#[derive(Default)]
pub struct BuildOptions<'a> {
    /// CLIP: the caption tokenizer, which fixes the vocabulary and the pad and end ids.
    pub tokenizer: Option<&'a dyn Tokenizer>,
    /// With `[moe]` on: the rank's expert group and the placement that says which experts it
    /// holds (the default spread when None). Without it the model holds every expert itself.
    pub experts: Option<(Arc<dyn Collective>, Option<ExpertPlacement>)>,
}

impl ContrastiveModel {
    /// The model a job trains, the one way to build one. The image tower is a ResNet or a
    /// ViT with the MLP projector on top (for CLIP under `visual.`; a CLIP ViT ends in its
    /// own projection instead); then the objective's parts: SwAV's prototypes, MoCo's
    /// momentum branch and queue (starting equal to the query network), or CLIP's text tower
    /// and `logit_scale` at the root. Variables are drawn from tch's global RNG in that order,
    /// so `tch::manual_seed` makes a build reproducible. The config is validated first.
    pub fn build(cfg: &JobConfig, device: Device, opts: BuildOptions<'_>) -> anyhow::Result<Self> {
        cfg.validate()?;
        let m = &cfg.model;
        let kind = cfg.objective.kind;
        let clip = kind == ObjectiveKind::Clip;
        let moe = moe_runtime(cfg, opts.experts)?;
        let moe_blocks = |blocks: &[u32]| {
            moe.as_ref()
                .filter(|_| !blocks.is_empty())
                .map(|rt| MoeBlocks {
                    runtime: rt.clone(),
                    blocks: blocks.iter().map(|&b| b as usize).collect(),
                    expert_hidden: cfg.moe.expert_hidden as i64,
                })
        };
        let head_moe = moe.as_ref().filter(|_| cfg.moe.projector);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let image_root = if clip { &root / "visual" } else { root.clone() };
        let (mut encoder, projector) = match m.encoder {
            EncoderKind::Vit => {
                let vit_cfg = VitConfig {
                    image_size: i64::from(cfg.data.image_size),
                    patch_size: m.vit.patch_size as i64,
                    width: m.vit.width as i64,
                    layers: m.vit.layers as i64,
                    heads: m.vit.heads as i64,
                    mlp_ratio: m.vit.mlp_ratio,
                    // CLIP: the tower's own projection gives the embedding; image objectives
                    // put the MLP projector on the pooled features.
                    output_dim: if clip {
                        m.projector_out as i64
                    } else {
                        m.vit.width as i64
                    },
                    activation: m.activation,
                    style: m.vit.style,
                };
                let vit_moe = moe_blocks(&cfg.moe.vit_blocks);
                let vit = VisionTransformer::with_moe(&image_root, &vit_cfg, vit_moe.as_ref())?;
                let projector = if m.has_projector(kind) {
                    projection_head(&image_root, vit_cfg.output_dim, m, head_moe)?
                } else {
                    None
                };
                (ImageEncoder::Vit(Box::new(vit)), projector)
            }
            EncoderKind::Resnet => {
                let resnet = resnet(&image_root, m);
                let projector = projection_head(&image_root, resnet.out_dim(), m, head_moe)?;
                (ImageEncoder::ResNet(Box::new(resnet)), projector)
            }
        };
        let embedding_dim = match (&projector, &encoder) {
            (Some(_), _) => m.projector_out as i64,
            (None, ImageEncoder::ResNet(r)) => r.out_dim(),
            (None, ImageEncoder::Vit(v)) => v.output_dim(),
        };
        let mut parts = match kind {
            ObjectiveKind::Simclr | ObjectiveKind::Moco => ObjectiveParts::None,
            ObjectiveKind::Swav => ObjectiveParts::Swav(Prototypes::new(
                &(&root / "prototypes"),
                embedding_dim,
                cfg.objective.swav.prototypes as i64,
            )),
            ObjectiveKind::Clip => {
                let tokenizer = opts
                    .tokenizer
                    .context("a CLIP model needs the caption tokenizer")?;
                let t = &m.text;
                if t.kind.is_bert_family() {
                    let tower = BertTower::new(
                        &root,
                        &BertConfig {
                            context_length: t.context_length as i64,
                            vocab_size: tokenizer.vocab_size(),
                            width: t.width as i64,
                            layers: t.layers as i64,
                            heads: t.heads as i64,
                            intermediate: (f64::from(t.width) * t.mlp_ratio).round() as i64,
                            max_positions: t.max_positions as i64,
                            output_dim: embedding_dim,
                            pad_id: tokenizer.pad_id(),
                            pooling: t.pooling,
                            kind: t.kind,
                        },
                    )?;
                    let logit_scale =
                        root.var("logit_scale", &[], nn::Init::Const(LOGIT_SCALE_INIT));
                    ObjectiveParts::Clip(ClipText {
                        tower: TextTower::Bert(tower),
                        logit_scale,
                        context_length: t.context_length as i64,
                    })
                } else {
                    let text_cfg = TextConfig {
                        context_length: t.context_length as i64,
                        width: t.width as i64,
                        layers: t.layers as i64,
                        heads: t.heads as i64,
                        mlp_ratio: t.mlp_ratio,
                        output_dim: embedding_dim,
                        mode: t.mode,
                        activation: m.activation,
                        ..TextConfig::clip_b()
                    }
                    .with_tokenizer(tokenizer);
                    let text_moe = moe_blocks(&cfg.moe.text_blocks);
                    let tower = TextTransformer::with_moe(&root, &text_cfg, text_moe.as_ref())?;
                    let logit_scale =
                        root.var("logit_scale", &[], nn::Init::Const(LOGIT_SCALE_INIT));
                    ObjectiveParts::Clip(ClipText {
                        tower: TextTower::Clip(tower),
                        logit_scale,
                        context_length: text_cfg.context_length,
                    })
                }
            }
        };
        // LoRA adapters, drawn after every base weight so those match a build without them.
        if m.adapters.enabled() {
            if let ImageEncoder::Vit(v) = &mut encoder {
                v.add_adapters(&image_root, &m.adapters);
            }
            if let ObjectiveParts::Clip(c) = &mut parts {
                match &mut c.tower {
                    TextTower::Clip(t) => t.add_adapters(&root, &m.adapters),
                    TextTower::Bert(b) => b.add_adapters(&root, &m.adapters),
                }
            }
        }
        let resnet_stages: Vec<usize> = match m.encoder {
            EncoderKind::Resnet => m.layers.iter().map(|&n| n as usize).collect(),
            EncoderKind::Vit => Vec::new(),
        };
        let depths = Depths {
            clip,
            image_blocks: match m.encoder {
                EncoderKind::Resnet => resnet_stages.iter().sum(),
                EncoderKind::Vit => m.vit.layers as usize,
            },
            text_blocks: if clip { m.text.layers as usize } else { 0 },
            resnet_stages,
        };
        let mut model = Self {
            vs,
            encoder,
            projector,
            embedding_dim,
            parts,
            compute: Compute::default(),
            moe,
            grad_sync: GradSync::default(),
            depths,
            adapter_scale: m.adapters.enabled().then(|| m.adapters.scale()),
        };
        if kind == ObjectiveKind::Moco {
            let branch = MomentumBranch::new(m, cfg.objective.moco.queue_size as i64, device)?;
            branch.copy_from_query(&model.named_variables())?;
            model.parts = ObjectiveParts::Moco(branch);
        }
        for (name, var) in model.vs.variables() {
            let tower = model.tower_of(&name);
            let locked = match tower {
                Tower::Image => m.lock_image,
                Tower::Text => m.lock_text,
                Tower::Head => false,
            };
            // With adapters the towers' own weights are frozen (adapters count as heads).
            let locked = locked || (m.adapters.enabled() && tower != Tower::Head);
            // `model.unlocked_layers`: a locked tower's last blocks and what is above them
            // still train.
            let depth = model.depths.of(&name);
            let unlocked =
                m.unlocked_layers > 0 && depth.layer + m.unlocked_layers as usize >= depth.top;
            if locked && !unlocked {
                let _ = var.set_requires_grad(false);
            }
        }
        Ok(model)
    }

    fn clip(&self) -> Option<&ClipText> {
        match &self.parts {
            ObjectiveParts::Clip(c) => Some(c),
            _ => None,
        }
    }

    /// CLIP's learnable log logit scale, when the model is a CLIP model.
    pub fn logit_scale(&self) -> Option<&Tensor> {
        self.clip().map(|c| &c.logit_scale)
    }

    /// Clamps CLIP's logit scale to [0, ln 100] (after each optimizer step, as open_clip).
    pub fn clamp_logit_scale(&self) {
        if let Some(c) = self.clip() {
            clamp_logit_scale_(&c.logit_scale);
        }
    }

    /// Tokens per caption of a CLIP model.
    pub fn context_length(&self) -> Option<i64> {
        self.clip().map(|c| c.context_length)
    }

    /// Embeddings of one step's pair of inputs, `2 b` rows: the image model embeds two views
    /// (`first` then `second`, each `b × 3 × H × W`); a CLIP model embeds images (`first`) and
    /// caption tokens (`second`, `b × context_length` int64).
    pub fn embed_pair(&self, first: &Tensor, second: &Tensor, train: bool) -> Tensor {
        let device = self.device();
        match self.clip() {
            None => {
                let x = Tensor::cat(&[first, second], 0)
                    .to_device(device)
                    .to_kind(tch::Kind::Float);
                self.forward_t(&x, train)
            }
            Some(c) => {
                let img = self.forward_t(&first.to_device(device).to_kind(tch::Kind::Float), train);
                let txt = self
                    .compute
                    .run(&second.to_device(device), |t| c.tower.forward(t));
                Tensor::cat(&[img, txt], 0)
            }
        }
    }

    /// The runtime the MoE blocks share, when the model has any.
    pub fn moe(&self) -> Option<&Arc<MoeRuntime>> {
        self.moe.as_ref()
    }

    /// Takes part in every MoE exchange of one forward pass without any sample, in the
    /// order a real pass makes them (image tower, then text tower), so the ranks that do
    /// have samples find their peers. Nothing without MoE blocks.
    pub fn moe_idle_pass(&self) {
        self.idle_exchanges(false);
    }

    /// [`Self::moe_idle_pass`] for an [`Self::encode_t`] pass: the image encoder's exchanges
    /// only (evaluation embeds encoder features, without the projector or the text tower).
    pub fn moe_idle_encode(&self) {
        self.idle_exchanges(true);
    }

    fn idle_exchanges(&self, encoder_only: bool) {
        if self.moe.is_none() {
            return;
        }
        let device = self.device();
        let none = Tensor::zeros([0], (tch::Kind::Float, device));
        // Under the same compute settings as a real pass, so the exchanged kinds agree.
        let _ = self.compute.run(&none, |t| {
            if let ImageEncoder::Vit(v) = &self.encoder {
                v.transformer().moe_idle_pass(device);
            }
            if encoder_only {
                return t.shallow_clone();
            }
            if let Some(Head::Experts(m)) = &self.projector {
                let _ = m.forward_head(&Tensor::zeros(
                    [0, m.in_width()],
                    (tch::Kind::Float, device),
                ));
            }
            if let Some(TextTower::Clip(t)) = self.clip().map(|c| &c.tower) {
                t.transformer().moe_idle_pass(device);
            }
            t.shallow_clone()
        });
    }

    /// Backpropagates `root` (a scalar of the last recorded forward passes): across the
    /// MoE exchange cuts and with the MoE auxiliary losses when the model has MoE blocks,
    /// a plain backward otherwise. Every rank calls it after the same passes.
    pub fn backward(&self, root: &Tensor) -> anyhow::Result<()> {
        match &self.moe {
            Some(rt) => rt.backward(root),
            None => {
                if root.requires_grad() {
                    root.backward();
                }
                Ok(())
            }
        }
    }

    /// Switches bf16 autocast and channels-last layout on or off (see [`compute`]);
    /// converting to channels-last changes the convolution weights' layout in place.
    pub fn set_compute(&mut self, compute: Compute) {
        if compute.channels_last && !self.compute.channels_last {
            compute::convert_to_channels_last(&self.vs);
        }
        if let Some(m) = self.momentum_mut() {
            m.set_compute(compute);
        }
        self.compute = compute;
    }

    /// Sets how training steps sum this model's gradients across ranks.
    pub fn set_grad_sync(&mut self, sync: GradSync) {
        self.grad_sync = sync;
    }

    pub fn grad_sync(&self) -> GradSync {
        self.grad_sync
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// SwAV's prototypes, when the model has them.
    pub fn prototypes(&self) -> Option<&Prototypes> {
        match &self.parts {
            ObjectiveParts::Swav(p) => Some(p),
            _ => None,
        }
    }

    /// MoCo's key encoder and queue, when the model has them.
    /// The ViT image tower's sizes, when the image encoder is a ViT.
    pub fn vit_config(&self) -> Option<&VitConfig> {
        match &self.encoder {
            ImageEncoder::Vit(v) => Some(v.config()),
            ImageEncoder::ResNet(_) => None,
        }
    }

    /// The query network's variables with every LoRA adapter folded into the weight it
    /// adapts (W + (alpha / rank) B A) and the adapters left out: a model without adapters
    /// that computes what this one does (what exports write). Without adapters, the variables.
    pub fn merged_variables(&self) -> std::collections::HashMap<String, Tensor> {
        let mut vars = self.vs.variables();
        let Some(scale) = self.adapter_scale else {
            return vars;
        };
        let adapters: Vec<String> = vars
            .keys()
            .filter(|n| n.ends_with(".lora_a"))
            .cloned()
            .collect();
        tch::no_grad(|| {
            for a in adapters {
                let b = format!("{}.lora_b", a.trim_end_matches(".lora_a"));
                let base = lora::merged_weight_name(&a).expect("an adapter name");
                let update = vars[&b].matmul(&vars[&a]) * scale;
                let merged = vars[&base].detach() + update;
                vars.insert(base, merged);
                vars.remove(&a);
                vars.remove(&b);
            }
        });
        vars
    }

    /// The towers' block counts (where each variable sits: [`depth::Depths::of`]).
    pub fn depths(&self) -> &Depths {
        &self.depths
    }

    /// The job's optimizer over [`Self::named_parameters`], each parameter's learning rate
    /// scaled by `optim.layer_decay`^(blocks above it + 1 − its layer) when that is below 1
    /// (BEiT's and timm's layer decay: the head at the full rate, each block below at `decay`
    /// times the one above, the embeddings lowest).
    pub fn optimizer(
        &self,
        cfg: &contrail_common::config::OptimConfig,
    ) -> Box<dyn crate::optim::Optimizer> {
        let params = self.named_parameters();
        if cfg.layer_decay >= 1.0 {
            return crate::optim::build(cfg, params);
        }
        let scales: Vec<f64> = params
            .iter()
            .map(|(n, _)| self.depths.lr_scale(n, cfg.layer_decay))
            .collect();
        crate::optim::build_scaled(cfg, params, Some(&scales))
    }

    /// [`Self::optimizer`] for a job: with `train.precision = "fp16"` its steps first divide
    /// the gradients by the loss scale and skip a step whose gradients overflowed
    /// ([`crate::optim::LossScaled`]).
    pub fn job_optimizer(
        &self,
        cfg: &contrail_common::config::JobConfig,
    ) -> Box<dyn crate::optim::Optimizer> {
        let opt = self.optimizer(&cfg.optim);
        if cfg.train.precision != contrail_common::config::Precision::Fp16 {
            return opt;
        }
        Box::new(crate::optim::LossScaled::new(opt, self.named_parameters()))
    }

    /// A CLIP model's text tower sizes and token conventions (open_clip's tower).
    pub fn text_config(&self) -> Option<&TextConfig> {
        match &self.clip()?.tower {
            TextTower::Clip(t) => Some(t.config()),
            TextTower::Bert(_) => None,
        }
    }

    /// A CLIP model's BERT text tower sizes, when it has one.
    pub fn bert_config(&self) -> Option<&BertConfig> {
        match &self.clip()?.tower {
            TextTower::Bert(b) => Some(b.config()),
            TextTower::Clip(_) => None,
        }
    }

    pub fn momentum(&self) -> Option<&MomentumBranch> {
        match &self.parts {
            ObjectiveParts::Moco(m) => Some(m),
            _ => None,
        }
    }

    fn momentum_mut(&mut self) -> Option<&mut MomentumBranch> {
        match &mut self.parts {
            ObjectiveParts::Moco(m) => Some(m),
            _ => None,
        }
    }

    /// Image embeddings (N, `projector_out`) for images (N, 3, H, W); not normalised.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.compute.run(xs, |xs| {
            let h = self.encoder.forward_t(xs, train);
            match &self.projector {
                Some(p) => p.forward_t(&h, train),
                None => h,
            }
        })
    }

    /// Encoder features before the projector (what downstream evaluation uses).
    pub fn encode_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.compute.run(xs, |xs| self.encoder.forward_t(xs, train))
    }

    /// Encoder features (float32, on the model's device, without autograd) of evaluation
    /// views given as flat `n × 3 × size × size` pixels: what evaluation and export embed.
    pub fn encode_views(&self, pixels: &[f32], size: i64) -> Tensor {
        let x = self.views_tensor(pixels, size);
        tch::no_grad(|| self.encode_t(&x, false)).to_kind(tch::Kind::Float)
    }

    /// Flat `n × 3 × size × size` pixels as an image batch on the model's device.
    fn views_tensor(&self, pixels: &[f32], size: i64) -> Tensor {
        let n = pixels.len() as i64 / (3 * size * size);
        Tensor::from_slice(pixels)
            .view([n, 3, size, size])
            .to_device(self.device())
    }

    /// The image embeddings a downstream user takes (float32, without autograd) of evaluation
    /// views given as flat `n × 3 × size × size` pixels: a CLIP model's joint image–text space
    /// (what zero-shot and retrieval compare with captions), the encoder's features otherwise.
    pub fn export_images(&self, pixels: &[f32], size: i64) -> Tensor {
        if self.clip().is_none() {
            return self.encode_views(pixels, size);
        }
        let x = self.views_tensor(pixels, size);
        tch::no_grad(|| self.forward_t(&x, false)).to_kind(tch::Kind::Float)
    }

    /// A CLIP model's caption embeddings (float32, without autograd) of `n × context_length`
    /// token ids; None for a model without a text tower.
    pub fn export_texts(&self, tokens: &Tensor) -> Option<Tensor> {
        let c = self.clip()?;
        let ids = tokens.to_device(self.device());
        Some(
            tch::no_grad(|| self.compute.run(&ids, |t| c.tower.forward(t)))
                .to_kind(tch::Kind::Float),
        )
    }

    pub fn embedding_dim(&self) -> i64 {
        self.embedding_dim
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access, e.g. for `VarStore::copy` when loading a checkpoint.
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Trainable parameters sorted by name (the fixed order of buckets and optimizer state).
    /// The tensors share storage with the model.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let trainable: Vec<Tensor> = self.vs.trainable_variables();
        // A locked tower's variables (`model.lock_image`/`lock_text`) need no gradient.
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .filter(|(_, t)| trainable.iter().any(|p| p.data_ptr() == t.data_ptr()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Every variable (parameters, norm running statistics, and the momentum branch's
    /// variables under [`MOMENTUM_PREFIX`]) sorted by name.
    pub fn named_variables(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.all_variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    fn all_variables(&self) -> std::collections::HashMap<String, Tensor> {
        let mut vars = self.vs.variables();
        if let Some(m) = self.momentum() {
            vars.extend(
                m.variables()
                    .into_iter()
                    .map(|(n, t)| (format!("{MOMENTUM_PREFIX}{n}"), t)),
            );
        }
        vars
    }

    /// Initial weights from another model (torchvision's `resnet50`, an open_clip
    /// checkpoint, ...): see [`init_weights`] for how names are matched and when a file is
    /// refused (`partial`: a chosen tower may have gaps). On error nothing is changed. A MoCo
    /// key encoder starts equal to the loaded query network. An image-only ViT whose `proj`
    /// the file cannot fill (timm's ViTs and open_clip's image towers have none of its shape)
    /// gets the identity there, so its features are the pretrained tower's.
    pub fn load_initial(
        &mut self,
        named: &[(String, Tensor)],
        partial: bool,
    ) -> anyhow::Result<InitPlan> {
        let timm = init_weights::translate_timm(named);
        let named = timm.as_deref().unwrap_or(named);
        let vars = self.vs.variables();
        let model: std::collections::HashMap<String, (Vec<i64>, Tower)> = vars
            .iter()
            .map(|(n, t)| (n.clone(), (t.size(), self.tower_of(n))))
            .collect();
        let file: Vec<(String, Vec<i64>)> =
            named.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        let mut plan = InitPlan::new(&file, &model);
        plan.from_timm = timm.is_some();
        if let Some(why) = plan.refusal(partial) {
            bail!("{why}");
        }
        // `proj` is a head only in an image-only ViT.
        plan.proj_identity = self.tower_of("proj") == Tower::Head
            && plan.towers.contains(&Tower::Image)
            && !plan.pairs.iter().any(|(var, _)| var == "proj");
        tch::no_grad(|| {
            for (var, i) in &plan.pairs {
                let src = &named[*i].1;
                vars[var]
                    .shallow_clone()
                    .copy_(&src.to_device(vars[var].device()).to_kind(vars[var].kind()));
            }
            if plan.proj_identity {
                let proj = &vars["proj"];
                let (d, k) = (proj.size()[0], proj.kind());
                proj.shallow_clone()
                    .copy_(&Tensor::eye(d, (k, proj.device())));
            }
        });
        if let Some(m) = self.momentum() {
            let mut query: Vec<(String, Tensor)> = vars.into_iter().collect();
            query.sort_by(|a, b| a.0.cmp(&b.0));
            m.copy_from_query(&query)?;
        }
        Ok(plan)
    }

    /// Which tower a variable of the query network belongs to (a LoRA adapter is a head: a
    /// pretrained file never has one).
    fn tower_of(&self, name: &str) -> Tower {
        if lora::is_adapter(name) {
            return Tower::Head;
        }
        if let ObjectiveParts::Clip(c) = &self.parts {
            // A BERT's projection is ours (Hugging Face's BERT has none), open_clip's is the
            // text tower's own.
            let bert_head = matches!(c.tower, TextTower::Bert(_)) && name == "text_projection";
            if name == "logit_scale" || name.starts_with("visual.projector.") || bert_head {
                Tower::Head
            } else if name.starts_with("visual.") {
                Tower::Image
            } else {
                Tower::Text
            }
        } else if name.starts_with("projector.")
            || name.starts_with("prototypes.")
            // An image-only ViT's own projection (width x width) is ours, not open_clip's.
            || (matches!(self.encoder, ImageEncoder::Vit(_)) && name == "proj")
        {
            Tower::Head
        } else {
            Tower::Image
        }
    }

    /// Loads variables by name (e.g. from a checkpoint). Every model variable must be present
    /// with the same shape, and no unknown names are accepted; on error nothing is changed.
    pub fn load_named(&mut self, named: &[(String, Tensor)]) -> anyhow::Result<()> {
        let vars = self.all_variables();
        let mut given: std::collections::HashMap<&str, &Tensor> =
            named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut pairs = Vec::with_capacity(vars.len());
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let var = &vars[name];
            let src = given.remove(name.as_str()).with_context(|| {
                format!("model variable \"{name}\" is missing from the loaded tensors")
            })?;
            if src.size() != var.size() {
                bail!(
                    "model variable \"{name}\" has shape {:?}, the loaded tensor has {:?}",
                    var.size(),
                    src.size()
                );
            }
            pairs.push((var, src));
        }
        if let Some(extra) = given.keys().next() {
            bail!("loaded tensor \"{extra}\" is not a variable of this model (different model config?)");
        }
        tch::no_grad(|| {
            for (var, src) in pairs {
                var.shallow_clone()
                    .copy_(&src.to_device(var.device()).to_kind(var.kind()));
            }
        });
        Ok(())
    }

    /// Copies every variable from `other` (same configuration), e.g. to start ranks identical.
    pub fn copy_from(&mut self, other: &ContrastiveModel) -> anyhow::Result<()> {
        self.vs.copy(&other.vs).context(
            "copying model variables: the two models were built from different model configs",
        )?;
        match (self.momentum_mut(), other.momentum()) {
            (Some(mine), Some(theirs)) => mine
                .var_store_mut()
                .copy(theirs.vs_ref())
                .context("copying momentum-branch variables: different model or queue configs"),
            (None, None) => Ok(()),
            _ => bail!("copying model variables: only one of the models has a momentum branch"),
        }
    }
}

/// The MoE runtime of a job with `[moe]` on: over `experts`' collective and placement, or a
/// one-rank group holding every expert.
fn moe_runtime(
    cfg: &JobConfig,
    experts: Option<(Arc<dyn Collective>, Option<ExpertPlacement>)>,
) -> anyhow::Result<Option<Arc<MoeRuntime>>> {
    if !cfg.moe.enabled() {
        return Ok(None);
    }
    let settings = MoeSettings::from_config(&cfg.moe);
    let blocks = cfg.moe.block_count();
    let (coll, placement) = match experts {
        Some(e) => e,
        None => {
            let one: Arc<dyn Collective> = Arc::new(LocalGroup::new(1).remove(0));
            (one, None)
        }
    };
    let rt = match placement {
        Some(p) if !p.blocks.is_empty() => MoeRuntime::new(coll, settings, p)?,
        _ => MoeRuntime::spread(coll, settings, blocks)?,
    };
    Ok(Some(rt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use contrail_common::config::{NormKind, StemKind};

    /// A SimCLR job with this model, built on the CPU.
    fn build(model: &ModelConfig) -> anyhow::Result<ContrastiveModel> {
        let job = JobConfig {
            model: model.clone(),
            ..Default::default()
        };
        ContrastiveModel::build(&job, Device::Cpu, BuildOptions::default())
    }

    fn cfg(norm: NormKind, stem: StemKind) -> ModelConfig {
        ModelConfig {
            layers: vec![2, 1],
            width: 8,
            norm,
            projector_hidden: 64,
            projector_out: 4,
            stem,
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_torchvision() {
        let m = build(&cfg(NormKind::Batch, StemKind::Cifar)).unwrap();
        let vars = m.var_store().variables();
        for name in [
            "conv1.weight",
            "bn1.weight",
            "bn1.running_mean",
            "layer1.0.conv1.weight",
            "layer1.1.bn2.bias",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var",
            "projector.0.weight",
            "projector.1.weight",
            "projector.3.bias",
        ] {
            assert!(
                vars.contains_key(name),
                "missing {name}; have {:?}",
                vars.keys()
            );
        }
        // Stage 1 keeps width and stride, so it has no downsample branch.
        assert!(!vars.contains_key("layer1.0.downsample.0.weight"));
        assert!(!vars.contains_key("projector.0.bias"));
        assert_eq!(vars["layer2.0.conv1.weight"].size(), vec![16, 8, 3, 3]);
        assert_eq!(vars["projector.0.weight"].size(), vec![64, 16]);
        // Running statistics are state, not parameters.
        let params = m.named_parameters();
        assert!(params.iter().all(|(n, _)| !n.contains("running")));
        assert!(
            params.windows(2).all(|w| w[0].0 < w[1].0),
            "parameters not sorted"
        );
    }

    #[test]
    fn output_shapes_for_both_stems_and_norms() {
        for (norm, stem) in [
            (NormKind::Batch, StemKind::Cifar),
            (NormKind::Group, StemKind::Imagenet),
        ] {
            let m = build(&cfg(norm, stem)).unwrap();
            let x = Tensor::randn([3, 3, 16, 16], (tch::Kind::Float, Device::Cpu));
            assert_eq!(m.forward_t(&x, true).size(), vec![3, 4]);
            assert_eq!(m.encode_t(&x, false).size(), vec![3, 16]);
        }
    }

    #[test]
    fn load_named_round_trip_and_errors() {
        let c = cfg(NormKind::Batch, StemKind::Cifar);
        tch::manual_seed(1);
        let a = build(&c).unwrap();
        tch::manual_seed(2);
        let mut b = build(&c).unwrap();
        let saved = a.named_variables();
        let conv1 = |m: &ContrastiveModel| m.var_store().variables()["conv1.weight"].copy();
        assert!(
            !conv1(&a).equal(&conv1(&b)),
            "seeds should give different weights"
        );
        b.load_named(&saved).unwrap();
        for ((n, x), (_, y)) in saved.iter().zip(b.named_variables()) {
            assert!(x.equal(&y), "{n} not loaded");
        }
        let missing: Vec<_> = saved
            .iter()
            .skip(1)
            .map(|(n, t)| (n.clone(), t.copy()))
            .collect();
        let e = b.load_named(&missing).unwrap_err().to_string();
        assert!(e.contains(&saved[0].0) && e.contains("missing"), "{e}");
        let mut wrong: Vec<_> = saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        wrong[0].1 = Tensor::zeros([1], (tch::Kind::Float, Device::Cpu));
        let e = b.load_named(&wrong).unwrap_err().to_string();
        assert!(e.contains(&saved[0].0) && e.contains("shape"), "{e}");
    }

    /// Without the projector the embedding is the pooled encoder output.
    #[test]
    fn projector_can_be_left_out() {
        let mut c = cfg(NormKind::Batch, StemKind::Cifar);
        c.projector = false;
        let m = build(&c).unwrap();
        let x = Tensor::randn([3, 3, 16, 16], (tch::Kind::Float, Device::Cpu));
        assert_eq!(m.embedding_dim(), 16);
        assert_eq!(m.forward_t(&x, true).size(), vec![3, 16]);
        assert!(m
            .named_parameters()
            .iter()
            .all(|(n, _)| !n.starts_with("projector")));
    }

    /// Initial weights from another model: the encoder of a torchvision-style file (saved
    /// under DDP, with a classifier) loads whole; gaps and wrong shapes are refused.
    #[test]
    fn load_initial_takes_a_whole_tower_or_refuses() {
        let c = cfg(NormKind::Batch, StemKind::Cifar);
        tch::manual_seed(1);
        let a = build(&c).unwrap();
        tch::manual_seed(2);
        let mut b = build(&c).unwrap();
        let mut file: Vec<(String, Tensor)> = a
            .named_variables()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("projector."))
            .map(|(n, t)| (format!("module.{n}"), t.copy()))
            .collect();
        file.push((
            "module.fc.weight".into(),
            Tensor::zeros([10, 16], (tch::Kind::Float, Device::Cpu)),
        ));
        let projector_before = b.var_store().variables()["projector.0.weight"].copy();

        // A gap in the tower: refused, nothing changed.
        let gap: Vec<(String, Tensor)> = file
            .iter()
            .filter(|(n, _)| n != "module.conv1.weight")
            .map(|(n, t)| (n.clone(), t.copy()))
            .collect();
        let e = b.load_initial(&gap, false).unwrap_err().to_string();
        assert!(
            e.contains("lacks 1 of their variables: conv1.weight"),
            "{e}"
        );
        let unchanged = "layer1.0.conv1.weight";
        assert!(!b.var_store().variables()[unchanged].equal(&a.var_store().variables()[unchanged]));

        let plan = b.load_initial(&file, false).unwrap();
        assert_eq!(plan.pairs.len(), file.len() - 1);
        assert_eq!(plan.towers, [Tower::Image]);
        assert_eq!(plan.unexpected, ["module.fc.weight"]);
        assert!(plan.heads_kept.iter().all(|n| n.starts_with("projector.")));
        let vars = b.var_store().variables();
        assert!(vars["conv1.weight"].equal(&a.var_store().variables()["conv1.weight"]));
        assert!(vars["projector.0.weight"].equal(&projector_before));

        // A shape mismatch is an error even for a partial load.
        let mut wrong: Vec<(String, Tensor)> =
            file.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        wrong[0].1 = Tensor::zeros([1], (tch::Kind::Float, Device::Cpu));
        let e = b.load_initial(&wrong, true).unwrap_err().to_string();
        assert!(e.contains("another shape"), "{e}");
    }

    /// LiT (`model.lock_image`): the image tower has no parameters to train, gets no gradient
    /// and is bit-identical after an optimizer step that changes the text tower.
    #[test]
    fn a_locked_tower_is_not_trained() {
        let mut job = two_block_clip();
        job.model.lock_image = true;
        let model = build_clip(&job);
        let params = model.named_parameters();
        assert!(params.iter().all(|(n, _)| !n.starts_with("visual.")));
        assert!(params.iter().any(|(n, _)| n == "text_projection"));
        assert!(params.iter().any(|(n, _)| n == "logit_scale"));
        let snapshot = |prefix: &str| -> Vec<(String, Tensor)> {
            let mut v: Vec<(String, Tensor)> = model
                .named_variables()
                .into_iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(n, t)| (n, t.copy()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let (image_before, text_before) = (snapshot("visual."), snapshot("transformer."));
        let mut opt = crate::optim::build(&job.optim, params);
        let images = Tensor::randn([2, 3, 16, 16], (tch::Kind::Float, Device::Cpu));
        let tokens =
            Tensor::from_slice(&[1i64, 5, 9, 2, 0, 0, 0, 0, 1, 7, 2, 0, 0, 0, 0, 0]).view([2, 8]);
        let loss = model
            .embed_pair(&images, &tokens, true)
            .pow_tensor_scalar(2)
            .sum(tch::Kind::Float);
        loss.backward();
        opt.step(0.1);
        for ((n, a), (_, b)) in image_before.iter().zip(snapshot("visual.")) {
            assert!(a.equal(&b), "{n} changed");
        }
        assert!(text_before
            .iter()
            .zip(snapshot("transformer."))
            .any(|((_, a), (_, b))| !a.equal(&b)));
    }

    /// MoCo: the key encoder starts as the loaded query encoder, not the random one.
    /// A small CLIP job with a 2-block ViT and a 1-block text tower.
    fn two_block_clip() -> JobConfig {
        use contrail_common::config::{TextSettings, VitSettings, VitStyle};
        let mut job = JobConfig::default();
        job.objective.kind = ObjectiveKind::Clip;
        job.data.image_size = 16;
        job.model.encoder = EncoderKind::Vit;
        job.model.vit = VitSettings {
            patch_size: 8,
            width: 16,
            layers: 2,
            heads: 2,
            mlp_ratio: 2.0,
            style: VitStyle::OpenClip,
        };
        job.model.text = TextSettings {
            context_length: 8,
            width: 16,
            layers: 1,
            heads: 2,
            ..Default::default()
        };
        job.model.projector_out = 8;
        job
    }

    fn build_clip(job: &JobConfig) -> ContrastiveModel {
        let tokenizer = crate::tokenize::ByteTokenizer::new();
        let opts = BuildOptions {
            tokenizer: Some(&tokenizer),
            ..Default::default()
        };
        tch::manual_seed(0);
        ContrastiveModel::build(job, Device::Cpu, opts).unwrap()
    }

    /// `model.unlocked_layers`: a locked tower's last block and what is above it train, the
    /// rest of it does not; more than the tower's blocks, or no locked tower, is refused.
    #[test]
    fn unlocked_layers_train_the_top_of_a_locked_tower() {
        let mut job = two_block_clip();
        job.model.lock_image = true;
        job.model.unlocked_layers = 1;
        let model = build_clip(&job);
        let names: Vec<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
        assert!(
            has("visual.transformer.resblocks.1.") && has("visual.ln_post.") && has("visual.proj")
        );
        assert!(
            !has("visual.transformer.resblocks.0.")
                && !has("visual.conv1")
                && !has("visual.ln_pre")
        );
        assert!(
            has("transformer.resblocks.0.") && has("token_embedding"),
            "text trains"
        );
        job.model.unlocked_layers = 3;
        let e = job.validate().unwrap_err().to_string();
        assert!(e.contains("more than the locked tower's 2 blocks"), "{e}");
        job.model.lock_image = false;
        job.model.unlocked_layers = 1;
        let e = job.validate().unwrap_err().to_string();
        assert!(e.contains("set model.lock_image or lock_text"), "{e}");
    }

    /// Images and captions through both towers of a CLIP model.
    fn clip_outputs(model: &ContrastiveModel) -> (Tensor, Tensor) {
        // Fixed inputs without the global RNG, which tests on other threads draw from.
        let n = 2 * 3 * 16 * 16;
        let pixels: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let tokens = Tensor::from_slice(&[
            257i64, 66, 67, 68, 258, 0, 0, 0, 257, 70, 71, 258, 0, 0, 0, 0,
        ])
        .view([2, 8]);
        (
            model.export_images(&pixels, 16),
            model.export_texts(&tokens).unwrap(),
        )
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The variables of `model` that are not adapters, copied.
    fn base_variables(model: &ContrastiveModel) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = model
            .var_store()
            .variables()
            .into_iter()
            .filter(|(n, _)| !lora::is_adapter(n))
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// `[model.adapters]`: an adapted model computes what its base weights do until it trains
    /// (B = 0); only the adapters and the heads train, and a step leaves every base weight
    /// bit-identical while the adapters move.
    #[test]
    fn adapters_start_as_the_base_model_and_only_they_train() {
        use contrail_common::config::TextKind;
        for text in [TextKind::Clip, TextKind::Bert] {
            let mut job = two_block_clip();
            job.model.text.kind = text;
            job.model.adapters.rank = 2;
            job.validate().unwrap();
            let adapted = build_clip(&job);
            let before = base_variables(&adapted);
            job.model.adapters.rank = 0;
            let mut plain = build_clip(&job);
            plain.load_named(&before).unwrap();
            let (a, b) = (clip_outputs(&plain), clip_outputs(&adapted));
            assert!(max_diff(&a.0, &b.0) < 1e-6 && max_diff(&a.1, &b.1) < 1e-6);
            let trained: Vec<String> = adapted
                .named_parameters()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            // Heads train too: the logit scale, and a BERT's projection (ours, not BERT's).
            let head =
                |n: &str| n == "logit_scale" || (text == TextKind::Bert && n == "text_projection");
            assert!(
                trained.iter().all(|n| lora::is_adapter(n) || head(n)),
                "{trained:?}"
            );
            let adapters = adapted
                .var_store()
                .variables()
                .keys()
                .filter(|n| lora::is_adapter(n))
                .count();
            // 2 image blocks × 4 projections + 1 text block × 4 (open_clip) or 6 (BERT), A and B.
            let text_projections = if text == TextKind::Bert { 6 } else { 4 };
            assert_eq!(adapters, 2 * (2 * 4 + text_projections), "{text:?}");

            let mut sgd = job.optim.clone();
            sgd.kind = contrail_common::config::OptimKind::Sgd;
            let mut opt = adapted.optimizer(&sgd);
            let pixels = Tensor::ones([2, 3, 16, 16], tch::kind::FLOAT_CPU);
            let tokens = Tensor::from_slice(&[257i64, 66, 258, 0, 0, 0, 0, 0]).view([1, 8]);
            let img = adapted.forward_t(&pixels, true);
            let txt = adapted.clip().unwrap().tower.forward(&tokens);
            (img.sum(tch::Kind::Float) + txt.sum(tch::Kind::Float)).backward();
            opt.step(0.1);
            let after = base_variables(&adapted);
            for ((name, t), (_, u)) in before.iter().zip(&after) {
                let moved = max_diff(t, u);
                assert!(moved == 0.0 || head(name), "{text:?}: {name} moved {moved}");
            }
            let trained_b = adapted
                .var_store()
                .variables()
                .into_iter()
                .filter(|(n, _)| n.ends_with(".lora_b"))
                .any(|(_, t)| t.abs().max().double_value(&[]) > 0.0);
            assert!(trained_b, "{text:?}: no adapter trained");
        }
    }

    /// Merged into the base weights (what exports write), the adapters' model is a model
    /// without adapters that computes the same; the base weights alone compute something else.
    #[test]
    fn merged_adapters_compute_what_the_adapted_model_does() {
        use contrail_common::config::TextKind;
        for text in [TextKind::Clip, TextKind::Bert] {
            let mut job = two_block_clip();
            job.model.text.kind = text;
            job.model.adapters.rank = 2;
            job.model.adapters.alpha = 4.0;
            let adapted = build_clip(&job);
            for (name, t) in adapted.var_store().variables() {
                if name.ends_with(".lora_b") {
                    tch::no_grad(|| t.shallow_clone().copy_(&(t.randn_like() * 0.1)));
                }
            }
            let merged: Vec<(String, Tensor)> = adapted.merged_variables().into_iter().collect();
            assert!(merged.iter().all(|(n, _)| !lora::is_adapter(n)));
            job.model.adapters.rank = 0;
            let mut plain = build_clip(&job);
            plain.load_named(&merged).unwrap();
            let (a, b) = (clip_outputs(&adapted), clip_outputs(&plain));
            let (d_img, d_txt) = (max_diff(&a.0, &b.0), max_diff(&a.1, &b.1));
            assert!(d_img < 1e-5 && d_txt < 1e-5, "{text:?}: {d_img} {d_txt}");
            plain.load_named(&base_variables(&adapted)).unwrap();
            let unmerged = clip_outputs(&plain);
            assert!(
                max_diff(&unmerged.1, &a.1) > 1e-3,
                "{text:?}: the adapters changed nothing"
            );
        }
    }

    /// `optim.layer_decay` 0.5 on a 2-block ViT: with plain SGD and every gradient 1 a step of
    /// rate 1 moves the head by 1, the last block by 0.5, the first by 0.25 and the patch
    /// embedding by 0.125; the 1-block text tower counts its own depth.
    #[test]
    fn layer_decay_scales_each_block_below_the_head() {
        let mut job = two_block_clip();
        job.optim.kind = contrail_common::config::OptimKind::Sgd;
        job.optim.momentum = 0.0;
        job.optim.weight_decay = 0.0;
        job.optim.layer_decay = 0.5;
        job.validate().unwrap();
        let model = build_clip(&job);
        let mut opt = model.optimizer(&job.optim);
        let before: std::collections::HashMap<String, Tensor> = model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        for (_, p) in model.named_parameters() {
            p.sum(tch::Kind::Float).backward(); // every gradient element 1
        }
        opt.step(1.0);
        let moved = |name: &str| -> f64 {
            let now = &model.var_store().variables()[name];
            (&before[name] - now)
                .mean(tch::Kind::Float)
                .double_value(&[])
        };
        for (name, want) in [
            ("visual.proj", 1.0),
            ("visual.transformer.resblocks.1.attn.in_proj_weight", 0.5),
            ("visual.transformer.resblocks.0.ln_1.weight", 0.25),
            ("visual.conv1.weight", 0.125),
            ("text_projection", 1.0),
            ("transformer.resblocks.0.mlp.c_fc.weight", 0.5),
            ("token_embedding.weight", 0.25),
            ("logit_scale", 1.0),
        ] {
            assert!(
                (moved(name) - want).abs() < 1e-6,
                "{name} moved {}",
                moved(name)
            );
        }
    }

    #[test]
    fn load_initial_copies_into_the_moco_key_encoder() {
        let mut job = JobConfig {
            model: cfg(NormKind::Batch, StemKind::Cifar),
            ..Default::default()
        };
        job.objective.kind = ObjectiveKind::Moco;
        job.objective.moco.queue_size = 8;
        tch::manual_seed(1);
        let a = ContrastiveModel::build(&job, Device::Cpu, BuildOptions::default()).unwrap();
        tch::manual_seed(2);
        let mut b = ContrastiveModel::build(&job, Device::Cpu, BuildOptions::default()).unwrap();
        let file: Vec<(String, Tensor)> = a
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        b.load_initial(&file, false).unwrap();
        let named: std::collections::HashMap<String, Tensor> =
            b.named_variables().into_iter().collect();
        let key = &named[&format!("{MOMENTUM_PREFIX}conv1.weight")];
        assert!(key.equal(&a.var_store().variables()["conv1.weight"]));
    }

    #[test]
    fn group_norm_needs_multiples_of_eight() {
        let mut c = cfg(NormKind::Group, StemKind::Cifar);
        c.projector_hidden = 72;
        build(&c).unwrap();
        for bad in [12, 16] {
            c.projector_hidden = bad;
            let e = build(&c).unwrap_err().to_string();
            assert!(e.contains(&format!("projector_hidden ({bad})")), "{e}");
        }
    }
}
