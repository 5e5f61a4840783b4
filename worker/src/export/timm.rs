//! A ViT image tower as timm 1.0's `local-dir:` model folder: `model.safetensors` under timm's
//! `VisionTransformer` names and `config.json` (`architecture`, `model_args`, `pretrained_cfg`),
//! so `timm.create_model("local-dir:DIR", pretrained=True)` builds and loads it.
//!
//! The names are those `model::init_weights::translate_timm` reads, the other way round; an
//! open_clip-layout tower (`ln_pre`, no patch bias, LayerNorm ε 1e-5) is timm's CLIP variant
//! (`pre_norm=True`), a timm-layout one timm's plain ViT (ε 1e-6). The tower's projection
//! (`proj`: an image-only ViT's own, a CLIP model's into the joint space) becomes timm's
//! classifier `head` (weight transposed, bias 0), so `model(x)` is contrail's image
//! embedding and `forward_head(..., pre_logits=True)` the pooled features before it.

use super::{
    config_and_weights, refuse_if, timm_pretrained_cfg, variables, Export, ExportFormat,
    ExportInput, Preprocess,
};
use anyhow::{Context, Result};
use contrail_common::config::{Activation, ObjectiveKind, VitStyle};
use serde_json::json;
use tch::{Kind, Tensor};

const FORMAT: ExportFormat = ExportFormat::Timm;

/// Per-block names, contrail's (open_clip's) → timm's.
const BLOCK: &[(&str, &str)] = &[
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
];

/// timm's name for the tower variable `name` (without the tower's prefix), None for a
/// variable timm's ViT has no place for.
fn timm_name(name: &str) -> Option<String> {
    let direct = match name {
        "class_embedding" => "cls_token",
        "positional_embedding" => "pos_embed",
        "conv1.weight" => "patch_embed.proj.weight",
        "conv1.bias" => "patch_embed.proj.bias",
        "ln_pre.weight" => "norm_pre.weight",
        "ln_pre.bias" => "norm_pre.bias",
        "ln_post.weight" => "norm.weight",
        "ln_post.bias" => "norm.bias",
        _ => "",
    };
    if !direct.is_empty() {
        return Some(direct.to_string());
    }
    let (index, tail) = name
        .strip_prefix("transformer.resblocks.")?
        .split_once('.')?;
    let (from, to) = BLOCK.iter().find(|(from, _)| tail.starts_with(from))?;
    Some(format!("blocks.{index}.{to}{}", &tail[from.len()..]))
}

pub fn export(input: &ExportInput<'_>) -> Result<Export> {
    let (cfg, model) = (input.cfg, input.model);
    let vit = model.vit_config().with_context(|| {
        format!(
            "cannot export to {}: the image tower is a ResNet (--format torchvision exports it)",
            FORMAT.as_str()
        )
    })?;
    refuse_if(
        cfg.moe.enabled() && !cfg.moe.vit_blocks.is_empty(),
        FORMAT,
        || "the ViT has mixture-of-experts blocks, which timm's VisionTransformer has not".into(),
    )?;
    let prefix = if cfg.objective.kind == ObjectiveKind::Clip {
        "visual."
    } else {
        ""
    };
    let vars = variables(model);
    let mut named = Vec::new();
    for (name, t) in &vars {
        let Some(local) = name.strip_prefix(prefix) else {
            continue; // a CLIP model's text tower and logit scale
        };
        if local == "proj" {
            named.push(("head.weight".to_string(), t.detach().transpose(0, 1)));
            named.push((
                "head.bias".to_string(),
                Tensor::zeros([t.size()[1]], (Kind::Float, t.device())),
            ));
        } else if let Some(timm) = timm_name(local) {
            let t = match local {
                "class_embedding" => t.detach().view([1, 1, -1]),
                "positional_embedding" => t.detach().unsqueeze(0),
                _ => t.detach(),
            };
            named.push((timm, t));
        }
        // Anything else (the MLP projector, SwAV's prototypes) is a training head.
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));

    let clip_layout = vit.style == VitStyle::OpenClip;
    let architecture = if clip_layout {
        "vit_base_patch16_clip_224"
    } else {
        "vit_base_patch16_224"
    };
    let act = match cfg.model.activation {
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
    };
    let pre = Preprocess::of(cfg);
    let config = json!({
        "architecture": architecture,
        "num_classes": vit.output_dim,
        "num_features": vit.width,
        "global_pool": "token",
        "model_args": {
            "img_size": vit.image_size,
            "patch_size": vit.patch_size,
            "embed_dim": vit.width,
            "depth": vit.layers,
            "num_heads": vit.heads,
            "mlp_ratio": vit.mlp_ratio,
            "class_token": true,
            "global_pool": "token",
            "pre_norm": clip_layout,
            "act_layer": act,
        },
        "pretrained_cfg": timm_pretrained_cfg(
            &pre,
            vit.output_dim,
            ("patch_embed.proj", "head"),
            true
        ),
    });
    Ok(Export {
        files: config_and_weights(&config, &named)?,
        notes: vec![
            format!(
                "timm {architecture} sized {}×{} patch {}, width {} × {} layers, {} heads, \
                 head {} → {}, {} tensors",
                vit.image_size,
                vit.image_size,
                vit.patch_size,
                vit.width,
                vit.layers,
                vit.heads,
                vit.width,
                vit.output_dim,
                named.len()
            ),
            "load with timm.create_model(\"local-dir:DIR\", pretrained=True)".into(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::timm_name;

    #[test]
    fn names_are_the_ones_init_weights_translates_back() {
        for (ours, theirs) in [
            ("class_embedding", "cls_token"),
            ("ln_pre.bias", "norm_pre.bias"),
            (
                "transformer.resblocks.11.attn.in_proj_weight",
                "blocks.11.attn.qkv.weight",
            ),
            (
                "transformer.resblocks.0.mlp.c_proj.bias",
                "blocks.0.mlp.fc2.bias",
            ),
            (
                "transformer.resblocks.3.ln_2.weight",
                "blocks.3.norm2.weight",
            ),
        ] {
            assert_eq!(timm_name(ours).as_deref(), Some(theirs), "{ours}");
        }
        assert_eq!(timm_name("projector.0.weight"), None);
        assert_eq!(timm_name("transformer.resblocks.0.unknown"), None);
    }
}
