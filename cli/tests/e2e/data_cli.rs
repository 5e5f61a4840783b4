//! `contrail data index` as a user runs it: shards written elsewhere (here by `contrail data
//! synth`, which writes no dataset.json) get a `dataset.json` whose split counts every sample,
//! which the coordinator reads (coordinator/src/manifest.rs); a second run keeps it unless
//! told to overwrite.

use crate::contrail_output as contrail;
use contrail_test_support as support;

#[test]
fn index_writes_the_manifest_of_shards_from_elsewhere() {
    let dir = support::cluster::temp_dir("e2e", "data-index");
    let shards = dir.join("shards");
    let shards = shards.to_str().unwrap();
    let (ok, out, err) = contrail(&[
        "data",
        "synth",
        "--out",
        shards,
        "--samples",
        "40",
        "--shard-size",
        "16",
    ]);
    assert!(ok, "{out}{err}");
    assert!(!dir.join("shards/dataset.json").exists());

    let (ok, out, err) = contrail(&["data", "index", "--data", shards, "--split", "train"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("train: 40 samples in 3 shards"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("shards/dataset.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], "index");
    assert_eq!(manifest["splits"]["train"]["samples"], 40);
    assert_eq!(
        manifest["splits"]["train"]["shards"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    let (ok, out, err) = contrail(&["data", "index", "--data", shards]);
    assert!(!ok && err.contains("--overwrite"), "{out}{err}");
    let (ok, out, err) = contrail(&["data", "index", "--data", shards, "--overwrite"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("shards: 40 samples"),
        "the folder's name: {out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
