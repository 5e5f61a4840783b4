//! The CLIP towers (model::vit, model::text) against open_clip 3.3.0: a tiny `CLIP` model with
//! seeded random weights, loaded here by open_clip's parameter names.
//!
//! Fixtures: tests/fixtures/reference/clip_towers/{weights,io}.safetensors, written by
//! make_fixtures.py next to them (vision: image 32, patch 8, width 32, 2 layers, 4 heads; text:
//! context 16, vocab 300, width 32, 2 layers, 4 heads; embed 16). The fixture's EOT id (299)
//! is the largest id of every row, so open_clip's argmax pooling and contrail's first-EOT
//! pooling pick the same position (checked below).

use contrail_common::config::{Activation, VitStyle};
use contrail_worker::model::text::{TextConfig, TextMode, TextTransformer};
use contrail_worker::model::vit::{VisionTransformer, VitConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

fn read(name: &str) -> BTreeMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference/clip_towers")
        .join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (regenerate with make_fixtures.py)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

struct Fixture {
    weights: BTreeMap<String, Tensor>,
    io: BTreeMap<String, Tensor>,
}

impl Fixture {
    fn load() -> Self {
        Self {
            weights: read("weights.safetensors"),
            io: read("io.safetensors"),
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.io
            .get(name)
            .unwrap_or_else(|| panic!("io fixture lacks {name}"))
    }

    fn size(&self, key: &str) -> i64 {
        self.get(&format!("config.{key}")).int64_value(&[])
    }

    fn vit_config(&self) -> VitConfig {
        let width = self.size("vision_width");
        VitConfig {
            image_size: self.size("vision_image_size"),
            patch_size: self.size("vision_patch_size"),
            width,
            layers: self.size("vision_layers"),
            heads: width / self.size("vision_head_width"),
            mlp_ratio: 4.0,
            output_dim: self.size("embed_dim"),
            activation: Activation::Gelu,
            style: VitStyle::OpenClip,
        }
    }

    fn text_config(&self, mode: TextMode) -> TextConfig {
        TextConfig {
            context_length: self.size("text_context_length"),
            vocab_size: self.size("text_vocab_size"),
            width: self.size("text_width"),
            layers: self.size("text_layers"),
            heads: self.size("text_heads"),
            mlp_ratio: 4.0,
            output_dim: self.size("embed_dim"),
            mode,
            pad_id: self.size("pad_id"),
            eot_id: self.size("eot_id"),
            activation: Activation::Gelu,
        }
    }
}

/// Both towers on one VarStore, as in open_clip's CLIP: vision under `visual`, text on the root.
struct Towers {
    vs: nn::VarStore,
    vit: VisionTransformer,
    text: TextTransformer,
}

fn build(f: &Fixture, mode: TextMode, device: Device) -> Towers {
    build_with(f, mode, device, Activation::Gelu)
}

fn build_with(f: &Fixture, mode: TextMode, device: Device, activation: Activation) -> Towers {
    let vs = nn::VarStore::new(device);
    let vit_cfg = VitConfig {
        activation,
        ..f.vit_config()
    };
    let text_cfg = TextConfig {
        activation,
        ..f.text_config(mode)
    };
    let vit = VisionTransformer::new(&(vs.root() / "visual"), &vit_cfg).unwrap();
    let text = TextTransformer::new(&vs.root(), &text_cfg).unwrap();
    Towers { vs, vit, text }
}

/// Copies every variable from the open_clip state dict by name (shapes checked).
fn load(f: &Fixture, mode: TextMode) -> Towers {
    load_on(f, mode, Device::Cpu)
}

fn load_on(f: &Fixture, mode: TextMode, device: Device) -> Towers {
    fill(f, build(f, mode, device))
}

fn fill(f: &Fixture, towers: Towers) -> Towers {
    tch::no_grad(|| {
        for (name, var) in towers.vs.variables() {
            let src = f
                .weights
                .get(&name)
                .unwrap_or_else(|| panic!("open_clip has no parameter {name}"));
            assert_eq!(var.size(), src.size(), "{name}");
            var.shallow_clone().copy_(src);
        }
    });
    towers
}

/// `model.activation = "quick_gelu"`: both towers against open_clip's `CLIP(quick_gelu=True)`
/// with the same weights (what OpenAI-trained checkpoints need).
#[test]
fn quick_gelu_towers_equal_open_clip_quickgelu() {
    let f = Fixture::load();
    let t = fill(
        &f,
        build_with(&f, TextMode::Causal, Device::Cpu, Activation::QuickGelu),
    );
    let (img, txt) =
        tch::no_grad(|| (t.vit.forward(f.get("image")), t.text.forward(f.get("text"))));
    assert_close("quickgelu image", &img, f.get("quickgelu.image_features"));
    assert_close("quickgelu text", &txt, f.get("quickgelu.text_features"));
    // GELU on the same weights is measurably off: the setting matters.
    assert!(max_diff(&img, f.get("image_features")) > 100.0 * TOLERANCE);
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let diff = max_diff(got, want);
    println!("{what}: max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "{what}: max abs diff {diff}");
}

#[test]
fn parameter_names_and_shapes_equal_open_clip() {
    let f = Fixture::load();
    let towers = build(&f, TextMode::Causal, Device::Cpu);
    let ours: BTreeMap<String, Vec<i64>> = towers
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    let mut theirs: BTreeMap<String, Vec<i64>> = f
        .weights
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    // The temperature belongs to the CLIP model (the objective), not to either tower.
    assert_eq!(theirs.remove("logit_scale"), Some(vec![]));
    assert_eq!(ours, theirs);
    // Vision: 8 + 2 blocks × 12; text: 5 + 2 blocks × 12. All of them trainable.
    assert_eq!(ours.len(), 61);
    assert_eq!(towers.vs.trainable_variables().len(), 61);
}

#[test]
fn vision_tower_matches_open_clip() {
    let f = Fixture::load();
    let t = load(&f, TextMode::Causal);
    let out = tch::no_grad(|| t.vit.forward(f.get("image")));
    assert_close("image_features", &out, f.get("image_features"));
}

#[test]
fn text_tower_matches_open_clip() {
    let f = Fixture::load();
    let t = load(&f, TextMode::Causal);
    let text = f.get("text");
    // The fixture is built so argmax (open_clip) and first EOT (contrail) agree.
    assert!(t.text.end_positions(text).equal(&text.argmax(-1, false)));
    let (hidden, out) = tch::no_grad(|| (t.text.hidden_states(text), t.text.forward(text)));
    assert_close("text_hidden", &hidden, f.get("text_hidden"));
    assert_close("text_features", &out, f.get("text_features"));
}

#[test]
fn bidirectional_text_matches_open_clip_pad_mask_and_mean() {
    let f = Fixture::load();
    let t = load(&f, TextMode::Bidirectional);
    let out = tch::no_grad(|| t.text.forward(f.get("text")));
    assert_close("bidir_text_features", &out, f.get("bidir_text_features"));
    // And it is a different function from the causal tower.
    assert!(max_diff(&out, f.get("text_features")) > 1e-2);
}

#[test]
fn gradients_match_open_clip() {
    let f = Fixture::load();
    let t = load(&f, TextMode::Causal);
    let loss = (t.vit.forward(f.get("image")) * f.get("grad_weights.image")).sum(Kind::Float)
        + (t.text.forward(f.get("text")) * f.get("grad_weights.text")).sum(Kind::Float);
    loss.backward();
    let vars = t.vs.variables();
    let mut checked = 0;
    for (key, want) in f.io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let grad = vars[name].grad();
        assert!(grad.defined(), "{name}: no gradient");
        assert_close(&format!("d loss / d {name}"), &grad, want);
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} gradients in the fixture");
    // Every parameter of both towers receives a gradient.
    for (name, v) in &vars {
        let g = v.grad();
        assert!(
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}"
        );
    }
}

#[test]
fn causal_mask_hides_later_tokens() {
    let f = Fixture::load();
    let text = f.get("text");
    let changed = text.copy();
    let (row, pos) = (1, 5);
    let old = text.int64_value(&[row, pos]);
    let _ = changed.get(row).get(pos).fill_((old % 297) + 1);
    assert_ne!(changed.int64_value(&[row, pos]), old);
    for (mode, earlier_moves) in [(TextMode::Causal, false), (TextMode::Bidirectional, true)] {
        let t = load(&f, mode);
        let (a, b) = tch::no_grad(|| (t.text.hidden_states(text), t.text.hidden_states(&changed)));
        let before = max_diff(&a.get(row).narrow(0, 0, pos), &b.get(row).narrow(0, 0, pos));
        let after = max_diff(&a.get(row).narrow(0, pos, 2), &b.get(row).narrow(0, pos, 2));
        println!("{mode:?}: positions < {pos} moved {before:.2e}, ≥ {pos} moved {after:.2e}");
        assert!(after > 1e-3, "{mode:?}: the changed token had no effect");
        if earlier_moves {
            assert!(
                before > 1e-4,
                "{mode:?}: earlier positions should see the change"
            );
        } else {
            assert_eq!(
                before, 0.0,
                "{mode:?}: an earlier position saw a later token"
            );
        }
        // Other rows are untouched either way.
        assert_eq!(max_diff(&a.get(0), &b.get(0)), 0.0);
    }
}

contrail_test_support::cpu_and_cuda! {
/// The towers in float32 and bf16 against the same reference, on the CPU and (a GPU test) on
/// the kernels behind CUDA's `scaled_dot_product_attention` (flash for causal bf16,
/// memory-efficient for the padding mask). Tolerances are relative to the output scale: cuDNN
/// convolutions use TF32 by default, and bf16 keeps 8 bits of mantissa.
fn f32_and_bf16_agree_with_open_clip(device: Device) {
    let f = Fixture::load();
    let cuda = device;
    for (kind, rel_tol) in [(Kind::Float, 5e-3), (Kind::BFloat16, 5e-2)] {
        for (mode, want) in [
            (TextMode::Causal, "text_features"),
            (TextMode::Bidirectional, "bidir_text_features"),
        ] {
            let mut t = load_on(&f, mode, cuda);
            t.vs.set_kind(kind);
            let image = f.get("image").to_device(cuda).to_kind(kind);
            let text = f.get("text").to_device(cuda);
            let (img, txt) = tch::no_grad(|| (t.vit.forward(&image), t.text.forward(&text)));
            for (what, got, want) in [
                ("image_features", img, f.get("image_features")),
                (want, txt, f.get(want)),
            ] {
                let got = got.to_device(Device::Cpu).to_kind(Kind::Float);
                let scale = want.abs().max().double_value(&[]);
                let diff = max_diff(&got, want);
                println!(
                    "{device:?} {kind:?} {mode:?} {what}: max abs diff {diff:.2e} (scale {scale:.2})"
                );
                assert!(diff <= rel_tol * scale, "{device:?} {kind:?} {what}: {diff}");
            }
        }
    }
}
}
