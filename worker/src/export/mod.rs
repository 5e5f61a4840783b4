//! A trained model handed back to the Python libraries teams serve with (`contrail export`):
//! a state dict in safetensors under the library's own names, beside the config file that
//! library reads to build the model, so one call loads it:
//!
//! - [`ExportFormat::OpenClip`]: a CLIP model with a ViT image tower →
//!   `open_clip.create_model("local-dir:DIR")` (`open_clip_config.json`,
//!   `open_clip_model.safetensors`);
//! - [`ExportFormat::Timm`]: a ViT image tower (an image-only model's, or a CLIP model's
//!   `visual.*`) → `timm.create_model("local-dir:DIR", pretrained=True)` (`config.json`,
//!   `model.safetensors`), its classifier the tower's projection;
//! - [`ExportFormat::Torchvision`]: a ResNet of torchvision's shapes → `torchvision.models.
//!   resnetNN()` with `fc` replaced by `Identity` (`model.safetensors`, `config.json`);
//! - [`ExportFormat::Hf`]: a BERT text tower → `transformers.BertModel.from_pretrained(DIR)`
//!   and its tokenizer, with the projection into the joint space beside them.
//!
//! Each format refuses a model the library cannot build (a MoE block, a CIFAR stem, a
//! bidirectional text tower, ...) naming what stands in the way, never writing a file that
//! would load and compute something else.

mod hf;
mod open_clip;
mod timm;
mod torchvision;

use crate::model::ContrastiveModel;
use crate::tokenize::Tokenizer;
use crate::train::checkpoint::tensors_to_safetensors;
use anyhow::Result;
use contrail_common::JobConfig;
use tch::Tensor;

/// Which library the export is for (`contrail export --format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    OpenClip,
    Timm,
    Torchvision,
    Hf,
}

impl ExportFormat {
    pub const NAMES: &'static str = "open_clip, timm, torchvision or hf";

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenClip => "open_clip",
            Self::Timm => "timm",
            Self::Torchvision => "torchvision",
            Self::Hf => "hf",
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open_clip" | "open-clip" => Ok(Self::OpenClip),
            "timm" => Ok(Self::Timm),
            "torchvision" => Ok(Self::Torchvision),
            "hf" => Ok(Self::Hf),
            other => Err(format!(
                "unknown export format {other:?} (expected {})",
                Self::NAMES
            )),
        }
    }
}

/// The files of one export, by name, and what to tell the user.
pub struct Export {
    pub files: Vec<(String, Vec<u8>)>,
    /// One line per fact worth printing: the architecture, the tensor count, how to load it.
    pub notes: Vec<String>,
}

/// What the model needs besides its variables to be rebuilt elsewhere.
pub struct ExportInput<'a> {
    pub cfg: &'a JobConfig,
    pub model: &'a ContrastiveModel,
    /// A CLIP model's caption tokenizer (its ids are the text tower's).
    pub tokenizer: Option<&'a dyn Tokenizer>,
    /// The `tokenizer.json` it was read from (`model.text.tokenizer`), copied into an
    /// open_clip folder; None for the built-in byte tokenizer.
    pub tokenizer_json: Option<&'a [u8]>,
}

/// `model` in `format`'s layout, or why that library cannot hold it.
pub fn export(input: &ExportInput<'_>, format: ExportFormat) -> Result<Export> {
    match format {
        ExportFormat::OpenClip => open_clip::export(input),
        ExportFormat::Timm => timm::export(input),
        ExportFormat::Torchvision => torchvision::export(input),
        ExportFormat::Hf => hf::export(input),
    }
}

/// The model's variables (the query network and its heads; never a MoCo key encoder), LoRA
/// adapters merged into the weights they adapt.
fn variables(model: &ContrastiveModel) -> std::collections::HashMap<String, Tensor> {
    model.merged_variables()
}

/// A safetensors file of `named`, float tensors as float32 whatever the training precision.
fn safetensors(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let float: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| {
            let t = t.detach();
            let t = if t.is_floating_point() {
                t.to_kind(tch::Kind::Float)
            } else {
                t
            };
            (n.clone(), t)
        })
        .collect();
    tensors_to_safetensors(&float)
}

/// The file names Hugging Face-style folders use (timm, transformers; the torchvision folder is
/// timm's too).
const CONFIG_FILE: &str = "config.json";
const MODEL_FILE: &str = "model.safetensors";

/// `config.json` and `model.safetensors` of a Hugging Face-style folder.
fn config_and_weights(
    config: &serde_json::Value,
    named: &[(String, Tensor)],
) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(vec![
        (CONFIG_FILE.to_string(), json(config)?),
        (MODEL_FILE.to_string(), safetensors(named)?),
    ])
}

fn json(value: &serde_json::Value) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The evaluation view's preprocessing as the Python libraries describe theirs: the centred
/// square of the shorter side resized to the model's input with a bilinear filter, then
/// normalised (`data::augment`'s eval view).
struct Preprocess {
    size: u32,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Preprocess {
    fn of(cfg: &JobConfig) -> Self {
        Self {
            size: cfg.data.image_size,
            mean: cfg.data.augment.mean,
            std: cfg.data.augment.std,
        }
    }
}

/// timm's `pretrained_cfg` for a model of `num_classes` outputs whose input is `pre`: the
/// evaluation view (whole image, bilinear, centre crop), the layers timm adapts by name, and
/// whether the input size is fixed (a ViT's positions; a ResNet takes any size, and timm
/// refuses the flag for one).
fn timm_pretrained_cfg(
    pre: &Preprocess,
    num_classes: i64,
    (first_conv, classifier): (&str, &str),
    fixed_input_size: bool,
) -> serde_json::Value {
    serde_json::json!({
        "input_size": [3, pre.size, pre.size],
        "fixed_input_size": fixed_input_size,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": pre.mean,
        "std": pre.std,
        "num_classes": num_classes,
        "first_conv": first_conv,
        "classifier": classifier,
    })
}

/// Refuses an export when `what` is true, saying why and which format.
fn refuse_if(what: bool, format: ExportFormat, why: impl FnOnce() -> String) -> Result<()> {
    if what {
        anyhow::bail!("cannot export to {}: {}", format.as_str(), why());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
