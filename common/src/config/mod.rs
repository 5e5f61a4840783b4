//! The job file: one TOML document with a section per component.
//!
//! Every section rejects unknown keys (a typo must not silently fall back to a default), and
//! [`JobConfig::validate`] checks the relations between keys before anything starts. Errors name
//! the key path, e.g. `train.global_batch (96) must be a multiple of ...`.

use serde::{Deserialize, Serialize};
use std::fmt;

pub(crate) mod choice;
mod cluster;
mod data;
mod eval;
mod log;
mod model;
mod moe;
mod objective;
mod optim;
mod train;

pub use cluster::{Backend, ClusterConfig, DeviceSetting, GradDtype};
pub use data::{AugmentConfig, DataConfig};
pub use eval::{EvalConfig, KnnMetric};
pub use log::LogConfig;
pub use model::{
    Activation, AdapterSettings, BlockKind, EncoderKind, ModelConfig, NormKind, StemKind, TextKind,
    TextMode, TextPooling, TextSettings, TokenizerSource, VitSettings, VitStyle,
};
pub use moe::MoeConfig;
pub use objective::{MocoSettings, ObjectiveConfig, ObjectiveKind, SwavSettings};
pub use optim::{AdamWSettings, LarsSettings, LrScaling, OptimConfig, OptimKind};
pub use train::{AuditConfig, CheckpointConfig, Precision, TrainConfig};

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
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub log: LogConfig,
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
    /// Turns the job into an embedding export over `workers` workers (`contrail embed
    /// --workers`, `contrail k8s render --embed-out`): nothing trains, so online evaluation is
    /// off and the training batch is sized so that any worker count validates.
    pub fn make_export(&mut self, workers: u32) {
        self.eval.url.clear();
        // Export workers never regroup: a dead one fails the export (rerun it; parts are
        // rewritten whole).
        self.cluster.min_workers = 0;
        // Its journal would share the training job's file under checkpoint.url.
        self.cluster.journal_url = "off".into();
        self.audit.url.clear();
        self.train.global_batch = self.train.micro_batch * u64::from(workers);
    }

    /// Parses a job file, applies `section.key=value` overrides, and validates the result.
    pub fn from_toml_with_overrides(text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| err("", format!("is not valid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        reject_moved_keys(&value)?;
        fill_clip_augment_defaults(&mut value);
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

    /// The dotted keys whose values differ between two job files as `to_toml` writes them
    /// (e.g. `optim.lr`), sorted; a file that does not parse differs in `""`.
    pub fn changed_keys(a: &str, b: &str) -> Vec<String> {
        fn flatten(
            prefix: &str,
            v: &toml::Value,
            out: &mut std::collections::BTreeMap<String, String>,
        ) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let parse = |text: &str| {
            let mut out = std::collections::BTreeMap::new();
            toml::from_str::<toml::Value>(text)
                .map(|v| flatten("", &v, &mut out))
                .map(|()| out)
        };
        let (Ok(a), Ok(b)) = (parse(a), parse(b)) else {
            return vec![String::new()];
        };
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
    }

    /// Checks each section and the relations between them; every error names the offending
    /// key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sections(true)
    }

    /// [`JobConfig::validate`] for a job going on with another `cluster.world_size` after a
    /// membership change: the coordinator places the experts explicitly then, so the default
    /// spread's rule (experts a multiple or divisor of the workers) does not apply.
    pub fn validate_resized(&self) -> Result<(), ConfigError> {
        self.validate_sections(false)
    }

    fn validate_sections(&self, default_spread: bool) -> Result<(), ConfigError> {
        self.cluster.validate_world_size()?;
        self.train.validate(self.cluster.world_size)?;
        self.data.validate()?;
        self.model
            .validate(self.objective.kind, self.data.image_size)?;
        self.objective.validate()?;
        self.optim.validate()?;
        self.cluster.validate()?;
        self.checkpoint.validate()?;
        self.audit.validate()?;
        self.eval.validate()?;
        if !self.eval.classes.is_empty() && self.objective.kind != ObjectiveKind::Clip {
            return Err(err(
                "eval.classes",
                format!(
                    "zero-shot needs a text tower, and objective.kind = {} has none (only clip)",
                    self.objective.kind.as_str()
                ),
            ));
        }
        let (m, kind) = (&self.model, self.objective.kind);
        if self.optim.grad_clip_norm > 0.0 && self.moe.enabled() {
            return Err(err(
                "optim.grad_clip_norm",
                "is not built for MoE jobs: expert gradients differ between ranks, so each \
                 rank would clip by another norm",
            ));
        }
        if self.train.precision == Precision::Fp16 && self.moe.enabled() {
            return Err(err(
                "train.precision",
                "fp16 is not built for MoE jobs: expert gradients differ between ranks, so \
                 ranks could disagree on skipping an overflowing step",
            ));
        }
        if m.activation == Activation::QuickGelu
            && (!self.moe.vit_blocks.is_empty() || !self.moe.text_blocks.is_empty())
        {
            return Err(err(
                "model.activation",
                "quick_gelu is not built for MoE blocks (their experts use GELU)",
            ));
        }
        let a = &m.adapters;
        if a.enabled() {
            if let Some(bad) = a
                .targets
                .iter()
                .find(|t| !matches!(t.as_str(), "attn" | "mlp"))
            {
                return Err(err(
                    "model.adapters.targets",
                    format!("has {bad:?}; the targets are \"attn\" and \"mlp\""),
                ));
            }
            if a.targets.is_empty() || !(a.alpha.is_finite() && a.alpha > 0.0) {
                return Err(err(
                    "model.adapters",
                    "needs at least one target and a positive alpha",
                ));
            }
            if self.moe.enabled() {
                return Err(err(
                    "model.adapters",
                    "are not built for MoE jobs (expert weights live on other ranks)",
                ));
            }
            if m.encoder == EncoderKind::Resnet && kind != ObjectiveKind::Clip {
                return Err(err(
                    "model.adapters",
                    "adapt transformer blocks; this model has none (a ResNet, no text tower)",
                ));
            }
            if m.lock_image || m.lock_text {
                return Err(err(
                    "model.adapters",
                    "already freeze the towers' weights; model.lock_image / lock_text would \
                     also freeze their adapters",
                ));
            }
        }
        if m.text.kind.is_bert_family() {
            if !self.moe.text_blocks.is_empty() {
                return Err(err(
                    "moe.text_blocks",
                    "MoE blocks are built for the clip text tower, not a BERT-family one",
                ));
            }
            if m.text.max_positions < m.text.context_length {
                return Err(err(
                    "model.text.max_positions",
                    format!(
                        "({}) must be at least model.text.context_length ({})",
                        m.text.max_positions, m.text.context_length
                    ),
                ));
            }
        }
        let vit_layers = (m.encoder == EncoderKind::Vit).then_some(m.vit.layers);
        let text_layers = (kind == ObjectiveKind::Clip).then_some(m.text.layers);
        self.moe.validate(
            vit_layers,
            text_layers,
            m.has_projector(kind),
            kind,
            default_spread.then_some(self.cluster.world_size),
        )
    }
}

/// A CLIP job's `[data.augment]` keys it leaves out default to OpenCLIP's training transform
/// ([`AugmentConfig::open_clip`]), not to SimCLR's strong augmentation and ImageNet's
/// statistics. A file that is not a table of tables is left for the loader to refuse.
fn fill_clip_augment_defaults(root: &mut toml::Value) {
    let clip = root
        .get("objective")
        .and_then(|o| o.get("kind"))
        .and_then(|k| k.as_str())
        == Some("clip");
    let Some(root) = root.as_table_mut().filter(|_| clip) else {
        return;
    };
    let data = root
        .entry("data")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(augment) = data.as_table_mut().map(|d| {
        d.entry("augment")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    }) else {
        return;
    };
    let (Some(given), Ok(toml::Value::Table(defaults))) = (
        augment.as_table_mut(),
        toml::Value::try_from(AugmentConfig::open_clip()),
    ) else {
        return;
    };
    for (key, value) in defaults {
        given.entry(key).or_insert(value);
    }
}

/// Keys of earlier releases that now live in a sub-table: (section, old key, new path).
const MOVED_KEYS: &[(&str, &str, &str)] = &[
    ("objective", "moco_queue_size", "objective.moco.queue_size"),
    ("objective", "moco_momentum", "objective.moco.momentum"),
    ("objective", "moco_shuffle_bn", "objective.moco.shuffle_bn"),
    ("objective", "swav_prototypes", "objective.swav.prototypes"),
    ("objective", "swav_epsilon", "objective.swav.epsilon"),
    (
        "objective",
        "swav_sinkhorn_iterations",
        "objective.swav.sinkhorn_iterations",
    ),
    (
        "objective",
        "swav_freeze_prototypes_steps",
        "objective.swav.freeze_prototypes_steps",
    ),
    ("objective", "swav_queue_size", "objective.swav.queue_size"),
    ("optim", "lars_eta", "optim.lars.eta"),
    ("optim", "lars_eps", "optim.lars.eps"),
    ("optim", "lars_clip", "optim.lars.clip"),
    (
        "optim",
        "lars_exclude_1d_from_adaptation",
        "optim.lars.exclude_1d_from_adaptation",
    ),
    ("optim", "adam_beta1", "optim.adamw.beta1"),
    ("optim", "adam_beta2", "optim.adamw.beta2"),
    ("optim", "adam_eps", "optim.adamw.eps"),
];

/// A job file written for an earlier release gets told where its key went, instead of only
/// "unknown field".
fn reject_moved_keys(root: &toml::Value) -> Result<(), ConfigError> {
    for (section, old, new) in MOVED_KEYS {
        if root.get(section).and_then(|s| s.get(old)).is_some() {
            return Err(err(
                &format!("{section}.{old}"),
                format!("has moved: write it as {new}"),
            ));
        }
    }
    Ok(())
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
    fn changed_keys_name_what_two_job_files_set_differently() {
        let a = JobConfig::default();
        let mut b = a.clone();
        b.optim.lr = 0.5;
        b.model.text.width = 64;
        assert_eq!(
            JobConfig::changed_keys(&a.to_toml(), &b.to_toml()),
            vec!["model.text.width".to_string(), "optim.lr".to_string()]
        );
        assert!(JobConfig::changed_keys(&a.to_toml(), &a.to_toml()).is_empty());
        assert_eq!(
            JobConfig::changed_keys("[x", &a.to_toml()),
            vec![String::new()]
        );
    }

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
    fn a_job_in_nodes_has_whole_nodes() {
        let e = JobConfig::from_toml("[cluster]\nworld_size = 6\nlocal_ranks = 4\n").unwrap_err();
        assert_eq!(e.path, "cluster.world_size");
        assert!(
            e.reason.contains("multiple of cluster.local_ranks (4)"),
            "{e}"
        );
        let ok = JobConfig::from_toml(
            "[train]\nglobal_batch = 256\n[cluster]\nworld_size = 8\nlocal_ranks = 4\n",
        )
        .unwrap();
        assert_eq!(ok.cluster.world_size / ok.cluster.local_ranks, 2);
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
            "[optim]\nkind = \"lars\"\nlr_scaling = \"sqrt\"\n[optim.lars]\nclip = true\n",
        )
        .unwrap();
        assert_eq!(cfg.optim.lr_scaling, LrScaling::Sqrt);
        assert_eq!(cfg.optim.kind, OptimKind::Lars);
        assert!(cfg.optim.lars.clip);
        JobConfig::from_toml("[optim]\nkind = \"adamw\"\nweight_decay = 0.05\n").unwrap();
        let e = JobConfig::from_toml("[optim]\nkind = \"lamb\"\n").unwrap_err();
        assert_eq!(e.path, "optim.kind", "{e}");
        assert!(e.reason.contains("\"lars\""), "{e}");
        let e = JobConfig::from_toml("[optim]\nlr_scaling = \"quadratic\"\n").unwrap_err();
        assert_eq!(e.path, "optim.lr_scaling", "{e}");
        for (kv, path) in [
            ("adamw]\nbeta2 = 1.0", "optim.adamw.beta2"),
            ("adamw]\nbeta1 = -0.1", "optim.adamw.beta1"),
            ("adamw]\neps = 0.0", "optim.adamw.eps"),
            ("lars]\neta = 0.0", "optim.lars.eta"),
            ("lars]\neps = -1e-8", "optim.lars.eps"),
        ] {
            let e = JobConfig::from_toml(&format!("[optim.{kv}\n")).unwrap_err();
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
            ("[train]\nprecision = \"fp8\"\n", "train.precision"),
            ("[objective]\nkind = \"byol\"\n", "objective.kind"),
            (
                "[objective.moco]\nmomentum = 1.0\n",
                "objective.moco.momentum",
            ),
            (
                "[objective.swav]\nepsilon = 0.0\n",
                "objective.swav.epsilon",
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
        let e = JobConfig::from_toml(
            "[model]\nencoder = \"vit\"\nactivation = \"quick_gelu\"\n[model.vit]\nlayers = 2\n\
             [moe]\nexperts = 2\nvit_blocks = [0]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("model.activation"), "{e}");
        for (toml, path) in [
            ("[optim]\ngrad_clip_norm = -1.0\n", "optim.grad_clip_norm"),
            (
                "[model]\nencoder = \"vit\"\n[model.vit]\nlayers = 2\n[optim]\ngrad_clip_norm = 1.0\n\
                 [moe]\nexperts = 2\nvit_blocks = [0]\n",
                "optim.grad_clip_norm",
            ),
            (
                "[model]\nencoder = \"vit\"\n[model.vit]\nlayers = 2\n[train]\nprecision = \"fp16\"\n\
                 [moe]\nexperts = 2\nvit_blocks = [0]\n",
                "train.precision",
            ),
        ] {
            let e = JobConfig::from_toml(toml).unwrap_err();
            assert_eq!(e.path, path, "{toml}: {e}");
        }
        for (toml, path) in [
            ("[model]\nlock_image = true\n", "model.lock_image"),
            (
                "[objective]\nkind = \"clip\"\n[model]\nlock_image = true\n",
                "model.lock_image",
            ),
            (
                "[objective]\nkind = \"clip\"\n[model]\nencoder = \"vit\"\nlock_image = true\n\
                 lock_text = true\n[model.vit]\npatch_size = 8\n",
                "model.lock_text",
            ),
        ] {
            let e = JobConfig::from_toml(toml).unwrap_err();
            assert_eq!(e.path, path, "{toml}: {e}");
        }
        let ok = JobConfig::from_toml("[optim]\ngrad_clip_norm = 1.0\n").unwrap();
        assert_eq!(ok.optim.grad_clip_norm, 1.0);
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

    /// A CLIP job's augmentation defaults to OpenCLIP's transform, key by key; other jobs keep
    /// SimCLR's.
    #[test]
    fn a_clip_job_defaults_to_open_clips_transform() {
        let clip = "[objective]\nkind = \"clip\"\n[model]\nencoder = \"vit\"\n[model.vit]\npatch_size = 8\n";
        let cfg = JobConfig::from_toml(clip).unwrap();
        assert_eq!(cfg.data.augment, AugmentConfig::open_clip());
        let cfg =
            JobConfig::from_toml_with_overrides(clip, &["data.augment.flip_p=0.5".into()]).unwrap();
        let want = AugmentConfig {
            flip_p: 0.5,
            ..AugmentConfig::open_clip()
        };
        assert_eq!(cfg.data.augment, want);
        assert_eq!(
            JobConfig::from_toml("[objective]\nkind = \"simclr\"\n")
                .unwrap()
                .data
                .augment,
            AugmentConfig::default()
        );
    }

    #[test]
    fn choices_parse_into_enums_and_name_the_allowed_values() {
        let cfg = JobConfig::from_toml(
            "[objective]\nkind = \"clip\"\n[model]\nencoder = \"vit\"\n[model.vit]\n\
             patch_size = 8\n[model.text]\nmode = \"bidirectional\"\n[train]\n\
             precision = \"fp32\"\n[cluster]\nbackend = \"auto\"\ndevice = \"cuda:3\"\n",
        )
        .unwrap();
        assert_eq!(cfg.objective.kind, ObjectiveKind::Clip);
        assert_eq!(cfg.model.encoder, EncoderKind::Vit);
        assert_eq!(cfg.model.text.mode, TextMode::Bidirectional);
        assert_eq!(cfg.train.precision, Precision::Fp32);
        let fp16 = JobConfig::from_toml("[train]\nprecision = \"fp16\"\n").unwrap();
        assert_eq!(fp16.train.precision, Precision::Fp16);
        assert_eq!(cfg.cluster.backend, Backend::Auto);
        assert_eq!(cfg.cluster.device, DeviceSetting::Cuda(3));
        assert!(cfg.cluster.requires_gpu());
        assert_eq!(
            JobConfig::from_toml("[cluster]\ndevice = \"cuda\"\n")
                .unwrap()
                .cluster
                .device,
            DeviceSetting::Gpu
        );
        // The typed config writes back the names it read.
        assert_eq!(JobConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        let e = JobConfig::from_toml("[model]\nencoder = \"convnext\"\n").unwrap_err();
        assert_eq!(e.path, "model.encoder", "{e}");
        assert!(
            e.reason.contains("must be one of \"resnet\", \"vit\""),
            "{e}"
        );
        let e = JobConfig::from_toml("[model.text]\nmode = \"left\"\n").unwrap_err();
        assert_eq!(e.path, "model.text.mode", "{e}");
        let url = "[model.text]\ntokenizer = \"s3://b/tok.json\"\n";
        let cfg = JobConfig::from_toml(url).unwrap();
        assert_eq!(
            cfg.model.text.tokenizer,
            TokenizerSource::Url("s3://b/tok.json".into())
        );
        assert_eq!(JobConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        let e = JobConfig::from_toml("[model.text]\ntokenizer = \" \"\n").unwrap_err();
        assert_eq!(e.path, "model.text.tokenizer", "{e}");
    }

    #[test]
    fn keys_of_the_flat_layout_say_where_they_moved() {
        for (toml, path, new) in [
            (
                "[objective]\nmoco_queue_size = 4096\n",
                "objective.moco_queue_size",
                "objective.moco.queue_size",
            ),
            (
                "[optim]\nadam_beta2 = 0.98\n",
                "optim.adam_beta2",
                "optim.adamw.beta2",
            ),
        ] {
            let e = JobConfig::from_toml(toml).unwrap_err();
            assert_eq!(e.path, path, "{e}");
            assert!(e.reason.contains(new), "{e}");
        }
        // Overrides are checked the same way.
        let e =
            JobConfig::from_toml_with_overrides("", &["optim.lars_eta=0.02".into()]).unwrap_err();
        assert_eq!(e.path, "optim.lars_eta", "{e}");
        let ok = JobConfig::from_toml_with_overrides("", &["optim.lars.eta=0.02".into()]).unwrap();
        assert_eq!(ok.optim.lars.eta, 0.02);
    }
}
