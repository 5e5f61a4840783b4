//! `embed::write_embeddings`: every sample of a synthetic dataset exported once, in shard
//! order, with its key and label, and each exported row equal (≤ 1e-5) to a direct forward of
//! the same image through a model loaded from the checkpoint the export read.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use contrail_common::checkpoint::CheckpointMeta;
use contrail_common::JobConfig;
use contrail_data::augment::Augmenter;
use contrail_data::decode::decode_rgb;
use contrail_data::embeddings::{self, Tower};
use contrail_data::shard_reader::read_shard;
use contrail_data::synth::write_synth_dataset;
use contrail_test_support as support;
use contrail_worker::embed::{load_model, write_embeddings, EmbedOptions};
use contrail_worker::train::checkpoint::{tensors_to_safetensors, write_checkpoint};
use tch::{Device, Tensor};

#[test]
fn exported_rows_equal_a_direct_forward_of_the_checkpoint() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = support::cluster::temp_dir("cpu", "embed-export");
    let url = |p: &str| format!("file://{}", dir.join(p).display());
    let mut cfg = JobConfig {
        model: support::model_config(),
        ..Default::default()
    };
    cfg.data.image_size = 16;
    cfg.train.seed = 5;
    rt.block_on(write_synth_dataset(&url("data"), "", 70, 32, 24, 1))
        .unwrap();

    // A "trained" model: seed 5's weights, written as a checkpoint.
    let (trained, _) = load_model(&rt, &cfg, None, Device::Cpu).unwrap();
    let meta = CheckpointMeta {
        step: 7,
        epoch: 0,
        world_size: 1,
        shard_state: Default::default(),
        config_toml: String::new(),
        created_unix_ms: 0,
    };
    let model_bytes = tensors_to_safetensors(&trained.named_variables()).unwrap();
    let optim_bytes = tensors_to_safetensors(&[]).unwrap();
    rt.block_on(write_checkpoint(
        &url("ckpt"),
        "",
        1,
        &meta,
        model_bytes,
        optim_bytes,
    ))
    .unwrap();

    // The export builds its model with another seed: only loading the checkpoint makes the
    // rows match.
    let mut other = cfg.clone();
    other.train.seed = 99;
    let (model, loaded) = load_model(&rt, &other, Some(&url("ckpt")), Device::Cpu).unwrap();
    assert!(loaded.unwrap().ends_with("step-00000007"));
    let options = EmbedOptions {
        data: url("data"),
        out: url("emb"),
        batch: 16,
        part_rows: 30,
        device: Device::Cpu,
    };
    let summary = write_embeddings(&rt, &other, &model, &options).unwrap();
    assert_eq!((summary.rows, summary.parts, summary.skipped), (70, 3, 0));
    let e = rt
        .block_on(embeddings::read(&url("emb"), "", Tower::Image))
        .unwrap();
    assert_eq!((e.matrix.rows, e.matrix.dim), (70, summary.dim));

    // Direct: the same shards, the same evaluation view, one forward of the trained model.
    let samples = Arc::new(Mutex::new(Vec::new()));
    for shard in ["synth-000000.tar", "synth-000001.tar", "synth-000002.tar"] {
        let sink = samples.clone();
        rt.block_on(read_shard(
            &url(&format!("data/{shard}")),
            "",
            0,
            move |s| {
                sink.lock().unwrap().push(s);
                async { ControlFlow::Continue(()) }
            },
        ))
        .unwrap();
    }
    let samples = samples.lock().unwrap();
    let mut aug = Augmenter::new(&cfg.data.augment, 16);
    let mut pixels = vec![0f32; aug.view_len() * samples.len()];
    for (s, out) in samples.iter().zip(pixels.chunks_mut(aug.view_len())) {
        let img = decode_rgb(s.image().unwrap().1, 1 << 20).unwrap();
        aug.eval_view(&img, out).unwrap();
    }
    let x = Tensor::from_slice(&pixels).view([samples.len() as i64, 3, 16, 16]);
    let want = tch::no_grad(|| trained.encode_t(&x, false));
    let got = Tensor::from_slice(&e.matrix.data).view([70, summary.dim as i64]);
    let err = (&got - &want).abs().max().double_value(&[]);
    assert!(
        err <= 1e-5,
        "exported rows differ from a direct forward by {err}"
    );
    let scale = want.abs().max().double_value(&[]);
    assert!(scale > 1e-3, "embeddings are all zero");
    for (r, s) in e.records.iter().zip(samples.iter()) {
        assert_eq!(r.key, s.key);
        assert_eq!(r.label, s.class_id());
    }
    let keys: std::collections::BTreeSet<_> = e.records.iter().map(|r| &r.key).collect();
    assert_eq!(keys.len(), 70, "every key once");
}
