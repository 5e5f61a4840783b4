//! `[model]`, `[model.vit]` and `[model.text]`: the image encoder (ResNet or ViT), the MLP
//! projector, and CLIP's text tower.

use super::choice::{choice, serde_via_str};
use super::objective::ObjectiveKind;
use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

choice! {
    /// The image encoder.
    pub enum EncoderKind default Resnet {
        /// torchvision's ResNet layout (the `[model]` keys).
        Resnet = "resnet",
        /// A Vision Transformer (`[model.vit]`).
        Vit = "vit",
    }
}

choice! {
    /// The nonlinearity in the MLP of every transformer block (ViT and text towers).
    pub enum Activation default Gelu {
        /// GELU: open_clip's and timm's models.
        Gelu = "gelu",
        /// x * sigmoid(1.702 x): OpenAI's CLIP weights (open_clip's `-quickgelu` models).
        QuickGelu = "quick_gelu",
    }
}

choice! {
    /// Which library's ViT the `[model.vit]` tower is built as (the names stay open_clip's;
    /// timm's are translated when weights load).
    pub enum VitStyle default OpenClip {
        /// open_clip's `VisionTransformer`: patch convolution without bias, `ln_pre`,
        /// LayerNorm epsilon 1e-5.
        OpenClip = "open_clip",
        /// timm's `VisionTransformer` (e.g. `vit_small_patch16_224`): patch convolution with
        /// bias, no `ln_pre`, LayerNorm epsilon 1e-6.
        Timm = "timm",
    }
}

choice! {
    /// How CLIP's text tower attends and pools.
    pub enum TextMode default Causal {
        /// CLIP: causal attention, the embedding taken at the end token.
        Causal = "causal",
        /// Full attention, the embedding the mean over the caption's tokens.
        Bidirectional = "bidirectional",
    }
}

choice! {
    /// Which architecture CLIP's text tower has.
    pub enum TextKind default Clip {
        /// open_clip's text transformer (pre-LayerNorm blocks; `mode` picks the attention).
        Clip = "clip",
        /// Hugging Face BERT (post-LayerNorm blocks, bidirectional, pad keys masked; Chinese-CLIP's
        /// text tower), pooled by `pooling`.
        Bert = "bert",
        /// Hugging Face RoBERTa / XLM-R: BERT's blocks with positions counted from the pad id
        /// + 1 over the non-pad tokens, one token type and LayerNorm ε 1e-5.
        Roberta = "roberta",
    }
}

impl TextKind {
    /// Whether the tower is a BERT-family encoder (`model::bert`).
    pub fn is_bert_family(self) -> bool {
        matches!(self, TextKind::Bert | TextKind::Roberta)
    }
}

choice! {
    /// How a BERT text tower turns its hidden states into one vector.
    pub enum TextPooling default Cls {
        /// The first token's (`[CLS]`) hidden state, as Chinese-CLIP.
        Cls = "cls",
        /// The mean over the caption's non-pad tokens.
        Mean = "mean",
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// BatchNorm with per-worker statistics (what most SimCLR code does without SyncBN).
    Batch,
    /// GroupNorm: independent of the batch, so results do not depend on how it is split.
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Image encoder: resnet (the keys below) or vit (`[model.vit]`).
    pub encoder: EncoderKind,
    /// The Vision Transformer, when `encoder = "vit"` (open_clip's layout and names).
    pub vit: VitSettings,
    /// The text tower of CLIP (`objective.kind = "clip"`).
    pub text: TextSettings,
    /// LoRA adapters on the transformer blocks (`[model.adapters]`; off unless `rank` > 0).
    pub adapters: AdapterSettings,
    /// Residual blocks per stage (ResNet-18 is [2, 2, 2, 2] basic, ResNet-50 [3, 4, 6, 3]
    /// bottleneck).
    pub layers: Vec<u32>,
    /// "basic" (two 3×3 convolutions, ResNet-18/34) or "bottleneck" (1×1, 3×3, 1×1 with 4×
    /// output channels, ResNet-50 and up).
    pub block: BlockKind,
    /// Channels of the first stage; each later stage doubles it.
    pub width: u32,
    pub norm: NormKind,
    /// Put the MLP projector on the encoder (the embedding is then `projector_out` wide);
    /// without it the embedding is the pooled encoder output. MoCo and a CLIP ResNet need it.
    pub projector: bool,
    /// Hidden width of the MLP projector.
    pub projector_hidden: u32,
    /// Output (embedding) width of the projector.
    pub projector_out: u32,
    /// Initial weights: URL of a safetensors file (any storage) whose tensors are loaded by
    /// name before training, e.g. torchvision's ResNet-50 or an open_clip checkpoint; "" for
    /// a random start. Ignored when the job resumes from its own checkpoint.
    pub init_weights: String,
    /// Start from `init_weights` even when a tower it provides variables of lacks some (they
    /// keep their initialisation; the lists are printed). Off: such a file is refused.
    pub init_partial: bool,
    /// The transformer blocks' MLP nonlinearity: "gelu" or "quick_gelu" (weights trained by
    /// OpenAI's CLIP compute something else under GELU).
    pub activation: Activation,
    /// CLIP: the image tower is not trained (LiT: a pretrained image tower, locked, teaches a
    /// text tower). Its variables get no gradient, no optimizer state and no all-reduce.
    pub lock_image: bool,
    /// CLIP: the text tower is not trained.
    pub lock_text: bool,
    /// With `lock_image` or `lock_text`: the locked tower's last this many blocks (and its
    /// final norm and projection above them) train after all; 0 locks the whole tower.
    pub unlocked_layers: u32,
    /// First layers of the encoder: "cifar" (3×3 stride-1 conv, no max-pool; for images of
    /// 32 px and below) or "imagenet" (7×7 stride-2 conv + max-pool, as in torchvision).
    pub stem: StemKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VitSettings {
    /// Side of the square patches (16 or 32 for ViT-B/16, ViT-B/32); must divide
    /// `data.image_size`.
    pub patch_size: u32,
    pub width: u32,
    pub layers: u32,
    pub heads: u32,
    /// Hidden width of each MLP block ÷ `width`.
    pub mlp_ratio: f64,
    /// "open_clip" or "timm": whose layout the tower has (for `model.init_weights`).
    pub style: VitStyle,
}

impl Default for VitSettings {
    /// ViT-B/16.
    fn default() -> Self {
        Self {
            patch_size: 16,
            width: 768,
            layers: 12,
            heads: 12,
            mlp_ratio: 4.0,
            style: VitStyle::OpenClip,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TextSettings {
    /// Tokens per caption (start and end tokens included); longer captions are cut.
    pub context_length: u32,
    pub width: u32,
    pub layers: u32,
    pub heads: u32,
    pub mlp_ratio: f64,
    /// Causal attention pooled at the end token, or bidirectional with mean pooling.
    pub mode: TextMode,
    /// "byte" (built-in byte-level tokenizer, no download) or the URL of a Hugging Face
    /// `tokenizer.json` (any storage URL, e.g. a multilingual tokenizer).
    pub tokenizer: TokenizerSource,
    /// "clip" (open_clip's text transformer) or "bert" (Hugging Face BERT names and blocks).
    pub kind: TextKind,
    /// BERT: "cls" or "mean" pooling.
    pub pooling: TextPooling,
    /// BERT: rows of the position table (`max_position_embeddings`), at least
    /// `context_length`; 512 as BERT-base and Chinese-CLIP's RoBERTa.
    pub max_positions: u32,
}

impl Default for TextSettings {
    /// CLIP's 12-layer, 512-wide text transformer.
    fn default() -> Self {
        Self {
            context_length: 77,
            width: 512,
            layers: 12,
            heads: 8,
            mlp_ratio: 4.0,
            mode: TextMode::Causal,
            tokenizer: TokenizerSource::Byte,
            kind: TextKind::Clip,
            pooling: TextPooling::Cls,
            max_positions: 512,
        }
    }
}

/// `[model.adapters]`: LoRA (Hu et al. 2021, as PEFT's `LoraConfig`) on the projections of
/// every transformer block of the towers: each adapted weight W (out × in) computes
/// W x + (alpha / rank) B A x with A (rank × in, PyTorch's default Linear init) and B
/// (out × rank, zeros), so training starts from the base model; the towers' own weights are
/// frozen and only the adapters (and the heads) train.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSettings {
    /// Rank of each adapter; 0 = no adapters.
    pub rank: u32,
    /// Scale numerator: the update is (alpha / rank) B A.
    pub alpha: f64,
    /// Which projections get one: "attn" (the fused q/k/v or BERT's query, key, value, and the
    /// attention's output projection) and "mlp" (both MLP layers).
    pub targets: Vec<String>,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 16.0,
            targets: vec!["attn".into(), "mlp".into()],
        }
    }
}

impl AdapterSettings {
    pub fn enabled(&self) -> bool {
        self.rank > 0
    }

    pub fn targets_attention(&self) -> bool {
        self.targets.iter().any(|t| t == "attn")
    }

    pub fn targets_mlp(&self) -> bool {
        self.targets.iter().any(|t| t == "mlp")
    }

    /// alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / f64::from(self.rank.max(1))
    }
}

/// Where CLIP's caption tokenizer comes from: the built-in one, or a file (written as the
/// string `"byte"` or the file's URL).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TokenizerSource {
    /// The built-in byte-level tokenizer (UTF-8 bytes; nothing to download).
    #[default]
    Byte,
    /// A Hugging Face `tokenizer.json` at this storage URL.
    Url(String),
}

impl std::fmt::Display for TokenizerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSource::Byte => f.write_str("byte"),
            TokenizerSource::Url(u) => f.write_str(u),
        }
    }
}

impl std::str::FromStr for TokenizerSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "byte" => Ok(TokenizerSource::Byte),
            "" => Err("must be \"byte\" or the URL of a tokenizer.json".into()),
            _ => Ok(TokenizerSource::Url(s.to_string())),
        }
    }
}

serde_via_str!(TokenizerSource);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// torchvision's `BasicBlock`.
    #[default]
    Basic,
    /// torchvision's `Bottleneck` (stride on the 3×3 convolution, as torchvision's v1.5).
    Bottleneck,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StemKind {
    /// 3×3 stride-1 convolution and no max-pool: keeps resolution on small images.
    Cifar,
    /// torchvision's 7×7 stride-2 convolution followed by a 3×3 stride-2 max-pool.
    Imagenet,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            encoder: EncoderKind::Resnet,
            vit: VitSettings::default(),
            text: TextSettings::default(),
            adapters: AdapterSettings::default(),
            layers: vec![1, 1, 1, 1],
            block: BlockKind::Basic,
            width: 16,
            norm: NormKind::Batch,
            projector: true,
            projector_hidden: 128,
            projector_out: 64,
            init_weights: String::new(),
            init_partial: false,
            activation: Activation::Gelu,
            lock_image: false,
            lock_text: false,
            unlocked_layers: 0,
            stem: StemKind::Cifar,
        }
    }
}

impl ModelConfig {
    /// Whether the image tower ends in the MLP projector: a CLIP ViT's own projection gives
    /// its embedding; every other image tower carries the projector when `projector` is on.
    pub fn has_projector(&self, objective: ObjectiveKind) -> bool {
        self.projector && !(objective == ObjectiveKind::Clip && self.encoder == EncoderKind::Vit)
    }

    /// Checks the model against the objective that trains it and the input size.
    pub(super) fn validate(
        &self,
        objective: ObjectiveKind,
        image_size: u32,
    ) -> Result<(), ConfigError> {
        let m = self;
        if m.layers.is_empty() || m.layers.len() > 4 || m.layers.contains(&0) {
            return Err(err(
                "model.layers",
                "must list 1 to 4 stages, each with at least one block",
            ));
        }
        if m.width == 0 || m.projector_hidden == 0 || m.projector_out == 0 {
            return Err(err(
                "model",
                "width, projector_hidden and projector_out must be positive",
            ));
        }
        if m.norm == NormKind::Group && !m.width.is_multiple_of(8) {
            return Err(err(
                "model.width",
                format!(
                    "({}) must be a multiple of 8 with norm = \"group\" (8 groups)",
                    m.width
                ),
            ));
        }
        // Each of the 8 groups normalises projector_hidden/8 features of one sample; with only
        // a few per group the output collapses to a sign pattern and gradients vanish.
        if m.norm == NormKind::Group
            && (!m.projector_hidden.is_multiple_of(8) || m.projector_hidden < 64)
        {
            return Err(err(
                "model.projector_hidden",
                format!(
                    "({}) must be a multiple of 8 and at least 64 with norm = \"group\" \
                     (8 groups of at least 8 features)",
                    m.projector_hidden
                ),
            ));
        }
        if (m.lock_image || m.lock_text) && objective != ObjectiveKind::Clip {
            return Err(err(
                if m.lock_image {
                    "model.lock_image"
                } else {
                    "model.lock_text"
                },
                "locks a tower of a CLIP model (objective.kind = \"clip\")",
            ));
        }
        if m.unlocked_layers > 0 {
            let blocks = match (m.lock_image, m.lock_text, m.encoder) {
                (false, false, _) => {
                    return Err(err(
                        "model.unlocked_layers",
                        "unlocks blocks of a locked tower; set model.lock_image or lock_text",
                    ))
                }
                (true, _, EncoderKind::Vit) => m.vit.layers,
                (true, _, EncoderKind::Resnet) => m.layers.iter().sum(),
                (false, true, _) => m.text.layers,
            };
            if m.unlocked_layers > blocks {
                return Err(err(
                    "model.unlocked_layers",
                    format!(
                        "({}) is more than the locked tower's {blocks} blocks",
                        m.unlocked_layers
                    ),
                ));
            }
        }
        if m.lock_image && m.lock_text {
            return Err(err(
                "model.lock_text",
                "with model.lock_image nothing would train",
            ));
        }
        if m.lock_image && m.encoder == EncoderKind::Resnet && m.norm == NormKind::Batch {
            return Err(err(
                "model.lock_image",
                "is not built for a BatchNorm ResNet (its running statistics would still \
                 change in training mode); use a ViT or norm = \"group\"",
            ));
        }
        let clip_resnet = objective == ObjectiveKind::Clip && m.encoder == EncoderKind::Resnet;
        if !m.projector && (objective == ObjectiveKind::Moco || clip_resnet) {
            return Err(err(
                "model.projector",
                "MoCo and a CLIP ResNet need the projector (model.projector = true)",
            ));
        }
        if objective == ObjectiveKind::Moco && m.encoder != EncoderKind::Resnet {
            return Err(err(
                "objective.kind",
                "\"moco\" needs model.encoder = \"resnet\" (its key encoder is a ResNet copy)",
            ));
        }
        if m.encoder == EncoderKind::Vit {
            let v = &m.vit;
            if v.patch_size == 0 || !image_size.is_multiple_of(v.patch_size) {
                return Err(err(
                    "model.vit.patch_size",
                    format!(
                        "({}) must divide data.image_size ({image_size})",
                        v.patch_size
                    ),
                ));
            }
            if v.width == 0 || v.layers == 0 || v.heads == 0 || !v.width.is_multiple_of(v.heads) {
                return Err(err(
                    "model.vit",
                    "width, layers and heads must be positive, width a multiple of heads",
                ));
            }
        }
        if objective == ObjectiveKind::Clip {
            let t = &m.text;
            if t.context_length < 2 {
                return Err(err("model.text.context_length", "must be at least 2"));
            }
            if t.width == 0 || t.layers == 0 || t.heads == 0 || !t.width.is_multiple_of(t.heads) {
                return Err(err(
                    "model.text",
                    "width, layers and heads must be positive, width a multiple of heads",
                ));
            }
        }
        Ok(())
    }
}
