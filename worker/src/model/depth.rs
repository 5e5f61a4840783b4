//! How deep a variable sits in its tower, read from its name: 0 for what comes before the
//! first block (patch or token embedding, positions, `ln_pre`, a ResNet's stem), `i + 1` for
//! block `i` (a transformer block, a BERT layer, a ResNet's residual blocks counted across
//! stages), and `blocks + 1` for everything after them (final norms, projections, heads,
//! `logit_scale`). Layer-wise learning-rate decay (`optim.layer_decay`, BEiT's and timm's
//! `param_groups_layer_decay`) and a partly unlocked tower (`model.unlocked_layers`) use it.

/// The block counts of a model's towers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Depths {
    /// A CLIP model: names under `visual.` are the image tower's, the others the text
    /// tower's.
    pub clip: bool,
    pub image_blocks: usize,
    pub text_blocks: usize,
    /// A ResNet image tower's blocks per stage (`layer1` … `layer4`).
    pub resnet_stages: Vec<usize>,
}

/// A variable's place: `layer` in 0 ..= `top`, where `top` is its tower's blocks + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub layer: usize,
    pub top: usize,
}

/// Names of what comes before the first block, as prefixes of a tower-local name.
const EMBEDDINGS: &[&str] = &[
    "conv1.",
    "bn1.",
    "class_embedding",
    "positional_embedding",
    "ln_pre.",
    "token_embedding.",
    "bert.embeddings.",
];

impl Depths {
    pub fn of(&self, name: &str) -> Depth {
        let (image, local) = match name.strip_prefix("visual.") {
            Some(local) if self.clip => (true, local),
            _ => (!self.clip, name),
        };
        let blocks = if image {
            self.image_blocks
        } else {
            self.text_blocks
        };
        let top = blocks + 1;
        let layer = match self.block(local, image) {
            Some(i) => i + 1,
            None if EMBEDDINGS.iter().any(|e| local.starts_with(e)) => 0,
            None => top,
        };
        Depth { layer, top }
    }

    /// The learning-rate multiplier of `name` under layer decay `decay`: decay^(top - layer).
    pub fn lr_scale(&self, name: &str, decay: f64) -> f64 {
        let d = self.of(name);
        decay.powi((d.top - d.layer) as i32)
    }

    /// The block index of a tower-local name, if it is in a block.
    fn block(&self, local: &str, image: bool) -> Option<usize> {
        let index = |rest: &str| rest.split('.').next()?.parse::<usize>().ok();
        if let Some(rest) = local
            .strip_prefix("transformer.resblocks.")
            .or_else(|| local.strip_prefix("bert.encoder.layer."))
        {
            return index(rest);
        }
        if !image || self.resnet_stages.is_empty() {
            return None;
        }
        // ResNet: `layer{s}.{b}.` is block b of stage s (from 1).
        let rest = local.strip_prefix("layer")?;
        let (stage, rest) = rest.split_once('.')?;
        let stage: usize = stage.parse().ok()?;
        let before: usize = self
            .resnet_stages
            .get(..stage.checked_sub(1)?)?
            .iter()
            .sum();
        Some(before + index(rest)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tower_counts_from_its_embeddings_to_its_head() {
        let clip = Depths {
            clip: true,
            image_blocks: 12,
            text_blocks: 4,
            resnet_stages: Vec::new(),
        };
        let at = |name: &str| clip.of(name);
        assert_eq!(at("visual.conv1.weight"), Depth { layer: 0, top: 13 });
        assert_eq!(at("visual.positional_embedding").layer, 0);
        assert_eq!(at("visual.transformer.resblocks.0.ln_1.weight").layer, 1);
        assert_eq!(
            at("visual.transformer.resblocks.11.attn.in_proj_weight").layer,
            12
        );
        assert_eq!(at("visual.proj"), Depth { layer: 13, top: 13 });
        assert_eq!(at("token_embedding.weight"), Depth { layer: 0, top: 5 });
        assert_eq!(at("transformer.resblocks.3.mlp.c_fc.weight").layer, 4);
        assert_eq!(at("bert.encoder.layer.2.output.dense.bias").layer, 3);
        assert_eq!(at("bert.embeddings.LayerNorm.weight").layer, 0);
        assert_eq!(at("logit_scale"), Depth { layer: 5, top: 5 });
        assert!((clip.lr_scale("visual.conv1.weight", 0.5) - 0.5f64.powi(13)).abs() < 1e-15);
        assert_eq!(clip.lr_scale("text_projection", 0.5), 1.0);

        let resnet = Depths {
            clip: false,
            image_blocks: 8,
            text_blocks: 0,
            resnet_stages: vec![2, 2, 2, 2],
        };
        assert_eq!(resnet.of("bn1.running_mean").layer, 0);
        assert_eq!(resnet.of("layer1.0.conv1.weight").layer, 1);
        assert_eq!(resnet.of("layer2.1.downsample.0.weight").layer, 4);
        assert_eq!(resnet.of("layer4.1.bn2.weight").layer, 8);
        assert_eq!(resnet.of("projector.0.weight"), Depth { layer: 9, top: 9 });
    }
}
