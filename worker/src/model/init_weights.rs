//! Initial weights from another model (`model.init_weights`): which tensor of the file goes to
//! which model variable, and whether that is enough to start from.
//!
//! A model's variables fall into towers: the image tower (ResNet or ViT, `visual.*` in a CLIP
//! model), the text tower (CLIP), and the heads (projector, SwAV prototypes, `logit_scale`, a
//! non-CLIP ViT's `proj`), which a pretrained file rarely has. A tower is *chosen* when the
//! file provides any of its variables; then, unless `model.init_partial`, every variable of
//! it must be there with its shape, or the job refuses to start and lists what is missing and
//! what the file holds instead; a tensor the file has inside a chosen tower's modules that
//! the model has no variable for (`resblocks.12` in a 12-block model) is refused the same way.
//! Files name things with a prefix more often than not (`module.`
//! from DDP, `model.`, open_clip's `visual.` when only the image tower is wanted), so the
//! names are matched under the one prefix mapping that matches most of them.
//!
//! timm's ViT names (`patch_embed.proj.weight`, `blocks.N.attn.qkv.weight`, ...) are translated
//! to contrail's (open_clip's) first, see [`translate_timm`]; the model must then be built with
//! `model.vit.style = "timm"`.
//!
//! PyTorch's `.pt`/`.bin` files are pickles and are not read here; safetensors only
//! (scripts/to_safetensors.py converts them).

use std::collections::HashMap;
use tch::Tensor;

/// Where a timm ViT's tensors go in contrail's ViT, by name after the block index.
const TIMM_BLOCK: &[(&str, &str)] = &[
    ("norm1.", "ln_1."),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."),
    ("norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
];

/// A file holding a timm `VisionTransformer` (found by its `patch_embed.proj.weight`, under
/// any prefix) with its tensors renamed to contrail's ViT names under the same prefix: the
/// class token and positional embedding lose their leading 1-dimensions, `norm` becomes
/// `ln_post` (and a CLIP tower's `norm_pre` `ln_pre`), the blocks' names become
/// `transformer.resblocks.N.*`. A bias-free classifier (`head.weight` with no or an all-zero
/// `head.bias`, as `contrail export --format timm` writes a tower's projection) becomes `proj`,
/// transposed; a real classifier keeps its names (and matches nothing). None when the file is
/// not timm's.
pub fn translate_timm(named: &[(String, Tensor)]) -> Option<Vec<(String, Tensor)>> {
    let prefix = named
        .iter()
        .find_map(|(n, _)| n.strip_suffix("patch_embed.proj.weight"))?
        .to_string();
    let rename = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(prefix.as_str())?;
        let ours = match rest {
            "cls_token" => "class_embedding".to_string(),
            "pos_embed" => "positional_embedding".to_string(),
            "patch_embed.proj.weight" => "conv1.weight".to_string(),
            "patch_embed.proj.bias" => "conv1.bias".to_string(),
            // timm's CLIP towers (`pre_norm`), as `contrail export --format timm` writes them.
            "norm_pre.weight" => "ln_pre.weight".to_string(),
            "norm_pre.bias" => "ln_pre.bias".to_string(),
            "norm.weight" => "ln_post.weight".to_string(),
            "norm.bias" => "ln_post.bias".to_string(),
            _ => {
                let (index, tail) = rest.strip_prefix("blocks.")?.split_once('.')?;
                let (from, to) = TIMM_BLOCK.iter().find(|(from, _)| tail.starts_with(from))?;
                format!("transformer.resblocks.{index}.{to}{}", &tail[from.len()..])
            }
        };
        Some(format!("{prefix}{ours}"))
    };
    let head_bias = format!("{prefix}head.bias");
    let head_weight = format!("{prefix}head.weight");
    let projection = named.iter().any(|(n, _)| *n == head_weight)
        && named
            .iter()
            .find(|(n, _)| *n == head_bias)
            .is_none_or(|(_, b)| b.abs().max().double_value(&[]) == 0.0);
    Some(
        named
            .iter()
            .filter(|(name, _)| !(projection && *name == head_bias))
            .map(|(name, t)| match rename(name) {
                Some(ours) if name.ends_with("cls_token") => (ours, t.reshape([-1])),
                Some(ours) if name.ends_with("pos_embed") => (ours, t.squeeze_dim(0)),
                Some(ours) => (ours, t.shallow_clone()),
                None if projection && *name == head_weight => {
                    (format!("{prefix}proj"), t.transpose(0, 1))
                }
                None => (name.clone(), t.shallow_clone()),
            })
            .collect(),
    )
}

/// Which part of the model a variable belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tower {
    Image,
    Text,
    Head,
}

impl Tower {
    pub fn name(self) -> &'static str {
        match self {
            Tower::Image => "image",
            Tower::Text => "text",
            Tower::Head => "head",
        }
    }
}

/// The prefix mappings tried, as (prefix removed, prefix added): the file's `a.b` becomes
/// the model's `added + b` when it starts with `removed`.
const MAPPINGS: &[(&str, &str)] = &[
    ("", ""),
    ("module.", ""),
    ("model.", ""),
    ("visual.", ""),
    ("module.visual.", ""),
    ("model.visual.", ""),
    ("", "visual."),
    ("module.", "visual."),
    ("model.", "visual."),
    // A Hugging Face BERT's `model.safetensors` (`embeddings.*`, `encoder.*`) into a CLIP
    // model's BERT text tower.
    ("", "bert."),
];

/// What loading a file into a model will do.
#[derive(Debug, Default, PartialEq)]
pub struct InitPlan {
    /// The prefix mapping used, as (removed, added).
    pub mapping: (String, String),
    /// (model variable, index into the file's tensors), sorted by variable.
    pub pairs: Vec<(String, usize)>,
    /// Towers the file provides variables of.
    pub towers: Vec<Tower>,
    /// Variables of chosen towers the file lacks.
    pub missing: Vec<String>,
    /// Tower variables the file has under another shape: "name: file [..], model [..]".
    pub mismatched: Vec<String>,
    /// Head variables the file lacks or has under another shape (they keep their
    /// initialisation; never an error).
    pub heads_kept: Vec<String>,
    /// Tensors of the file that are no variable of the model (under the mapping).
    pub unexpected: Vec<String>,
    /// The file's names were timm's and were translated ([`translate_timm`]).
    pub from_timm: bool,
    /// An image-only ViT's `proj` was set to the identity because the file has none of its
    /// shape: the embedding is then the pretrained tower's own class-token feature.
    pub proj_identity: bool,
    /// Those of `unexpected` that sit inside a module of a chosen tower (the file's model is
    /// deeper or laid out otherwise); BatchNorm's `num_batches_tracked` counters are not.
    pub stray: Vec<String>,
}

impl InitPlan {
    /// Matches `file` (name, shape) against `model` (name → (shape, tower)).
    pub fn new(file: &[(String, Vec<i64>)], model: &HashMap<String, (Vec<i64>, Tower)>) -> Self {
        let mapped = |(removed, added): (&str, &str), name: &str| {
            name.strip_prefix(removed)
                .map(|rest| format!("{added}{rest}"))
        };
        let score = |m: (&str, &str)| {
            file.iter()
                .filter(|(n, _)| mapped(m, n).is_some_and(|v| model.contains_key(&v)))
                .count()
        };
        // The first of the best: the identity wins ties.
        let best = MAPPINGS.iter().copied().fold((("", ""), 0), |acc, m| {
            let s = score(m);
            if s > acc.1 {
                (m, s)
            } else {
                acc
            }
        });
        let mapping = best.0;
        let mut plan = InitPlan {
            mapping: (mapping.0.to_string(), mapping.1.to_string()),
            ..Default::default()
        };
        let mut found: HashMap<&str, (usize, &[i64])> = HashMap::new();
        for (i, (name, shape)) in file.iter().enumerate() {
            match mapped(mapping, name).and_then(|v| model.get_key_value(&v)) {
                Some((var, _)) => {
                    found.insert(var.as_str(), (i, shape.as_slice()));
                }
                None => plan.unexpected.push(name.clone()),
            }
        }
        for (var, (_, tower)) in model {
            if found.contains_key(var.as_str()) && !plan.towers.contains(tower) {
                plan.towers.push(*tower);
            }
        }
        plan.towers.sort();
        for (var, (shape, tower)) in model {
            let given = found.get(var.as_str());
            match (given, tower) {
                (Some((i, s)), _) if *s == shape.as_slice() => plan.pairs.push((var.clone(), *i)),
                (Some((_, s)), Tower::Head) => plan
                    .heads_kept
                    .push(format!("{var}: file {s:?}, model {shape:?}")),
                (Some((_, s)), _) => plan
                    .mismatched
                    .push(format!("{var}: file {s:?}, model {shape:?}")),
                (None, Tower::Head) => plan.heads_kept.push(var.clone()),
                (None, t) if plan.towers.contains(t) => plan.missing.push(var.clone()),
                (None, _) => {}
            }
        }
        // Every module path of the model ("visual.transformer.resblocks.0", ...) and its tower.
        let mut modules: HashMap<String, Tower> = HashMap::new();
        for (var, (_, tower)) in model {
            let parts: Vec<&str> = var.split('.').collect();
            for k in 1..parts.len() {
                modules.insert(parts[..k].join("."), *tower);
            }
        }
        for name in &plan.unexpected {
            let Some(rel) = name.strip_prefix(mapping.0) else {
                continue;
            };
            if rel.ends_with(".num_batches_tracked") {
                continue;
            }
            let parts: Vec<&str> = rel.split('.').collect();
            let inside = (1..parts.len()).rev().find_map(|k| {
                let module = format!("{}{}", mapping.1, parts[..k].join("."));
                modules.get(&module).copied()
            });
            if inside.is_some_and(|t| plan.towers.contains(&t)) {
                plan.stray.push(name.clone());
            }
        }
        plan.pairs.sort();
        for list in [
            &mut plan.missing,
            &mut plan.mismatched,
            &mut plan.heads_kept,
            &mut plan.unexpected,
            &mut plan.stray,
        ] {
            list.sort();
        }
        plan
    }

    /// Why the plan cannot start the job (`partial`: missing variables are allowed), or None.
    pub fn refusal(&self, partial: bool) -> Option<String> {
        if self.pairs.is_empty() {
            return Some(format!(
                "no tensor of the file is a variable of this model under any prefix mapping \
                 (module., model., visual.); the file has {}",
                listing(&self.unexpected)
            ));
        }
        if !self.mismatched.is_empty() {
            return Some(format!(
                "{} tensor(s) have another shape than the model's (another model size in the \
                 config?): {}",
                self.mismatched.len(),
                listing(&self.mismatched)
            ));
        }
        if !partial && !self.stray.is_empty() {
            return Some(format!(
                "the file has {} tensor(s) inside the model's {} tower(s) that the model has no \
                 variable for (a deeper or differently built model than the config says?): {} \
                 (set model.init_partial = true to load the rest)",
                self.stray.len(),
                self.tower_names(),
                listing(&self.stray)
            ));
        }
        if !partial && !self.missing.is_empty() {
            return Some(format!(
                "the file provides the {} tower(s) but lacks {} of their variables: {}; the file's \
                 tensors that match nothing: {} (set model.init_partial = true to start from \
                 what matches)",
                self.tower_names(),
                self.missing.len(),
                listing(&self.missing),
                listing(&self.unexpected)
            ));
        }
        None
    }

    /// "image and text" (the heads are not towers).
    pub fn tower_names(&self) -> String {
        let names: Vec<&str> = self
            .towers
            .iter()
            .filter(|t| **t != Tower::Head)
            .map(|t| t.name())
            .collect();
        names.join(" and ")
    }

    /// "the image tower", "the image and text towers and the heads": where tensors went.
    pub fn destination(&self) -> String {
        let towers = self.tower_names();
        let plural = if towers.contains(" and ") { "s" } else { "" };
        let heads = if self.towers.contains(&Tower::Head) {
            " and the heads"
        } else {
            ""
        };
        match towers.is_empty() {
            true => "the heads".into(),
            false => format!("the {towers} tower{plural}{heads}"),
        }
    }

    /// The mapping in words, or None for the identity.
    pub fn mapping_note(&self) -> Option<String> {
        let (removed, added) = (&self.mapping.0, &self.mapping.1);
        let mut notes = Vec::new();
        if self.from_timm {
            notes.push("timm's ViT names translated".to_string());
        }
        match (removed.is_empty(), added.is_empty()) {
            (true, true) => {}
            (false, true) => notes.push(format!("names without their \"{removed}\" prefix")),
            (true, false) => notes.push(format!("names with \"{added}\" put in front")),
            (false, false) => {
                notes.push(format!("names with \"{removed}\" replaced by \"{added}\""))
            }
        }
        if self.proj_identity {
            notes.push("the ViT's proj set to the identity".to_string());
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}

/// Up to 8 names and how many more.
pub fn listing(names: &[String]) -> String {
    const SHOWN: usize = 8;
    match names.len() {
        0 => "none".into(),
        n if n <= SHOWN => names.join(", "),
        n => format!("{}, ... and {} more", names[..SHOWN].join(", "), n - SHOWN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vars: &[(&str, &[i64], Tower)]) -> HashMap<String, (Vec<i64>, Tower)> {
        vars.iter()
            .map(|(n, s, t)| (n.to_string(), (s.to_vec(), *t)))
            .collect()
    }

    fn file(tensors: &[(&str, &[i64])]) -> Vec<(String, Vec<i64>)> {
        tensors
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    fn clip() -> HashMap<String, (Vec<i64>, Tower)> {
        model(&[
            ("visual.conv1.weight", &[8, 3, 4, 4], Tower::Image),
            ("visual.proj", &[8, 4], Tower::Image),
            ("token_embedding.weight", &[10, 8], Tower::Text),
            ("text_projection", &[8, 4], Tower::Text),
            ("logit_scale", &[], Tower::Head),
        ])
    }

    #[test]
    fn an_open_clip_checkpoint_saved_under_ddp_loads_whole() {
        let f = file(&[
            ("module.visual.conv1.weight", &[8, 3, 4, 4]),
            ("module.visual.proj", &[8, 4]),
            ("module.token_embedding.weight", &[10, 8]),
            ("module.text_projection", &[8, 4]),
            ("module.logit_scale", &[]),
        ]);
        let p = InitPlan::new(&f, &clip());
        assert_eq!(p.mapping, ("module.".into(), "".into()));
        assert_eq!(p.pairs.len(), 5);
        assert_eq!(p.towers, [Tower::Image, Tower::Text, Tower::Head]);
        assert_eq!(p.destination(), "the image and text towers and the heads");
        assert!(p.refusal(false).is_none(), "{p:?}");
        assert_eq!(
            p.mapping_note().unwrap(),
            "names without their \"module.\" prefix"
        );
    }

    #[test]
    fn an_image_only_file_chooses_the_image_tower_of_a_clip_model() {
        // A torchvision-style file (no prefix) into a CLIP model whose image tower is visual.*.
        let f = file(&[
            ("conv1.weight", &[8, 3, 4, 4]),
            ("proj", &[8, 4]),
            ("fc.weight", &[2, 8]),
        ]);
        let p = InitPlan::new(&f, &clip());
        assert_eq!(p.mapping, ("".into(), "visual.".into()));
        assert_eq!(p.towers, [Tower::Image]);
        assert!(p.missing.is_empty(), "the text tower is not chosen: {p:?}");
        assert_eq!(p.unexpected, ["fc.weight"]);
        assert_eq!(p.heads_kept, ["logit_scale"]);
        assert!(p.refusal(false).is_none());
    }

    #[test]
    fn a_chosen_tower_with_gaps_is_refused_unless_partial() {
        let f = file(&[
            ("visual.conv1.weight", &[8, 3, 4, 4]),
            ("token_embedding.weight", &[10, 8]),
            ("other.extra", &[1]),
        ]);
        let p = InitPlan::new(&f, &clip());
        assert_eq!(p.missing, ["text_projection", "visual.proj"]);
        let why = p.refusal(false).expect("strict refuses");
        assert!(
            why.contains("lacks 2 of their variables: text_projection, visual.proj"),
            "{why}"
        );
        assert!(why.contains("match nothing: other.extra"), "{why}");
        assert!(why.contains("init_partial"), "{why}");
        assert!(p.refusal(true).is_none());
    }

    #[test]
    fn a_deeper_file_is_refused_but_classifiers_and_counters_are_not() {
        let m = model(&[
            ("conv1.weight", &[8, 3, 3, 3], Tower::Image),
            ("layer1.0.conv1.weight", &[8, 8, 3, 3], Tower::Image),
            ("projector.0.weight", &[4, 8], Tower::Head),
        ]);
        let mut f = file(&[
            ("conv1.weight", &[8, 3, 3, 3]),
            ("layer1.0.conv1.weight", &[8, 8, 3, 3]),
            ("bn1.num_batches_tracked", &[]),
            ("fc.weight", &[10, 8]),
        ]);
        let p = InitPlan::new(&f, &m);
        assert!(p.stray.is_empty(), "{p:?}");
        assert!(p.refusal(false).is_none());
        f.push(("layer1.1.conv1.weight".into(), vec![8, 8, 3, 3]));
        let p = InitPlan::new(&f, &m);
        assert_eq!(p.stray, ["layer1.1.conv1.weight"]);
        let why = p.refusal(false).expect("a block the model lacks");
        assert!(
            why.contains("no variable for") && why.contains("layer1.1.conv1.weight"),
            "{why}"
        );
        assert!(p.refusal(true).is_none());
        // Under an added prefix the file's own names are what is looked up.
        let clip = clip();
        let p = InitPlan::new(
            &file(&[
                ("conv1.weight", &[8, 3, 4, 4]),
                ("proj", &[8, 4]),
                ("fc.weight", &[2, 8]),
            ]),
            &clip,
        );
        assert!(p.stray.is_empty(), "{p:?}");
    }

    #[test]
    fn nothing_matching_and_wrong_shapes_are_refused_even_when_partial() {
        let p = InitPlan::new(&file(&[("encoder.w", &[3])]), &clip());
        let why = p.refusal(true).expect("0 tensors is never a start");
        assert!(
            why.contains("no tensor of the file") && why.contains("encoder.w"),
            "{why}"
        );

        let f = file(&[
            ("visual.conv1.weight", &[16, 3, 4, 4]),
            ("visual.proj", &[8, 4]),
        ]);
        let p = InitPlan::new(&f, &clip());
        let why = p.refusal(true).expect("shape mismatch");
        assert!(
            why.contains("visual.conv1.weight: file [16, 3, 4, 4], model [8, 3, 4, 4]"),
            "{why}"
        );
    }

    #[test]
    fn timm_names_become_contrails_under_their_prefix() {
        let t = |shape: &[i64]| Tensor::zeros(shape, (tch::Kind::Float, tch::Device::Cpu));
        let file = vec![
            ("module.cls_token".to_string(), t(&[1, 1, 8])),
            ("module.pos_embed".to_string(), t(&[1, 5, 8])),
            (
                "module.patch_embed.proj.weight".to_string(),
                t(&[8, 3, 2, 2]),
            ),
            ("module.blocks.11.attn.qkv.bias".to_string(), t(&[24])),
            ("module.blocks.0.mlp.fc2.weight".to_string(), t(&[8, 32])),
            ("module.norm.bias".to_string(), t(&[8])),
            ("module.head.weight".to_string(), t(&[10, 8])),
        ];
        let out: Vec<(String, Vec<i64>)> = translate_timm(&file)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        let want: Vec<(String, Vec<i64>)> = [
            ("module.class_embedding", vec![8]),
            ("module.positional_embedding", vec![5, 8]),
            ("module.conv1.weight", vec![8, 3, 2, 2]),
            (
                "module.transformer.resblocks.11.attn.in_proj_bias",
                vec![24],
            ),
            (
                "module.transformer.resblocks.0.mlp.c_proj.weight",
                vec![8, 32],
            ),
            ("module.ln_post.bias", vec![8]),
            // A classifier without a bias is a projection (an exported tower's `proj`).
            ("module.proj", vec![8, 10]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        assert_eq!(out, want);
        // A trained classifier (a bias) keeps its names and matches nothing.
        let mut classifier: Vec<(String, Tensor)> = file
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        classifier.push((
            "module.head.bias".to_string(),
            Tensor::ones([10], (tch::Kind::Float, tch::Device::Cpu)),
        ));
        let names: Vec<String> = translate_timm(&classifier)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            names.contains(&"module.head.weight".to_string())
                && !names.contains(&"module.proj".to_string())
        );
        assert!(
            translate_timm(&file[..1]).is_none(),
            "no patch_embed: not timm's"
        );
    }

    #[test]
    fn a_head_of_another_shape_keeps_its_initialisation() {
        let m = model(&[
            ("conv1.weight", &[8, 3, 4, 4], Tower::Image),
            ("proj", &[8, 8], Tower::Head),
        ]);
        // open_clip's visual tower into an image-only ViT: proj is 8 x 4 there.
        let f = file(&[
            ("visual.conv1.weight", &[8, 3, 4, 4]),
            ("visual.proj", &[8, 4]),
        ]);
        let p = InitPlan::new(&f, &m);
        assert_eq!(p.mapping, ("visual.".into(), "".into()));
        assert_eq!(p.pairs, [("conv1.weight".to_string(), 0)]);
        assert_eq!(p.heads_kept, ["proj: file [8, 4], model [8, 8]"]);
        assert!(p.refusal(false).is_none());
    }
}
