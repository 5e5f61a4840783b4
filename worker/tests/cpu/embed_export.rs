//! `embed::write_embeddings`: every sample of a synthetic dataset exported once, in shard
//! order (part i = shard i), with its key and label, and each exported row equal (≤ 1e-5) to
//! a direct forward of the same image through a model loaded from the checkpoint the export
//! read. A CLIP model's two towers equal its training forward (`embed_pair`), and samples
//! without a caption are skipped and counted when captions are exported.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use contrail_common::checkpoint::CheckpointMeta;
use contrail_common::JobConfig;
use contrail_data::augment::Augmenter;
use contrail_data::decode::decode_rgb;
use contrail_data::embeddings::{self, Tower};
use contrail_data::shard_reader::read_shard;
use contrail_data::synth::write_synth_dataset;
use contrail_data::tar_stream::TarBuilder;
use contrail_test_support as support;
use contrail_worker::embed::shard::{CORRUPT_IMAGE, MISSING_CAPTION};
use contrail_worker::embed::{load_model, write_embeddings, EmbedOptions, EmbedTower};
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
        run: String::new(),
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
        tower: EmbedTower::Image,
        device: Device::Cpu,
    };
    let summary = write_embeddings(&rt, &other, &model, &options).unwrap();
    assert_eq!(
        (summary.rows, summary.parts, summary.skipped_total()),
        (70, 3, 0)
    );
    let e = rt
        .block_on(embeddings::read(&url("emb"), "", Tower::Image))
        .unwrap();
    assert_eq!((e.matrix.rows, e.parts), (70, 3));
    let dim = e.matrix.dim;

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
    assert_eq!(want.size()[1], dim as i64);
    let got = Tensor::from_slice(&e.matrix.data).view([70, dim as i64]);
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
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clip_towers_equal_the_training_forward_and_captionless_samples_are_counted() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = support::cluster::temp_dir("cpu", "embed-clip");
    let url = |p: &str| format!("file://{}", dir.join(p).display());
    let cfg = support::small_clip_job(&[]);
    rt.block_on(write_synth_dataset(&url("data"), "", 20, 10, 24, 3))
        .unwrap();
    // A third shard: samples without a caption, without an image, with an image that does
    // not decode, and one complete.
    let synth = |i: u64| contrail_data::synth::render_sample(3, i, 24).unwrap();
    let mut tar = TarBuilder::new();
    for key in ["x-no-caption", "x-no-image", "x-broken", "x-whole"] {
        for (ext, data) in synth(100) {
            match (key, ext) {
                ("x-no-caption", "txt") | ("x-no-image", "jpg") => {}
                ("x-broken", "jpg") => tar.append(&format!("{key}.jpg"), b"\xFF\xD8\xFFnot a jpeg"),
                _ => tar.append(&format!("{key}.{ext}"), &data),
            }
        }
    }
    std::fs::write(dir.join("data/synth-000002.tar"), tar.finish()).unwrap();

    let (model, _) = load_model(&rt, &cfg, None, Device::Cpu).unwrap();
    let options = EmbedOptions {
        data: url("data"),
        out: url("emb"),
        batch: 8,
        tower: EmbedTower::Both,
        device: Device::Cpu,
    };
    let summary = write_embeddings(&rt, &cfg, &model, &options).unwrap();
    assert_eq!((summary.rows, summary.parts), (21, 3));
    assert_eq!(summary.skipped[MISSING_CAPTION], 1);
    assert_eq!(summary.skipped["missing_image"], 1);
    assert_eq!(summary.skipped[CORRUPT_IMAGE], 1);
    let read = |tower| {
        rt.block_on(embeddings::read(&url("emb"), "", tower))
            .unwrap()
    };
    let (img, txt) = (read(Tower::Image), read(Tower::Text));
    assert_eq!((img.matrix.rows, txt.matrix.rows), (21, 21));
    assert_eq!(img.records.last().unwrap().key, "x-whole");

    // The training path: both towers in one embed_pair call, on the same views and captions.
    let samples = Arc::new(Mutex::new(Vec::new()));
    for i in 0..3 {
        let sink = samples.clone();
        rt.block_on(read_shard(
            &url(&format!("data/synth-{i:06}.tar")),
            "",
            0,
            move |s| {
                sink.lock().unwrap().push(s);
                async { ControlFlow::Continue(()) }
            },
        ))
        .unwrap();
    }
    let samples: Vec<_> = samples
        .lock()
        .unwrap()
        .drain(..)
        .filter(|s| s.caption().is_some() && s.key != "x-broken")
        .collect();
    assert_eq!(samples.len(), 21);
    let mut aug = Augmenter::new(&cfg.data.augment, 16);
    let mut pixels = vec![0f32; aug.view_len() * samples.len()];
    for (s, out) in samples.iter().zip(pixels.chunks_mut(aug.view_len())) {
        aug.eval_view(&decode_rgb(s.image().unwrap().1, 1 << 20).unwrap(), out)
            .unwrap();
    }
    let tokenizer = contrail_worker::tokenize::ByteTokenizer::new();
    let captions: Vec<&str> = samples
        .iter()
        .map(|s| s.caption().unwrap().unwrap())
        .collect();
    let ids = contrail_worker::tokenize::Tokenizer::encode_batch(
        &tokenizer,
        &captions,
        cfg.model.text.context_length as usize,
    )
    .unwrap();
    let x = Tensor::from_slice(&pixels).view([21, 3, 16, 16]);
    let both = tch::no_grad(|| model.embed_pair(&x, &ids, false));
    for (got, want, what) in [
        (&img, both.narrow(0, 0, 21), "image"),
        (&txt, both.narrow(0, 21, 21), "text"),
    ] {
        let got = Tensor::from_slice(&got.matrix.data).view([21, -1]);
        let err = (&got - &want).abs().max().double_value(&[]);
        assert!(
            err <= 1e-5,
            "{what} rows differ from the training forward by {err}"
        );
        assert!(
            want.abs().max().double_value(&[]) > 1e-3,
            "{what} rows are all zero"
        );
    }
    for (r, s) in img.records.iter().zip(&samples) {
        assert_eq!(
            (&r.key, r.caption.as_deref()),
            (&s.key, s.caption().unwrap().ok())
        );
    }

    // A model without a text tower refuses captions, naming the objective.
    let mut simclr = JobConfig {
        model: support::model_config(),
        ..Default::default()
    };
    simclr.data.image_size = 16;
    let (plain, _) = load_model(&rt, &simclr, None, Device::Cpu).unwrap();
    let err = write_embeddings(
        &rt,
        &simclr,
        &plain,
        &EmbedOptions {
            tower: EmbedTower::Text,
            ..options
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("objective.kind = simclr"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
