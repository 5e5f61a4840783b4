//! The BERT text tower (`model.text.kind = "bert"`, model::bert) and `tokenizer.json`
//! tokenization against Hugging Face transformers 5.25.0 / tokenizers 0.23.3: a tiny
//! `BertModel` with seeded random weights and a WordPiece vocabulary of Chinese characters and
//! English pieces (Chinese-CLIP's text tower is such a BERT).
//!
//! Fixtures: tests/fixtures/reference/bert/{tokenizer.json, model.safetensors, io.safetensors,
//! captions.json}, written by make_fixtures.py next to them (hidden 32, 2 layers, 4 heads,
//! intermediate 64, 40 positions; context 16; embed 16).

use contrail_common::config::{EncoderKind, ObjectiveKind, TextKind, TextPooling};
use contrail_common::JobConfig;
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::tokenize::{HfTokenizer, Tokenizer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Device, Tensor};

const TOLERANCE: f64 = 1e-4;
const CONTEXT: usize = 16;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference/bert")
        .join(name)
}

fn tensors(name: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixture(name))
        .unwrap_or_else(|e| panic!("reading {name}: {e} (regenerate with make_fixtures.py)"))
}

fn io() -> BTreeMap<String, Tensor> {
    tensors("io.safetensors").into_iter().collect()
}

fn captions() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixture("captions.json")).unwrap()).unwrap()
}

fn tokenizer() -> HfTokenizer {
    HfTokenizer::from_file(fixture("tokenizer.json")).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A CLIP job whose text tower is the fixture's BERT (the ViT image tower is not loaded).
fn job(pooling: TextPooling) -> JobConfig {
    let mut job = JobConfig::default();
    job.objective.kind = ObjectiveKind::Clip;
    job.data.image_size = 16;
    job.model.encoder = EncoderKind::Vit;
    job.model.vit.patch_size = 8;
    job.model.vit.width = 16;
    job.model.vit.layers = 1;
    job.model.vit.heads = 2;
    job.model.projector_out = 16;
    let t = &mut job.model.text;
    t.kind = TextKind::Bert;
    t.pooling = pooling;
    t.context_length = CONTEXT as u32;
    t.width = 32;
    t.layers = 2;
    t.heads = 4;
    t.mlp_ratio = 2.0;
    t.max_positions = 40;
    job
}

#[test]
fn chinese_and_english_captions_tokenize_as_transformers_does() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 65);
    let captions = captions();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let ours = tok.encode_batch(&refs, CONTEXT).unwrap();
    let theirs = &io()["ids"];
    assert_eq!(ours.size(), theirs.size());
    for i in 0..captions.len() as i64 {
        assert_eq!(
            Vec::<i64>::try_from(ours.get(i)).unwrap(),
            Vec::<i64>::try_from(theirs.get(i)).unwrap(),
            "caption {i}: {:?}",
            captions[i as usize]
        );
    }
}

/// A Hugging Face `model.safetensors` of a `BertModel` loads into the CLIP model's text tower
/// (the `bert.` mapping; `pooler.*` listed as unused; `text_projection` is a head the file
/// lacks), and with the fixture's projection the caption embeddings are transformers' hidden
/// states pooled at `[CLS]` (Chinese-CLIP) or averaged over the tokens.
#[test]
fn a_hugging_face_bert_loads_and_embeds_as_transformers_does() {
    let io = io();
    let tok = tokenizer();
    for (pooling, expected) in [
        (TextPooling::Cls, "cls_features"),
        (TextPooling::Mean, "mean_features"),
    ] {
        tch::manual_seed(0);
        let opts = BuildOptions {
            tokenizer: Some(&tok),
            ..Default::default()
        };
        let mut model = ContrastiveModel::build(&job(pooling), Device::Cpu, opts).unwrap();
        let plan = model
            .load_initial(&tensors("model.safetensors"), false)
            .unwrap();
        assert_eq!(plan.mapping, ("".to_string(), "bert.".to_string()));
        assert_eq!(
            plan.pairs.len(),
            37,
            "every BertModel tensor but the pooler's"
        );
        assert!(plan.unexpected.iter().any(|n| n.starts_with("pooler.")));
        assert!(plan.heads_kept.iter().any(|n| n == "text_projection"));
        let projection = model.var_store().variables()["text_projection"].shallow_clone();
        tch::no_grad(|| projection.shallow_clone().copy_(&io["text_projection"]));
        let features = model.export_texts(&io["ids"]).unwrap();
        let diff = max_diff(&features, &io[expected]);
        assert!(diff <= TOLERANCE, "{pooling:?}: differs by {diff}");
    }
}

/// `model.text.kind = "roberta"`: a Hugging Face `RobertaModel` (XLM-R's layout: positions
/// from the pad id + 1 over the non-pad tokens, one token type, LayerNorm ε 1e-5) loads by
/// name and embeds as transformers does.
#[test]
fn a_hugging_face_roberta_loads_and_embeds_as_transformers_does() {
    let io = io();
    let tok = tokenizer();
    let mut roberta = job(TextPooling::Cls);
    roberta.model.text.kind = TextKind::Roberta;
    tch::manual_seed(0);
    let opts = BuildOptions {
        tokenizer: Some(&tok),
        ..Default::default()
    };
    let mut model = ContrastiveModel::build(&roberta, Device::Cpu, opts).unwrap();
    let plan = model
        .load_initial(&tensors("roberta_model.safetensors"), false)
        .unwrap();
    assert_eq!(plan.mapping, ("".to_string(), "bert.".to_string()));
    assert!(plan.unexpected.is_empty(), "{:?}", plan.unexpected);
    let projection = model.var_store().variables()["text_projection"].shallow_clone();
    tch::no_grad(|| projection.shallow_clone().copy_(&io["text_projection"]));
    let features = model.export_texts(&io["ids"]).unwrap();
    let diff = max_diff(&features, &io["roberta_cls_features"]);
    assert!(diff <= TOLERANCE, "differs by {diff}");
    // The BERT weights in a RoBERTa are refused: one token type less.
    let e = model
        .load_initial(&tensors("model.safetensors"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_type_embeddings"), "{e}");
}

#[test]
fn a_position_table_shorter_than_the_captions_is_refused() {
    let mut bad = job(TextPooling::Cls);
    bad.model.text.max_positions = 8;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("model.text.max_positions"), "{e}");
}
