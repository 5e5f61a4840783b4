//! A CLIP model with a ViT image tower as open_clip 3.3's `local-dir:` model folder:
//! `open_clip_model.safetensors` (the variables under their own names, which are open_clip's)
//! and `open_clip_config.json` (`model_cfg`: the towers' sizes, `quick_gelu`; `preprocess_cfg`:
//! the evaluation view's size, mean and std).
//!
//! open_clip pools the text tower at the largest token id (`text.argmax(-1)`), contrail at the
//! first end-of-text token: they agree when end-of-text is the vocabulary's last id, which is
//! so for the built-in byte tokenizer and CLIP's BPE; another tokenizer is refused. open_clip
//! has no tokenizer for contrail's byte ids: the captions are tokenized as contrail does
//! (docs/export.md), or with the job's `tokenizer.json`, which the folder also holds.

use super::{
    json, refuse_if, safetensors, variables, Export, ExportFormat, ExportInput, Preprocess,
};
use anyhow::{Context, Result};
use contrail_common::config::{Activation, ObjectiveKind, TextMode, VitStyle};
use serde_json::json;

const FORMAT: ExportFormat = ExportFormat::OpenClip;
pub const CONFIG_FILE: &str = "open_clip_config.json";
pub const MODEL_FILE: &str = "open_clip_model.safetensors";

pub fn export(input: &ExportInput<'_>) -> Result<Export> {
    let (cfg, model) = (input.cfg, input.model);
    refuse_if(cfg.objective.kind != ObjectiveKind::Clip, FORMAT, || {
        format!(
            "open_clip holds image–text models, this is a {} model (--format timm or \
             torchvision exports its image tower)",
            cfg.objective.kind.as_str()
        )
    })?;
    let vit = model.vit_config().with_context(|| {
        format!(
            "cannot export to {}: the image tower is a ResNet, open_clip's is a ModifiedResNet \
             (--format torchvision exports the ResNet)",
            FORMAT.as_str()
        )
    })?;
    let text = model.text_config().with_context(|| {
        format!(
            "cannot export to {}: the text tower is a BERT (model.text.kind), open_clip's \
                 is its own text transformer",
            FORMAT.as_str()
        )
    })?;
    refuse_if(cfg.moe.enabled(), FORMAT, || {
        "open_clip has no mixture-of-experts blocks".into()
    })?;
    refuse_if(vit.style != VitStyle::OpenClip, FORMAT, || {
        "the ViT has timm's layout (model.vit.style = \"timm\"); --format timm exports it".into()
    })?;
    refuse_if(text.mode != TextMode::Causal, FORMAT, || {
        "the text tower is bidirectional with mean pooling (model.text.mode), which open_clip \
         does not build"
            .into()
    })?;
    refuse_if(vit.width % vit.heads != 0, FORMAT, || {
        format!(
            "width {} is not a multiple of heads {}",
            vit.width, vit.heads
        )
    })?;
    refuse_if(text.eot_id != text.vocab_size - 1, FORMAT, || {
        format!(
            "open_clip pools captions at their largest token id, and the tokenizer's end-of-text \
             id {} is not its vocabulary's last ({})",
            text.eot_id,
            text.vocab_size - 1
        )
    })?;

    let mut named: Vec<(String, tch::Tensor)> = variables(model).into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let pre = Preprocess::of(cfg);
    let config = json!({
        "model_cfg": {
            "embed_dim": vit.output_dim,
            "quick_gelu": cfg.model.activation == Activation::QuickGelu,
            "vision_cfg": {
                "image_size": vit.image_size,
                "patch_size": vit.patch_size,
                "width": vit.width,
                "layers": vit.layers,
                "head_width": vit.width / vit.heads,
                "mlp_ratio": vit.mlp_ratio,
            },
            "text_cfg": {
                "context_length": text.context_length,
                "vocab_size": text.vocab_size,
                "width": text.width,
                "heads": text.heads,
                "layers": text.layers,
                "mlp_ratio": text.mlp_ratio,
                "pad_id": text.pad_id,
            },
        },
        "preprocess_cfg": {
            "size": pre.size,
            "mean": pre.mean,
            "std": pre.std,
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        },
        "contrail": {
            "tokenizer": cfg.model.text.tokenizer.to_string(),
            "sot_id": input.tokenizer.and_then(|t| t.sot_id()),
            "eot_id": text.eot_id,
            "pad_id": text.pad_id,
        },
    });
    let mut files = vec![
        (CONFIG_FILE.to_string(), json(&config)?),
        (MODEL_FILE.to_string(), safetensors(&named)?),
    ];
    if let Some(bytes) = input.tokenizer_json {
        files.push(("tokenizer.json".to_string(), bytes.to_vec()));
    }
    Ok(Export {
        files,
        notes: vec![
            format!(
                "open_clip CLIP: ViT {}×{} patch {} width {} × {} layers, text width {} × {} \
                 layers, embed {}, {} tensors",
                vit.image_size,
                vit.image_size,
                vit.patch_size,
                vit.width,
                vit.layers,
                text.width,
                text.layers,
                vit.output_dim,
                named.len()
            ),
            "load with open_clip.create_model_and_transforms(\"local-dir:DIR\")".into(),
        ],
    })
}
