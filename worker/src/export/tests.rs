//! Exports of tiny models: what each file holds, that contrail reads its own timm and
//! torchvision exports back into the same features, and the refusals. That the Python
//! libraries load them and compute `contrail embed`'s embeddings is the e2e test
//! `cli/tests/e2e/export_cli.rs`.

use super::*;
use crate::model::init_weights::Tower;
use crate::model::BuildOptions;
use crate::tokenize::ByteTokenizer;
use contrail_common::config::{
    BlockKind, EncoderKind, NormKind, ObjectiveKind, StemKind, TextKind, TextMode, TextSettings,
    VitSettings, VitStyle,
};
use tch::{Device, Kind};

fn vit_job(kind: ObjectiveKind, style: VitStyle) -> JobConfig {
    let mut job = JobConfig::default();
    job.objective.kind = kind;
    job.data.image_size = 16;
    job.model.encoder = EncoderKind::Vit;
    job.model.vit = VitSettings {
        patch_size: 8,
        width: 16,
        layers: 2,
        heads: 2,
        mlp_ratio: 2.0,
        style,
    };
    job.model.text = TextSettings {
        context_length: 8,
        width: 16,
        layers: 1,
        heads: 2,
        ..Default::default()
    };
    job.model.projector_out = 8;
    job
}

fn resnet_job() -> JobConfig {
    let mut job = JobConfig::default();
    job.data.image_size = 32;
    job.model.layers = vec![2, 2, 2, 2];
    job.model.block = BlockKind::Basic;
    job.model.width = 64;
    job.model.stem = StemKind::Imagenet;
    job.model.norm = NormKind::Batch;
    job
}

fn build(job: &JobConfig, seed: i64) -> ContrastiveModel {
    let tokenizer = ByteTokenizer::new();
    let opts = BuildOptions {
        tokenizer: (job.objective.kind == ObjectiveKind::Clip).then_some(&tokenizer as _),
        ..Default::default()
    };
    tch::manual_seed(seed);
    ContrastiveModel::build(job, Device::Cpu, opts).unwrap()
}

fn run(job: &JobConfig, model: &ContrastiveModel, format: ExportFormat) -> Result<Export> {
    let tokenizer = ByteTokenizer::new();
    export(
        &ExportInput {
            cfg: job,
            model,
            tokenizer: (job.objective.kind == ObjectiveKind::Clip).then_some(&tokenizer as _),
            tokenizer_json: None,
        },
        format,
    )
}

fn file<'a>(export: &'a Export, name: &str) -> &'a [u8] {
    &export
        .files
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} was not written"))
        .1
}

fn tensors(export: &Export, name: &str) -> Vec<(String, Tensor)> {
    crate::train::checkpoint::safetensors_to_tensors(file(export, name)).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn open_clip_gets_every_variable_and_the_sizes_it_builds_from() {
    let job = vit_job(ObjectiveKind::Clip, VitStyle::OpenClip);
    let model = build(&job, 1);
    let out = run(&job, &model, ExportFormat::OpenClip).unwrap();
    let written = tensors(&out, "open_clip_model.safetensors");
    let vars = model.var_store().variables();
    assert_eq!(written.len(), vars.len());
    for (name, t) in &written {
        assert_eq!(max_diff(t, &vars[name]), 0.0, "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(file(&out, "open_clip_config.json")).unwrap();
    let m = &config["model_cfg"];
    assert_eq!(m["embed_dim"], 8);
    assert_eq!(m["quick_gelu"], false);
    assert_eq!(m["vision_cfg"]["head_width"], 8);
    assert_eq!(m["vision_cfg"]["layers"], 2);
    assert_eq!(m["text_cfg"]["vocab_size"], ByteTokenizer::VOCAB_SIZE);
    assert_eq!(m["text_cfg"]["context_length"], 8);
    assert_eq!(config["preprocess_cfg"]["size"], 16);
    assert_eq!(config["contrail"]["eot_id"], ByteTokenizer::EOT);
}

#[test]
fn a_timm_export_reads_back_into_the_same_tower() {
    for (kind, style) in [
        (ObjectiveKind::Simclr, VitStyle::Timm),
        (ObjectiveKind::Clip, VitStyle::OpenClip),
    ] {
        let job = vit_job(kind, style);
        let model = build(&job, 2);
        let out = run(&job, &model, ExportFormat::Timm).unwrap();
        let written = tensors(&out, "model.safetensors");
        let names: Vec<&str> = written.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"cls_token") && names.contains(&"blocks.1.attn.qkv.weight"));
        assert_eq!(
            names.contains(&"norm_pre.weight"),
            style == VitStyle::OpenClip
        );
        assert!(!names.iter().any(|n| n.starts_with("projector")));
        let prefix = if kind == ObjectiveKind::Clip {
            "visual."
        } else {
            ""
        };
        let vars = model.var_store().variables();
        let head = &written.iter().find(|(n, _)| n == "head.weight").unwrap().1;
        assert_eq!(max_diff(head, &vars[&format!("{prefix}proj")].tr()), 0.0);

        // contrail's own timm reader puts every tensor back where it came from, the
        // projection too (`head` with a zero bias).
        let mut fresh = build(&job, 3);
        let plan = fresh.load_initial(&written, false).unwrap();
        assert!(plan.towers.contains(&Tower::Image));
        let fresh_vars = fresh.var_store().variables();
        for (name, var) in &vars {
            let local = name.strip_prefix(prefix).unwrap_or(name);
            if name.starts_with(prefix) && !local.starts_with("projector") {
                assert_eq!(max_diff(var, &fresh_vars[name]), 0.0, "{kind:?} {name}");
            }
        }
        let config: serde_json::Value = serde_json::from_slice(file(&out, "config.json")).unwrap();
        assert_eq!(
            config["model_args"]["pre_norm"],
            style == VitStyle::OpenClip
        );
        assert_eq!(config["model_args"]["depth"], 2);
        assert_eq!(
            config["num_classes"],
            if kind == ObjectiveKind::Clip { 8 } else { 16 }
        );
    }
}

#[test]
fn a_torchvision_export_reads_back_into_the_same_features() {
    let job = resnet_job();
    let model = build(&job, 4);
    let out = run(&job, &model, ExportFormat::Torchvision).unwrap();
    let written = tensors(&out, "model.safetensors");
    assert!(written
        .iter()
        .any(|(n, t)| n == "bn1.num_batches_tracked" && t.kind() == Kind::Int64));
    assert!(!written.iter().any(|(n, _)| n.starts_with("projector")));
    let weights: Vec<(String, Tensor)> = written
        .into_iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .collect();
    let mut fresh = build(&job, 5);
    fresh.load_initial(&weights, false).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (a, b) = tch::no_grad(|| (model.encode_t(&x, false), fresh.encode_t(&x, false)));
    assert_eq!(max_diff(&a, &b), 0.0);
    let config: serde_json::Value = serde_json::from_slice(file(&out, "config.json")).unwrap();
    assert_eq!(config["architecture"], "resnet18");
}

#[test]
fn a_bert_tower_gets_hugging_face_names_and_config() {
    let mut job = vit_job(ObjectiveKind::Clip, VitStyle::OpenClip);
    job.model.text.kind = TextKind::Bert;
    job.model.text.max_positions = 12;
    let model = build(&job, 7);
    let tokenizer = ByteTokenizer::new();
    let out = export(
        &ExportInput {
            cfg: &job,
            model: &model,
            tokenizer: Some(&tokenizer),
            tokenizer_json: Some(b"{\"the\": \"job's tokenizer.json\"}"),
        },
        ExportFormat::Hf,
    )
    .unwrap();
    let written = tensors(&out, "model.safetensors");
    let vars = model.var_store().variables();
    assert_eq!(
        written.len(),
        vars.keys().filter(|n| n.starts_with("bert.")).count()
    );
    for (name, t) in &written {
        assert_eq!(max_diff(t, &vars[&format!("bert.{name}")]), 0.0, "{name}");
    }
    assert!(written
        .iter()
        .any(|(n, _)| n == "encoder.layer.0.attention.self.query.weight"));
    let projection = tensors(&out, "text_projection.safetensors");
    assert_eq!(max_diff(&projection[0].1, &vars["text_projection"]), 0.0);
    let config: serde_json::Value = serde_json::from_slice(file(&out, "config.json")).unwrap();
    assert_eq!(config["model_type"], "bert");
    assert_eq!(config["hidden_size"], 16);
    assert_eq!(config["intermediate_size"], 64);
    assert_eq!(config["max_position_embeddings"], 12);
    assert_eq!(config["vocab_size"], ByteTokenizer::VOCAB_SIZE);
    assert_eq!(
        file(&out, "tokenizer.json"),
        b"{\"the\": \"job's tokenizer.json\"}"
    );
}

#[test]
fn models_a_library_cannot_build_are_refused_by_name() {
    let refusal = |job: &JobConfig, format: ExportFormat| -> String {
        let model = build(job, 6);
        match run(job, &model, format) {
            Ok(_) => panic!("{format:?} accepted"),
            Err(e) => format!("{e:#}"),
        }
    };
    let simclr = vit_job(ObjectiveKind::Simclr, VitStyle::OpenClip);
    assert!(refusal(&simclr, ExportFormat::OpenClip).contains("simclr model"));
    assert!(refusal(&simclr, ExportFormat::Torchvision).contains("is a ViT"));
    let mut bidirectional = vit_job(ObjectiveKind::Clip, VitStyle::OpenClip);
    bidirectional.model.text.mode = TextMode::Bidirectional;
    assert!(refusal(&bidirectional, ExportFormat::OpenClip).contains("bidirectional"));
    let mut bert = vit_job(ObjectiveKind::Clip, VitStyle::OpenClip);
    bert.model.text.kind = TextKind::Bert;
    assert!(refusal(&bert, ExportFormat::OpenClip).contains("text tower is a BERT"));
    let timm_style = vit_job(ObjectiveKind::Clip, VitStyle::Timm);
    assert!(refusal(&timm_style, ExportFormat::OpenClip).contains("--format timm"));
    let mut cifar = resnet_job();
    cifar.model.stem = StemKind::Cifar;
    assert!(refusal(&cifar, ExportFormat::Torchvision).contains("CIFAR stem"));
    let mut odd = resnet_job();
    odd.model.layers = vec![1, 1, 1, 1];
    assert!(refusal(&odd, ExportFormat::Torchvision).contains("match no torchvision ResNet"));
    assert!(refusal(&resnet_job(), ExportFormat::Timm).contains("is a ResNet"));
    assert!(refusal(&resnet_job(), ExportFormat::Hf).contains("only a BERT or RoBERTa text tower"));
    assert!(refusal(&bert, ExportFormat::Hf).contains("byte tokenizer"));
}
