//! A ResNet image tower as torchvision loads it: `model.safetensors` holds the encoder's
//! variables under torchvision's names (which are contrail's) plus a `num_batches_tracked`
//! counter per BatchNorm (tch keeps none; 0 here, and they matter only with momentum=None),
//! so `torchvision.models.resnet50()` with `fc = Identity()` takes it with `strict=True`.
//! `config.json` is timm's (timm's ResNets have torchvision's names), so
//! `timm.create_model("local-dir:DIR", pretrained=True)` loads the same folder, without a
//! classifier (`num_classes` 0).
//!
//! Only torchvision's shapes export: the ImageNet stem, BatchNorm, width 64 and the block
//! counts of ResNet-18/34/50/101/152. The MLP projector is a training head and is left out.

use super::{
    config_and_weights, refuse_if, timm_pretrained_cfg, variables, Export, ExportFormat,
    ExportInput, Preprocess, MODEL_FILE,
};
use anyhow::Result;
use contrail_common::config::{BlockKind, EncoderKind, NormKind, ObjectiveKind, StemKind};
use serde_json::json;
use tch::{Kind, Tensor};

const FORMAT: ExportFormat = ExportFormat::Torchvision;

/// torchvision's constructor for a block kind and per-stage block counts.
fn architecture(block: BlockKind, layers: &[u32]) -> Option<&'static str> {
    Some(match (block, layers) {
        (BlockKind::Basic, [2, 2, 2, 2]) => "resnet18",
        (BlockKind::Basic, [3, 4, 6, 3]) => "resnet34",
        (BlockKind::Bottleneck, [3, 4, 6, 3]) => "resnet50",
        (BlockKind::Bottleneck, [3, 4, 23, 3]) => "resnet101",
        (BlockKind::Bottleneck, [3, 8, 36, 3]) => "resnet152",
        _ => return None,
    })
}

pub fn export(input: &ExportInput<'_>) -> Result<Export> {
    let (cfg, model) = (input.cfg, input.model);
    let m = &cfg.model;
    refuse_if(m.encoder != EncoderKind::Resnet, FORMAT, || {
        "the image tower is a ViT (--format timm exports it)".into()
    })?;
    refuse_if(m.stem != StemKind::Imagenet, FORMAT, || {
        "the ResNet has the CIFAR stem (3×3 convolution, no max-pool); torchvision's is \
         model.stem = \"imagenet\""
            .into()
    })?;
    refuse_if(m.norm != NormKind::Batch, FORMAT, || {
        "the ResNet uses GroupNorm; torchvision's uses BatchNorm".into()
    })?;
    refuse_if(m.width != 64, FORMAT, || {
        format!(
            "model.width is {}; torchvision's ResNets start at 64",
            m.width
        )
    })?;
    let arch = architecture(m.block, &m.layers);
    let Some(arch) = arch else {
        anyhow::bail!(
            "cannot export to {}: {:?} blocks {:?} per stage match no torchvision ResNet \
             (18/34: basic [2,2,2,2]/[3,4,6,3]; 50/101/152: bottleneck [3,4,6,3]/[3,4,23,3]/\
             [3,8,36,3])",
            FORMAT.as_str(),
            m.block,
            m.layers
        );
    };
    let prefix = if cfg.objective.kind == ObjectiveKind::Clip {
        "visual."
    } else {
        ""
    };
    let mut named = Vec::new();
    for (name, t) in variables(model) {
        let Some(local) = name.strip_prefix(prefix) else {
            continue; // a CLIP model's text tower and logit scale
        };
        if local.starts_with("projector.") || local.starts_with("prototypes.") {
            continue;
        }
        if let Some(bn) = local.strip_suffix(".running_mean") {
            named.push((
                format!("{bn}.num_batches_tracked"),
                Tensor::zeros([], (Kind::Int64, tch::Device::Cpu)),
            ));
        }
        named.push((local.to_string(), t.detach()));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let features = if m.block == BlockKind::Bottleneck {
        2048
    } else {
        512
    };
    let pre = Preprocess::of(cfg);
    let config = json!({
        "architecture": arch,
        "num_classes": 0,
        "num_features": features,
        "pretrained_cfg": timm_pretrained_cfg(&pre, 0, ("conv1", "fc"), false),
    });
    Ok(Export {
        files: config_and_weights(&config, &named)?,
        notes: vec![
            format!(
                "torchvision {arch}: {features} pooled features, {} tensors",
                named.len()
            ),
            format!(
                "load with net = torchvision.models.{arch}(); net.fc = torch.nn.Identity(); \
                 net.load_state_dict(safetensors.torch.load_file(\"DIR/{MODEL_FILE}\")), or \
                 timm.create_model(\"local-dir:DIR\", pretrained=True)"
            ),
        ],
    })
}
