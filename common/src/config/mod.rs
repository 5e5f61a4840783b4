//! The job file: one TOML document with a section per component.
//!
//! Every section rejects unknown keys (a typo must not silently fall back to a default), and
//! [`JobConfig::validate`] checks the relations between keys before anything starts. Errors name
//! the key path, e.g. `train.global_batch (96) must be a multiple of ...`.

use serde::{Deserialize, Serialize};
use std::fmt;

mod moe;
pub use moe::MoeConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[derive(Default)]
pub struct JobConfig {
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub objective: ObjectiveConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub moe: MoeConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard list: a URL prefix (every `.tar` under it) or a brace pattern such as
    /// `s3://bucket/data-{000000..000099}.tar`. Plain paths mean `file://`.
    pub url: String,
    /// Samples that `contrail local` writes with the synthetic generator when `url` holds no
    /// shards yet.
    pub synth_samples: u64,
    /// Samples per synthetic shard.
    pub synth_shard_size: u64,
    /// Side of the square crops fed to the encoder.
    pub image_size: u32,
    /// Decode/augment threads per worker.
    pub decode_threads: usize,
    /// Ready batches buffered ahead of the training step.
    pub prefetch_batches: usize,
    /// Images whose header claims more pixels than this are skipped as decompression bombs.
    pub max_image_pixels: u64,
    /// Endpoint override for S3-compatible servers (MinIO, Ceph, R2); empty for AWS.
    pub s3_endpoint: String,
    /// Attempts for a failing shard read before the shard is marked failed.
    pub read_retries: u32,
    #[serde(default)]
    pub augment: AugmentConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            url: "file://./run/data/synth".into(),
            synth_samples: 4096,
            synth_shard_size: 256,
            image_size: 32,
            decode_threads: 1,
            prefetch_batches: 4,
            max_image_pixels: 64 * 1024 * 1024,
            s3_endpoint: String::new(),
            read_retries: 5,
            augment: AugmentConfig::default(),
        }
    }
}

/// SimCLR augmentation parameters (defaults follow the SimCLR paper / torchvision recipe).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    pub crop_scale_min: f32,
    pub crop_scale_max: f32,
    pub flip_p: f32,
    pub jitter_p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f32,
    pub blur_p: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_scale_min: 0.08,
            crop_scale_max: 1.0,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 0.5,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
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
    /// Image encoder: "resnet" (the keys below) or "vit" (`[model.vit]`).
    pub encoder: String,
    /// The Vision Transformer, when `encoder = "vit"` (open_clip's layout and names).
    pub vit: VitSettings,
    /// The text tower of CLIP (`objective.kind = "clip"`).
    pub text: TextSettings,
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
    /// "causal" (CLIP: causal attention, pooled at the end token) or "bidirectional" (mean over
    /// the caption's tokens).
    pub mode: String,
    /// "byte" (built-in byte-level tokenizer, no download) or the URL of a Hugging Face
    /// `tokenizer.json` (any storage URL, e.g. a multilingual tokenizer).
    pub tokenizer: String,
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
            mode: "causal".into(),
            tokenizer: "byte".into(),
        }
    }
}

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
            encoder: "resnet".into(),
            vit: VitSettings::default(),
            text: TextSettings::default(),
            layers: vec![1, 1, 1, 1],
            block: BlockKind::Basic,
            width: 16,
            norm: NormKind::Batch,
            projector: true,
            projector_hidden: 128,
            projector_out: 64,
            init_weights: String::new(),
            stem: StemKind::Cifar,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    /// "simclr" (NT-Xent over two views, negatives from every worker), "moco" (MoCo v2: a
    /// momentum key encoder and a queue of negative keys) or "swav" (swapped prototype
    /// assignments with Sinkhorn–Knopp codes over every worker's batch).
    pub kind: String,
    /// Softmax temperature τ (all kinds; SwAV papers use 0.1, SimCLR and MoCo v2 0.2).
    pub temperature: f64,
    /// moco: number of keys kept as negatives (a ring buffer filled with every worker's keys).
    pub moco_queue_size: u64,
    /// moco: EMA momentum of the key encoder at step 0; it follows a cosine schedule to 1.0
    /// at the last step (BYOL's schedule; a constant when the run length is unknown).
    pub moco_momentum: f64,
    /// moco: compute keys on samples shuffled across workers (MoCo's shuffle BN), so BatchNorm
    /// statistics cannot leak which key belongs to which query. Ignored with norm = "group".
    pub moco_shuffle_bn: bool,
    /// swav: number of prototypes K.
    pub swav_prototypes: u32,
    /// swav: Sinkhorn–Knopp entropy regularisation ε.
    pub swav_epsilon: f64,
    /// swav: Sinkhorn–Knopp iterations.
    pub swav_sinkhorn_iterations: u32,
    /// swav: the prototypes get no update for this many first steps.
    pub swav_freeze_prototypes_steps: u64,
    /// swav: features of earlier batches kept per worker and view for the codes (0: none).
    pub swav_queue_size: u64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: "simclr".into(),
            temperature: 0.2,
            moco_queue_size: 65_536,
            moco_momentum: 0.99,
            moco_shuffle_bn: true,
            swav_prototypes: 3000,
            swav_epsilon: 0.05,
            swav_sinkhorn_iterations: 3,
            swav_freeze_prototypes_steps: 313,
            swav_queue_size: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// "sgd" (SGD with momentum), "lars" (lightly's LARS) or "adamw" (`torch.optim.AdamW`).
    pub kind: String,
    /// Base learning rate; the peak is this scaled by `lr_scaling`.
    pub lr: f64,
    /// Momentum (sgd, lars).
    pub momentum: f64,
    /// L2 penalty (sgd, lars) or decoupled decay factor (adamw).
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
    /// How the peak learning rate follows `train.global_batch`.
    pub lr_scaling: LrScaling,
    /// lars, adamw: no weight decay on 1-D parameters (biases, norm scales and shifts).
    pub exclude_1d_from_decay: bool,
    /// lars: 1-D parameters take the plain SGD step instead of the trust-ratio one.
    pub lars_exclude_1d_from_adaptation: bool,
    /// lars: trust coefficient η in η‖w‖/(‖g‖ + λ‖w‖ + ε); lightly's default.
    pub lars_eta: f64,
    /// lars: ε in the trust-ratio denominator.
    pub lars_eps: f64,
    /// lars: clip the trust ratio to min(ratio/lr, 1), as solo-learn's `clip_lars_lr`.
    pub lars_clip: bool,
    /// adamw: β₁ (first-moment decay).
    pub adam_beta1: f64,
    /// adamw: β₂ (second-moment decay).
    pub adam_beta2: f64,
    /// adamw: ε added outside the square root.
    pub adam_eps: f64,
}

/// Peak learning rate as a function of the global batch (see `optim::scaling` in the worker).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// peak = lr.
    #[default]
    None,
    /// peak = lr × global_batch / 256 (Goyal et al.).
    Linear,
    /// peak = lr × √global_batch (SimCLR's LARS recipe).
    Sqrt,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: "sgd".into(),
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-6,
            warmup_steps: 10,
            lr_scaling: LrScaling::None,
            exclude_1d_from_decay: true,
            lars_exclude_1d_from_adaptation: true,
            lars_eta: 0.001,
            lars_eps: 1e-8,
            lars_clip: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples (images, each giving two views) per optimizer step across all workers.
    pub global_batch: u64,
    /// Samples per worker per forward pass.
    pub micro_batch: u64,
    /// Passes over the dataset.
    pub epochs: u32,
    /// Stop after this many steps even if epochs remain (0: no limit).
    pub max_steps: u64,
    pub seed: u64,
    /// Print a progress line every this many steps.
    pub log_every: u64,
    /// "auto" (bf16 on a GPU, fp32 on the CPU), "fp32", or "bf16" (GPU only): bf16 runs the
    /// forward and backward passes under CUDA autocast with bf16, while weights, optimizer
    /// state and the loss stay float32.
    pub precision: String,
    /// Conv nets on a GPU keep weights and activations in channels-last (NHWC) layout, which
    /// tensor cores run about 1.8× faster; no effect on the CPU.
    pub channels_last: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            global_batch: 64,
            micro_batch: 32,
            epochs: 4,
            max_steps: 0,
            seed: 0,
            log_every: 10,
            precision: "auto".into(),
            channels_last: true,
        }
    }
}

impl TrainConfig {
    /// K: micro-batches each worker accumulates per optimizer step; `validate` guarantees the
    /// division is exact and K ≥ 1.
    pub fn accumulation_steps(&self, world_size: u32) -> u64 {
        self.global_batch / (self.micro_batch * world_size as u64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub world_size: u32,
    /// Collective backend: "tcp" (ring over TCP, GPU tensors staged through the host), "nccl"
    /// (GPUs only) or "auto" (NCCL when the worker computes on a GPU).
    pub backend: String,
    /// Where a worker trains: "auto" (GPU `rank mod #GPUs` when libtorch sees one, else the
    /// CPU), "cpu", "cuda" (GPU 0) or "cuda:N".
    pub device: String,
    /// Address the coordinator's gRPC server binds (workers dial `http://` + this).
    pub grpc_addr: String,
    /// Address of the HTTP status server (`/status`, `/healthz`).
    pub http_addr: String,
    pub heartbeat_ms: u64,
    /// A worker silent for this long is declared dead and its leases return to the pool.
    pub worker_timeout_ms: u64,
    /// A shard lease not renewed (by heartbeats) within this time returns to the pool.
    pub lease_ttl_ms: u64,
    /// A collective that makes no progress for this long fails, naming the silent peer.
    pub collective_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            world_size: 2,
            backend: "tcp".into(),
            device: "auto".into(),
            grpc_addr: "127.0.0.1:50051".into(),
            http_addr: "127.0.0.1:8080".into(),
            heartbeat_ms: 500,
            worker_timeout_ms: 5_000,
            lease_ttl_ms: 10_000,
            collective_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory URL for checkpoints; empty disables them. A job started again with the same
    /// URL resumes from the latest one.
    pub url: String,
    /// Write a checkpoint every this many steps (and at the end); 0 only at the end.
    pub every_steps: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: u32,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            url: "file://./run/checkpoints".into(),
            every_steps: 100,
            keep: 2,
        }
    }
}

/// A rejected job file: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "invalid job config: {}", self.reason)
        } else {
            write!(f, "invalid job config: {} {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err(path: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        reason: reason.into(),
    }
}

impl JobConfig {
    /// Parses a job file, applies `section.key=value` overrides, and validates the result.
    pub fn from_toml_with_overrides(text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| err("", format!("is not valid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: JobConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            err(if path == "." { "" } else { &path }, inner)
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_overrides(text, &[])
    }

    /// Reads the job file at `path` and applies `--set` overrides: the one loader of the
    /// `contrail` commands, the coordinator binary and the Kubernetes renderer.
    pub fn from_file(
        path: impl AsRef<std::path::Path>,
        overrides: &[String],
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading job file {}", path.display()))?;
        Self::from_toml_with_overrides(&text, overrides)
            .with_context(|| format!("in job file {}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("JobConfig always serializes")
    }

    /// Checks relations between keys; every error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        let c = &self.cluster;
        if c.world_size == 0 {
            return Err(err("cluster.world_size", "must be at least 1"));
        }
        if t.micro_batch == 0 {
            return Err(err("train.micro_batch", "must be at least 1"));
        }
        let per_round = c.world_size as u64 * t.micro_batch;
        if t.global_batch == 0 || !t.global_batch.is_multiple_of(per_round) {
            return Err(err(
                "train.global_batch",
                format!(
                    "({}) must be a multiple of world_size × micro_batch ({} × {} = {})",
                    t.global_batch, c.world_size, t.micro_batch, per_round
                ),
            ));
        }
        // global_batch > 0 and a multiple of per_round, so accumulation_steps() = K ≥ 1: each
        // worker runs K micro-batches per optimizer step (train::accumulate).
        if t.epochs == 0 && t.max_steps == 0 {
            return Err(err(
                "train.epochs",
                "is 0 and train.max_steps is 0: nothing to train",
            ));
        }
        if t.log_every == 0 {
            return Err(err("train.log_every", "must be at least 1"));
        }
        if self.data.url.trim().is_empty() {
            return Err(err("data.url", "must name the shard location"));
        }
        if !(8..=4096).contains(&self.data.image_size) {
            return Err(err(
                "data.image_size",
                format!("({}) must be between 8 and 4096", self.data.image_size),
            ));
        }
        if self.data.decode_threads == 0 {
            return Err(err("data.decode_threads", "must be at least 1"));
        }
        if self.data.prefetch_batches == 0 {
            return Err(err("data.prefetch_batches", "must be at least 1"));
        }
        if self.data.synth_shard_size == 0 {
            return Err(err("data.synth_shard_size", "must be at least 1"));
        }
        let a = &self.data.augment;
        if !(0.0 < a.crop_scale_min
            && a.crop_scale_min <= a.crop_scale_max
            && a.crop_scale_max <= 1.0)
        {
            return Err(err(
                "data.augment.crop_scale_min",
                "and crop_scale_max must satisfy 0 < min <= max <= 1",
            ));
        }
        for (name, p) in [
            ("flip_p", a.flip_p),
            ("jitter_p", a.jitter_p),
            ("grayscale_p", a.grayscale_p),
            ("blur_p", a.blur_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(err(
                    &format!("data.augment.{name}"),
                    format!("({p}) is a probability and must be in [0, 1]"),
                ));
            }
        }
        if !(0.0..=0.5).contains(&a.hue) {
            return Err(err(
                "data.augment.hue",
                format!("({}) must be in [0, 0.5]", a.hue),
            ));
        }
        if a.std.iter().any(|s| *s <= 0.0) {
            return Err(err("data.augment.std", "entries must be positive"));
        }
        let m = &self.model;
        if !matches!(m.encoder.as_str(), "resnet" | "vit") {
            return Err(err(
                "model.encoder",
                format!(
                    "(\"{}\") is not a known encoder; expected \"resnet\" or \"vit\"",
                    m.encoder
                ),
            ));
        }
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
        let obj = &self.objective;
        if !matches!(obj.kind.as_str(), "simclr" | "moco" | "swav" | "clip") {
            return Err(err(
                "objective.kind",
                format!(
                    "(\"{}\") must be one of \"simclr\", \"moco\", \"swav\", \"clip\"",
                    obj.kind
                ),
            ));
        }
        if !m.projector && (obj.kind == "moco" || (obj.kind == "clip" && m.encoder == "resnet")) {
            return Err(err(
                "model.projector",
                "MoCo and a CLIP ResNet need the projector (model.projector = true)",
            ));
        }
        if obj.kind == "moco" && m.encoder != "resnet" {
            return Err(err(
                "objective.kind",
                "\"moco\" needs model.encoder = \"resnet\" (its key encoder is a ResNet copy)",
            ));
        }
        if m.encoder == "vit" {
            let v = &m.vit;
            if v.patch_size == 0 || !self.data.image_size.is_multiple_of(v.patch_size) {
                return Err(err(
                    "model.vit.patch_size",
                    format!(
                        "({}) must divide data.image_size ({})",
                        v.patch_size, self.data.image_size
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
        if obj.kind == "clip" {
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
            if !matches!(t.mode.as_str(), "causal" | "bidirectional") {
                return Err(err(
                    "model.text.mode",
                    format!("(\"{}\") must be \"causal\" or \"bidirectional\"", t.mode),
                ));
            }
        }
        if obj.temperature.is_nan() || obj.temperature <= 0.0 {
            return Err(err("objective.temperature", "must be positive"));
        }
        if obj.moco_queue_size == 0 {
            return Err(err("objective.moco_queue_size", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&obj.moco_momentum) {
            return Err(err(
                "objective.moco_momentum",
                format!("({}) must be in [0, 1)", obj.moco_momentum),
            ));
        }
        if obj.swav_prototypes == 0 {
            return Err(err("objective.swav_prototypes", "must be at least 1"));
        }
        if obj.swav_epsilon.is_nan() || obj.swav_epsilon <= 0.0 {
            return Err(err("objective.swav_epsilon", "must be positive"));
        }
        if obj.swav_sinkhorn_iterations == 0 {
            return Err(err(
                "objective.swav_sinkhorn_iterations",
                "must be at least 1",
            ));
        }
        let o = &self.optim;
        if !matches!(o.kind.as_str(), "sgd" | "lars" | "adamw") {
            return Err(err(
                "optim.kind",
                format!(
                    "(\"{}\") must be one of \"sgd\", \"lars\", \"adamw\"",
                    o.kind
                ),
            ));
        }
        if o.lr.is_nan() || o.lr <= 0.0 {
            return Err(err("optim.lr", "must be positive"));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(err(
                "optim.momentum",
                format!("({}) must be in [0, 1)", o.momentum),
            ));
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return Err(err("optim.weight_decay", "must not be negative"));
        }
        if o.lars_eta.is_nan() || o.lars_eta <= 0.0 {
            return Err(err("optim.lars_eta", "must be positive"));
        }
        if o.lars_eps.is_nan() || o.lars_eps < 0.0 {
            return Err(err("optim.lars_eps", "must not be negative"));
        }
        for (path, beta) in [
            ("optim.adam_beta1", o.adam_beta1),
            ("optim.adam_beta2", o.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err(err(path, format!("({beta}) must be in [0, 1)")));
            }
        }
        // eps keeps the AdamW denominator away from zero for parameters whose gradient is 0.
        if o.adam_eps.is_nan() || o.adam_eps <= 0.0 {
            return Err(err("optim.adam_eps", "must be positive"));
        }
        if !matches!(c.backend.as_str(), "tcp" | "nccl" | "auto") {
            return Err(err(
                "cluster.backend",
                format!(
                    "(\"{}\") must be one of \"tcp\", \"nccl\", \"auto\"",
                    c.backend
                ),
            ));
        }
        let device_ok = matches!(c.device.as_str(), "auto" | "cpu" | "cuda")
            || c.device
                .strip_prefix("cuda:")
                .is_some_and(|i| i.parse::<u32>().is_ok());
        if !device_ok {
            return Err(err(
                "cluster.device",
                format!(
                    "(\"{}\") must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
                    c.device
                ),
            ));
        }
        if !matches!(self.train.precision.as_str(), "auto" | "fp32" | "bf16") {
            return Err(err(
                "train.precision",
                format!(
                    "(\"{}\") must be \"auto\", \"fp32\" or \"bf16\"",
                    self.train.precision
                ),
            ));
        }
        if c.heartbeat_ms == 0 || c.worker_timeout_ms <= c.heartbeat_ms * 2 {
            return Err(err(
                "cluster.worker_timeout_ms",
                format!(
                    "({}) must exceed twice cluster.heartbeat_ms ({})",
                    c.worker_timeout_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.lease_ttl_ms <= c.heartbeat_ms * 2 {
            return Err(err(
                "cluster.lease_ttl_ms",
                format!(
                    "({}) must exceed twice cluster.heartbeat_ms ({})",
                    c.lease_ttl_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.collective_timeout_ms == 0 {
            return Err(err("cluster.collective_timeout_ms", "must be positive"));
        }
        if !self.checkpoint.url.is_empty() && self.checkpoint.keep == 0 {
            return Err(err(
                "checkpoint.keep",
                "must be at least 1 when checkpoint.url is set",
            ));
        }
        let vit_layers = (m.encoder == "vit").then_some(m.vit.layers);
        let text_layers = (obj.kind == "clip").then_some(m.text.layers);
        // A CLIP ViT's own projection gives its embedding; every other image tower can carry
        // the MLP projector.
        let has_projector = m.projector && !(obj.kind == "clip" && m.encoder == "vit");
        self.moe.validate(
            vit_layers,
            text_layers,
            has_projector,
            &obj.kind,
            c.world_size,
        )?;
        Ok(())
    }
}

/// Applies one `section.key=value` override. The value is parsed as a TOML value when it
/// parses (numbers, booleans, arrays), otherwise taken as a string.
pub fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<(), ConfigError> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| err(assignment, "override must look like section.key=value"))?;
    let path = path.trim();
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = root;
    let keys: Vec<&str> = path.split('.').collect();
    for (i, key) in keys.iter().enumerate() {
        let table = node
            .as_table_mut()
            .ok_or_else(|| err(path, "override walks into a value that is not a table"))?;
        if i + 1 == keys.len() {
            table.insert((*key).to_string(), value);
            return Ok(());
        }
        node = table
            .entry((*key).to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Err(err(path, "override has an empty key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        JobConfig::default().validate().unwrap();
        let round_trip = JobConfig::from_toml(&JobConfig::default().to_toml()).unwrap();
        assert_eq!(round_trip, JobConfig::default());
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = JobConfig::from_toml("[train]\nglobal_bach = 3\n").unwrap_err();
        assert!(e.path.starts_with("train"), "{e}");
        assert!(e.reason.contains("global_bach"), "{e}");
    }

    #[test]
    fn batch_relation_is_checked() {
        let e = JobConfig::from_toml(
            "[train]\nglobal_batch = 96\nmicro_batch = 64\n[cluster]\nworld_size = 1\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "train.global_batch");
        assert!(
            e.reason
                .contains("(96) must be a multiple of world_size × micro_batch"),
            "{e}"
        );
    }

    #[test]
    fn accumulation_over_micro_batches_is_accepted() {
        let cfg = JobConfig::from_toml(
            "[train]\nglobal_batch = 96\nmicro_batch = 12\n[cluster]\nworld_size = 2\n",
        )
        .unwrap();
        assert_eq!(cfg.train.accumulation_steps(cfg.cluster.world_size), 4);
        let plain = JobConfig::from_toml(
            "[train]\nglobal_batch = 24\nmicro_batch = 12\n[cluster]\nworld_size = 2\n",
        )
        .unwrap();
        assert_eq!(plain.train.accumulation_steps(plain.cluster.world_size), 1);
        // Smaller than one round of micro-batches: K would be 0.
        let e = JobConfig::from_toml(
            "[train]\nglobal_batch = 12\nmicro_batch = 12\n[cluster]\nworld_size = 2\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "train.global_batch", "{e}");
        assert!(e.reason.contains("(2 × 12 = 24)"), "{e}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let e = JobConfig::from_toml("[optim]\nlr = \"fast\"\n").unwrap_err();
        assert_eq!(e.path, "optim.lr", "{e}");
    }

    #[test]
    fn overrides_apply_before_validation() {
        let cfg = JobConfig::from_toml_with_overrides(
            "",
            &["train.seed=7".into(), "data.url=s3://b/x-{0..3}.tar".into()],
        )
        .unwrap();
        assert_eq!(cfg.train.seed, 7);
        assert_eq!(cfg.data.url, "s3://b/x-{0..3}.tar");
        let e =
            JobConfig::from_toml_with_overrides("", &["optim.momentum=1.5".into()]).unwrap_err();
        assert_eq!(e.path, "optim.momentum");
    }

    #[test]
    fn model_stem_and_group_norm_widths() {
        let cfg = JobConfig::from_toml("[model]\nstem = \"imagenet\"\n").unwrap();
        assert_eq!(cfg.model.stem, StemKind::Imagenet);
        let e = JobConfig::from_toml("[model]\nstem = \"tiny\"\n").unwrap_err();
        assert_eq!(e.path, "model.stem", "{e}");
        for bad in [12, 56] {
            let e = JobConfig::from_toml(&format!(
                "[model]\nnorm = \"group\"\nprojector_hidden = {bad}\n"
            ))
            .unwrap_err();
            assert_eq!(e.path, "model.projector_hidden", "{e}");
        }
        JobConfig::from_toml("[model]\nnorm = \"group\"\nprojector_hidden = 64\n").unwrap();
    }

    #[test]
    fn optimizer_keys_parse_and_validate() {
        let cfg = JobConfig::from_toml(
            "[optim]\nkind = \"lars\"\nlr_scaling = \"sqrt\"\nlars_clip = true\n",
        )
        .unwrap();
        assert_eq!(cfg.optim.lr_scaling, LrScaling::Sqrt);
        assert!(cfg.optim.lars_clip);
        JobConfig::from_toml("[optim]\nkind = \"adamw\"\nweight_decay = 0.05\n").unwrap();
        let e = JobConfig::from_toml("[optim]\nkind = \"lamb\"\n").unwrap_err();
        assert_eq!(e.path, "optim.kind", "{e}");
        assert!(e.reason.contains("\"lars\""), "{e}");
        let e = JobConfig::from_toml("[optim]\nlr_scaling = \"quadratic\"\n").unwrap_err();
        assert_eq!(e.path, "optim.lr_scaling", "{e}");
        for (kv, path) in [
            ("adam_beta2 = 1.0", "optim.adam_beta2"),
            ("adam_beta1 = -0.1", "optim.adam_beta1"),
            ("adam_eps = 0.0", "optim.adam_eps"),
            ("lars_eta = 0.0", "optim.lars_eta"),
            ("lars_eps = -1e-8", "optim.lars_eps"),
        ] {
            let e = JobConfig::from_toml(&format!("[optim]\n{kv}\n")).unwrap_err();
            assert_eq!(e.path, path, "{kv}: {e}");
        }
    }

    #[test]
    fn backend_device_and_precision_choices_are_checked() {
        JobConfig::from_toml("[cluster]\nbackend = \"nccl\"\ndevice = \"cuda:1\"\n").unwrap();
        for (toml, path) in [
            ("[cluster]\nbackend = \"mpi\"\n", "cluster.backend"),
            ("[cluster]\ndevice = \"gpu0\"\n", "cluster.device"),
            ("[cluster]\ndevice = \"cuda:x\"\n", "cluster.device"),
            ("[train]\nprecision = \"fp16\"\n", "train.precision"),
            ("[objective]\nkind = \"byol\"\n", "objective.kind"),
            (
                "[objective]\nmoco_momentum = 1.0\n",
                "objective.moco_momentum",
            ),
            (
                "[objective]\nswav_epsilon = 0.0\n",
                "objective.swav_epsilon",
            ),
        ] {
            let e = JobConfig::from_toml(toml).unwrap_err();
            assert_eq!(e.path, path, "{toml}: {e}");
        }
    }

    #[test]
    fn moe_keys_are_checked_against_the_model() {
        let vit = "[model]\nencoder = \"vit\"\n[model.vit]\nlayers = 4\npatch_size = 8\n\
                   [data]\nimage_size = 32\n";
        let ok = JobConfig::from_toml(&format!(
            "{vit}[moe]\nexperts = 4\nvit_blocks = [1, 3]\ntop_k = 1\n"
        ))
        .unwrap();
        assert!(ok.moe.enabled());
        for (moe, path) in [
            ("experts = 4\nvit_blocks = [4]", "moe.vit_blocks"),
            ("experts = 4\nvit_blocks = [1, 1]", "moe.vit_blocks"),
            ("experts = 4\ntext_blocks = [0]", "moe.text_blocks"),
            ("experts = 4", "moe.vit_blocks"),
            ("experts = 4\nvit_blocks = [0]\ntop_k = 3", "moe.top_k"),
            (
                "experts = 3\nvit_blocks = [0]\n[cluster]\nworld_size = 2",
                "moe.experts",
            ),
            ("experts = 4\nvit_blocks = [0]\njitter = 1.5", "moe.jitter"),
            ("vit_blocks = [0]", "moe.experts"),
        ] {
            let e = JobConfig::from_toml(&format!("{vit}[moe]\n{moe}\n")).unwrap_err();
            assert_eq!(e.path, path, "{moe}: {e}");
        }
        let e = JobConfig::from_toml("[moe]\nexperts = 2\nvit_blocks = [0]\n").unwrap_err();
        assert_eq!(e.path, "moe.vit_blocks", "a ResNet has no ViT blocks: {e}");
        // A ResNet's projector can be the mixture; without a projector it cannot.
        let head = JobConfig::from_toml("[moe]\nexperts = 2\nprojector = true\n").unwrap();
        assert_eq!(head.moe.block_count(), 1);
        let e = JobConfig::from_toml(
            "[model]\nprojector = false\n[moe]\nexperts = 2\nprojector = true\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "moe.projector", "{e}");
    }
}
