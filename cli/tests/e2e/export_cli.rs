//! `contrail export` as a user runs it: a model exported for open_clip, timm, torchvision and
//! (a BERT text tower) Hugging Face transformers loads in the pinned Python library
//! (`tests/fixtures/reference/export/check_export.py`, the project's .venv) and computes, on the same PNG images and captions, the embeddings
//! `contrail embed` wrote for them (within 1e-4). The models are the untrained ones of
//! `--random-init` (seeded by `train.seed`, so `embed` and `export` build the same one);
//! every weight is random and non-trivial, so a tensor in the wrong place shows.

use std::path::{Path, PathBuf};
use std::process::Command;

use contrail_test_support as support;

const CONTRAIL: &str = env!("CARGO_BIN_EXE_contrail");
const SIMCLR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/local-simclr.toml");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("starts");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{cmd:?}\n{stdout}\n{stderr}");
    stdout.into_owned()
}

fn python() -> Command {
    let python = root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test.sh",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg(root().join("tests/fixtures/reference/export/check_export.py"));
    cmd
}

/// `contrail SUBCOMMAND --config CONFIG --random-init ARGS --set SET...`.
fn contrail(sub: &str, config: &str, args: &[&str], set: &[&str]) -> String {
    let mut cmd = Command::new(CONTRAIL);
    cmd.args([sub, "--config", config, "--random-init"])
        .args(args);
    for s in set {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

struct Case<'a> {
    name: &'a str,
    config: &'a str,
    set: Vec<&'a str>,
    tower: &'a str,
    formats: &'a [&'a str],
}

#[test]
fn exports_load_in_open_clip_timm_torchvision_and_transformers_and_embed_as_contrail_does() {
    let dir = support::cluster::temp_dir("e2e", "export-cli");
    let src = dir.join("src");
    run(python()
        .args(["images", src.to_str().unwrap(), "12", "32"])
        .current_dir(&dir));
    let listing = src.join("listing.csv");
    let data = dir.join("data");
    let mut import = Command::new(CONTRAIL);
    import.args([
        "data",
        "import",
        "--format",
        "csv",
        "--source",
        listing.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--shard-size",
        "5",
    ]);
    run(&mut import);
    let shards = data.join("train");

    let clip_set: Vec<&str> = support::SMALL_CLIP
        .iter()
        .copied()
        .chain(["data.image_size=32", "model.vit.layers=2"])
        .collect();
    let bert_tokenizer = format!(
        "model.text.tokenizer=file://{}",
        root()
            .join("tests/fixtures/reference/bert/tokenizer.json")
            .display()
    );
    let bert_set: Vec<&str> = clip_set
        .iter()
        .copied()
        .chain(["model.text.kind=bert", bert_tokenizer.as_str()])
        .collect();
    // A RoBERTa tower on the same (BERT-vocabulary) tokenizer, as Chinese RoBERTa-wwm's.
    let roberta_set: Vec<&str> = clip_set
        .iter()
        .copied()
        .chain(["model.text.kind=roberta", bert_tokenizer.as_str()])
        .collect();
    let cases = [
        Case {
            name: "clip-vit",
            config: support::LOCAL_CLIP_CONFIG,
            set: clip_set,
            tower: "both",
            formats: &["open_clip", "timm"],
        },
        Case {
            name: "clip-bert",
            config: support::LOCAL_CLIP_CONFIG,
            set: bert_set,
            tower: "text",
            formats: &["hf"],
        },
        Case {
            name: "clip-roberta",
            config: support::LOCAL_CLIP_CONFIG,
            set: roberta_set,
            tower: "text",
            formats: &["hf"],
        },
        Case {
            name: "simclr-timm-vit",
            config: SIMCLR,
            set: vec![
                "data.image_size=32",
                "model.encoder=vit",
                "model.vit.style=timm",
                "model.vit.patch_size=8",
                "model.vit.width=32",
                "model.vit.layers=2",
                "model.vit.heads=2",
            ],
            tower: "image",
            formats: &["timm"],
        },
        Case {
            name: "simclr-resnet18",
            config: SIMCLR,
            set: vec![
                "data.image_size=32",
                "model.stem=imagenet",
                "model.width=64",
                "model.layers=[2, 2, 2, 2]",
                "model.block=basic",
            ],
            tower: "image",
            formats: &["torchvision"],
        },
    ];
    for case in &cases {
        let emb = dir.join(format!("{}-emb", case.name));
        let out = contrail(
            "embed",
            case.config,
            &[
                "--data",
                shards.to_str().unwrap(),
                "--out",
                emb.to_str().unwrap(),
                "--tower",
                case.tower,
                "--batch",
                "4",
                "--device",
                "cpu",
            ],
            &case.set,
        );
        assert!(out.contains("wrote 12 rows in 3 parts"), "{out}");
        for format in case.formats {
            let export = dir.join(format!("{}-{format}", case.name));
            let out = contrail(
                "export",
                case.config,
                &["--format", format, "--out", export.to_str().unwrap()],
                &case.set,
            );
            assert!(out.contains(&format!("for {format}")), "{out}");
            let checked = run(python().args([
                "check",
                format,
                export.to_str().unwrap(),
                listing.to_str().unwrap(),
                emb.to_str().unwrap(),
            ]));
            eprintln!("{}: {checked}", case.name);
            let lines = checked.lines().filter(|l| l.contains("max |diff|")).count();
            let comparisons = match *format {
                "open_clip" | "torchvision" => 2,
                _ => 1,
            };
            assert_eq!(lines, comparisons, "{checked}");
            if *format == "hf" {
                let class = if case.name.contains("roberta") {
                    "RobertaModel"
                } else {
                    "BertModel"
                };
                assert!(
                    checked.contains(&format!("transformers {class} ")),
                    "{checked}"
                );
            }
        }
    }

    // A model the library cannot hold is refused, and nothing is written.
    let refused = dir.join("refused");
    let out = Command::new(CONTRAIL)
        .args(["export", "--config", SIMCLR, "--random-init", "--format"])
        .args(["torchvision", "--out", refused.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CIFAR stem"), "{err}");
    assert!(!refused.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
