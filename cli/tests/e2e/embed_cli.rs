//! `contrail embed` and `contrail eval zeroshot|retrieval` as a user runs them, on a CLIP
//! model: two embedding workers sharing the shards through a local coordinator's leases write
//! the very folder one process writes (every key once, the same rows), and the zero-shot and
//! retrieval commands read it; a model without a text tower is refused by name.

use std::path::Path;

use crate::contrail_output as contrail;
use contrail_data::embeddings::{self, Embeddings, Tower};
use contrail_test_support as support;

const CLIP: &str = support::LOCAL_CLIP_CONFIG;
const SIMCLR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/local-simclr.toml");
/// The coordinator of `--workers` on ports chosen by the OS.
const FREE_PORTS: [&str; 2] = [
    "cluster.grpc_addr=127.0.0.1:0",
    "cluster.http_addr=127.0.0.1:0",
];

fn embed(config: &str, data: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "embed",
        "--config",
        config,
        "--random-init",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "8",
    ];
    for s in support::SMALL_CLIP.iter().chain(&FREE_PORTS) {
        args.extend(["--set", s]);
    }
    args.extend(extra);
    contrail(&args)
}

fn read(dir: &Path, tower: Tower) -> Embeddings {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(embeddings::read(dir.to_str().unwrap(), "", tower))
        .unwrap()
}

#[test]
fn two_leased_workers_write_every_key_once_and_zero_shot_reads_it() {
    let dir = support::cluster::temp_dir("e2e", "embed-cli");
    let data = dir.join("data");
    let (ok, _, err) = contrail(&[
        "data",
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--samples",
        "90",
        "--shard-size",
        "16",
        "--image-size",
        "24",
    ]);
    assert!(ok, "{err}");

    let single = dir.join("single");
    let (ok, out, err) = embed(CLIP, &data, &single, &["--tower", "both"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("wrote 90 rows in 6 parts"), "{out}");
    let spread = dir.join("spread");
    let (ok, out, err) = embed(CLIP, &data, &spread, &["--tower", "both", "--workers", "2"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("with 2 workers"), "{out}");

    for tower in [Tower::Image, Tower::Text] {
        let (a, b) = (read(&single, tower), read(&spread, tower));
        assert_eq!((a.matrix.rows, a.parts), (90, 6));
        assert_eq!((b.matrix.rows, b.parts), (90, 6), "{tower:?}");
        let keys: std::collections::BTreeSet<_> = b.records.iter().map(|r| &r.key).collect();
        assert_eq!(keys.len(), 90, "every key once");
        assert_eq!(a.records, b.records);
        let diff = a
            .matrix
            .data
            .iter()
            .zip(&b.matrix.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-5,
            "{tower:?}: the workers' rows differ by {diff}"
        );
    }

    // Zero-shot over the exported images with the shapes as classes, and retrieval over the
    // exported pairs; a random model scores anything, but every image is counted.
    let json = dir.join("zeroshot.json");
    // Runs zero-shot with the given class and template arguments; its stdout and report.
    let zeroshot = |choice: &[&str]| -> (String, serde_json::Value) {
        let mut args = vec![
            "eval",
            "zeroshot",
            "--images",
            single.to_str().unwrap(),
            "--config",
            CLIP,
            "--random-init",
            "--device",
            "cpu",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend(choice);
        for s in support::SMALL_CLIP {
            args.extend(["--set", s]);
        }
        let (ok, out, err) = contrail(&args);
        assert!(ok, "{out}\n{err}");
        let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        (out, report)
    };
    let (out, report) = zeroshot(&[
        "--classes",
        "circle,square,triangle,cross,ring,diamond",
        "--template",
        "a {}",
        "--template",
        "a photo of a {}.",
    ]);
    assert!(
        out.contains("zero-shot over 90 images, 6 classes, 2 template(s)"),
        "{out}"
    );
    let (top1, top5) = (
        report["zeroshot"]["top1"].as_f64().unwrap(),
        report["zeroshot"]["top5"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&top1) && top5 >= top1, "{report}");
    assert_eq!(report["rows"], 90);
    // The classes from a file (one per line), OpenAI's 80 templates by name.
    let classes = dir.join("classes.txt");
    std::fs::write(
        &classes,
        "circle\nsquare\n\ntriangle\ncross\nring\ndiamond\n",
    )
    .unwrap();
    let (out, report) = zeroshot(&[
        "--classes",
        classes.to_str().unwrap(),
        "--templates",
        "openai",
    ]);
    assert!(
        out.contains("zero-shot over 90 images, 6 classes, 80 template(s)"),
        "{out}"
    );
    assert_eq!(report["classes"][2], "triangle", "{report}");
    assert_eq!(report["templates"][0], "a bad photo of a {}.", "{report}");
    let (ok, out, err) = contrail(&[
        "eval",
        "retrieval",
        "--embeddings",
        spread.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("retrieval over 90 image–text pairs"), "{out}");

    // SimCLR has no text tower: both commands say so.
    let (ok, _, err) = embed(SIMCLR, &data, &dir.join("none"), &["--tower", "text"]);
    assert!(!ok);
    assert!(err.contains("has none (only clip)"), "{err}");
    let (ok, _, err) = contrail(&[
        "eval",
        "zeroshot",
        "--images",
        single.to_str().unwrap(),
        "--config",
        SIMCLR,
        "--random-init",
        "--classes",
        "a,b",
    ]);
    assert!(!ok);
    assert!(err.contains("no text tower"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
