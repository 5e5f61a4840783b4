//! Online evaluation (`process::evaluation`): two ranks embedding their shares and voting on
//! rank 0 give the numbers of one process embedding everything and calling `eval::knn`
//! directly; budgets split over the ranks add up; unusable samples are counted, not fatal; an
//! MoE model with uneven shares does not hang; a CLIP job's zero-shot and retrieval on two ranks
//! equal one process's.

use contrail_common::config::EncoderKind;
use contrail_common::status::EvalPoint;
use contrail_common::JobConfig;
use contrail_data::augment::Augmenter;
use contrail_data::decode::decode_rgb;
use contrail_data::synth::write_synth_dataset;
use contrail_data::tar_stream::{TarBuilder, TarStreamParser};
use contrail_test_support as support;
use contrail_worker::dist::local::LocalGroup;
use contrail_worker::dist::Collective;
use contrail_worker::eval::knn::{classify, KnnOptions};
use contrail_worker::eval::Bank;
use contrail_worker::eval::{retrieval, zeroshot};
use contrail_worker::model::{BuildOptions, ContrastiveModel};
use contrail_worker::process::evaluation::{quota, OnlineEval};
use contrail_worker::tokenize::{ByteTokenizer, Tokenizer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

fn file_url(dir: &Path, p: &str) -> String {
    format!("file://{}", dir.join(p).display())
}

/// `samples` synthetic samples (24-pixel images, seed `seed`) in shards of `shard_size` under
/// `dir/name`.
fn write_set(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    name: &str,
    samples: u64,
    shard_size: u64,
    seed: u64,
) {
    rt.block_on(write_synth_dataset(
        &file_url(dir, name),
        "",
        samples,
        shard_size,
        24,
        seed,
    ))
    .unwrap();
}

/// A job whose bank is `bank` and held-out set `test`, with the tiny test ResNet.
fn job(dir: &Path, k: u32) -> JobConfig {
    let mut cfg = JobConfig {
        model: support::model_config(),
        ..Default::default()
    };
    cfg.data.image_size = 16;
    cfg.data.url = file_url(dir, "bank");
    cfg.eval.url = file_url(dir, "test");
    cfg.eval.bank_samples = 10_000;
    cfg.eval.k = k;
    cfg.eval.batch = 16;
    cfg.train.seed = 3;
    cfg
}

/// One round of `cfg`'s evaluation on `world` in-process ranks, each with the same model
/// (the seed's); rank 0's result.
fn round_on(cfg: &JobConfig, world: usize) -> EvalPoint {
    let group = LocalGroup::with_timeout(world, Duration::from_secs(60));
    let points: Vec<Option<EvalPoint>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|coll| {
                s.spawn(move || {
                    let rt = tokio::runtime::Runtime::new().unwrap();
                    let coll: Arc<dyn Collective> = Arc::new(coll);
                    let bytes = ByteTokenizer::new();
                    let model = support::seeded(cfg.train.seed as i64, || {
                        let opts = BuildOptions {
                            tokenizer: Some(&bytes),
                            experts: Some((coll.clone(), None)),
                        };
                        ContrastiveModel::build(cfg, Device::Cpu, opts).unwrap()
                    });
                    let mut online = OnlineEval::new(cfg);
                    online.round(&rt, &model, coll.as_ref(), 0, 7).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        points[1..].iter().all(Option::is_none),
        "only rank 0 returns the round"
    );
    points.into_iter().next().unwrap().expect("rank 0's round")
}

/// Every sample of the set at `url`, through the evaluation view and the encoder of `model`:
/// (features, labels).
fn direct_features(cfg: &JobConfig, model: &ContrastiveModel, url: &str) -> (Tensor, Tensor) {
    let (views, labels, _) = direct_pairs(cfg, url);
    (tch::no_grad(|| model.encode_t(&views, false)), labels)
}

#[test]
fn two_ranks_vote_as_one_process_embedding_everything() {
    let dir = support::cluster::temp_dir("cpu", "online-eval-equal");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // 7 bank shards (the last partial) and 3 held-out shards: uneven shares on 2 ranks.
    write_set(&rt, &dir, "bank", 200, 32, 1);
    write_set(&rt, &dir, "test", 90, 32, 2);
    let cfg = job(&dir, 10);

    let model = support::seeded(3, || {
        ContrastiveModel::build(&cfg, Device::Cpu, BuildOptions::default()).unwrap()
    });
    let (bank_x, bank_y) = direct_features(&cfg, &model, &cfg.data.url);
    let (test_x, test_y) = direct_features(&cfg, &model, &cfg.eval.url);
    let want = classify(
        &Bank::new("bank", bank_x, Some(bank_y)).unwrap(),
        &Bank::new("test", test_x, Some(test_y)).unwrap(),
        KnnOptions {
            k: 10,
            ..KnnOptions::default()
        },
    )
    .unwrap();

    for world in [1, 2] {
        let got = round_on(&cfg, world);
        assert_eq!(got.error, "", "world {world}");
        assert_eq!(
            (got.bank_samples, got.test_samples, got.skipped, got.step),
            (200, 90, 0, 7),
            "world {world}: every sample once"
        );
        // The rows arrive in another order on 2 ranks: the vote sums may differ in the last
        // bit, which could flip a near tie, so one sample of slack.
        for (name, g, w) in [
            ("top-1", got.knn_top1.unwrap(), want.top1),
            ("top-5", got.knn_top5.unwrap(), want.top5),
        ] {
            assert!(
                (g - w).abs() <= 1.0 / 90.0 + 1e-12,
                "world {world}: {name} {g} vs direct {w}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn budgets_split_over_ranks_and_unusable_samples_are_counted() {
    assert_eq!(quota(101, 0, 2), Some(51));
    assert_eq!(quota(101, 1, 2), Some(50));
    assert_eq!(quota(3, 3, 4), Some(0));
    assert_eq!(quota(0, 1, 2), None);

    let dir = support::cluster::temp_dir("cpu", "online-eval-budget");
    let rt = tokio::runtime::Runtime::new().unwrap();
    write_set(&rt, &dir, "bank", 200, 32, 1);
    write_set(&rt, &dir, "test", 40, 32, 2);
    // One more held-out shard: a sample whose image is garbage, one without a label, and one
    // without an image; the good sample beside them still counts.
    let good = std::fs::read(dir.join("test/synth-000000.tar")).unwrap();
    let first_png = {
        let mut samples = Vec::new();
        let mut reader = TarStreamParser::new("x");
        reader.push(&good, &mut samples).unwrap();
        samples.remove(0)
    };
    let mut tar = TarBuilder::new();
    tar.append("bad-0.png", b"not an image at all");
    tar.append("bad-0.cls", b"1");
    let (ext, bytes) = first_png.image().unwrap();
    tar.append(&format!("nolabel-1.{ext}"), bytes);
    tar.append("noimage-2.cls", b"2");
    tar.append(&format!("good-3.{ext}"), bytes);
    tar.append("good-3.cls", b"4");
    std::fs::write(dir.join("test/zz-bad.tar"), tar.finish()).unwrap();

    let mut cfg = job(&dir, 5);
    cfg.eval.bank_samples = 101;
    let got = round_on(&cfg, 2);
    assert_eq!(got.error, "");
    assert_eq!(got.bank_samples, 101, "the budget, split 51 + 50");
    assert_eq!(got.test_samples, 41, "40 synthetic + the good sample");
    assert_eq!(got.skipped, 3, "garbage image, no label, no image");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A ViT with an MoE block, its experts split over 2 ranks, and shares of very different
/// size: the rank that finishes first keeps joining the exchanges until the other is done.
#[test]
fn moe_ranks_embed_uneven_shares_in_lock_step() {
    let dir = support::cluster::temp_dir("cpu", "online-eval-moe");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Shards of 64: the bank's ranks hold 128 and 72 samples, the held-out set's 64 and 6.
    write_set(&rt, &dir, "bank", 200, 64, 1);
    write_set(&rt, &dir, "test", 70, 64, 2);
    let mut cfg = job(&dir, 5);
    cfg.model.encoder = EncoderKind::Vit;
    cfg.model.vit.patch_size = 8;
    cfg.model.vit.width = 16;
    cfg.model.vit.layers = 2;
    cfg.model.vit.heads = 2;
    cfg.moe.experts = 2;
    cfg.moe.vit_blocks = vec![1];
    cfg.moe.top_k = 1;
    cfg.cluster.world_size = 2;
    cfg.train.global_batch = 2 * cfg.train.micro_batch;
    cfg.validate().unwrap();
    let got = round_on(&cfg, 2);
    assert_eq!(got.error, "");
    assert_eq!((got.bank_samples, got.test_samples), (200, 70));
    let top1 = got.knn_top1.unwrap();
    assert!((0.0..=1.0).contains(&top1), "{top1}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CLIP job (ViT + causal text tower, byte tokenizer) evaluating zero-shot over the six
/// shapes and retrieval over the held-out captions: two ranks give one process's numbers.
#[test]
fn clip_zero_shot_and_retrieval_on_two_ranks_equal_one_process() {
    let dir = support::cluster::temp_dir("cpu", "online-eval-clip");
    let rt = tokio::runtime::Runtime::new().unwrap();
    write_set(&rt, &dir, "bank", 64, 32, 1);
    write_set(&rt, &dir, "test", 70, 32, 2);
    let mut cfg = support::small_clip_job(&[
        "eval.k=5",
        "eval.batch=16",
        "train.seed=3",
        r#"eval.classes=["circle", "square", "triangle", "cross", "ring", "diamond"]"#,
        r#"eval.templates=["a {}", "a photo of a {}."]"#,
    ]);
    cfg.data.url = file_url(&dir, "bank");
    cfg.eval.url = file_url(&dir, "test");
    cfg.validate().unwrap();

    // One process: every held-out image and caption through the model's training forward.
    let tokenizer = ByteTokenizer::new();
    let model = support::seeded(3, || {
        let opts = BuildOptions {
            tokenizer: Some(&tokenizer),
            experts: None,
        };
        ContrastiveModel::build(&cfg, Device::Cpu, opts).unwrap()
    });
    let (pixels, labels, captions) = direct_pairs(&cfg, &cfg.eval.url);
    let context = cfg.model.text.context_length as usize;
    let caption_refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let ids = tokenizer.encode_batch(&caption_refs, context).unwrap();
    let both = tch::no_grad(|| model.embed_pair(&pixels, &ids, false));
    let n = labels.size()[0];
    let images = Bank::new("images", both.narrow(0, 0, n), Some(labels)).unwrap();
    let texts = Bank::new("texts", both.narrow(0, n, n), None).unwrap();
    let per_class: Vec<Tensor> = cfg
        .eval
        .classes
        .iter()
        .map(|c| {
            let prompts = zeroshot::prompts(c, &cfg.eval.templates);
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let ids = tokenizer.encode_batch(&refs, context).unwrap();
            let dummy = Tensor::zeros(
                [refs.len() as i64, 3, 16, 16],
                (tch::Kind::Float, Device::Cpu),
            );
            let pair = tch::no_grad(|| model.embed_pair(&dummy, &ids, false));
            pair.narrow(0, refs.len() as i64, refs.len() as i64)
        })
        .collect();
    let want_zs = zeroshot::evaluate(&images, &zeroshot::classifier(&per_class).unwrap()).unwrap();
    let want_rt = retrieval::evaluate(&images, &texts, None).unwrap();

    for world in [1, 2] {
        let got = round_on(&cfg, world);
        assert_eq!(got.error, "", "world {world}");
        assert!(got.knn_top1.is_some(), "world {world}: kNN still votes");
        for (name, g, w) in [
            ("zero-shot top-1", got.zeroshot_top1, want_zs.top1),
            ("zero-shot top-5", got.zeroshot_top5, want_zs.top5),
            (
                "R@1 image→text",
                got.image_to_text_r1,
                want_rt.image_to_text.recall[0],
            ),
            (
                "R@1 text→image",
                got.text_to_image_r1,
                want_rt.text_to_image.recall[0],
            ),
            (
                "mean recall",
                got.retrieval_mean_recall,
                want_rt.mean_recall,
            ),
        ] {
            let g = g.unwrap_or_else(|| panic!("world {world}: {name} not measured"));
            assert!(
                (g - w).abs() <= 1.0 / 70.0 + 1e-12,
                "world {world}: {name} {g} vs one process {w}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every sample of `url` as (evaluation views `(n, 3, s, s)`, labels, captions).
fn direct_pairs(cfg: &JobConfig, url: &str) -> (Tensor, Tensor, Vec<String>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shards = rt
        .block_on(contrail_common::storage::list_shards(url, ""))
        .unwrap();
    let mut aug = Augmenter::new(&cfg.data.augment, cfg.data.image_size);
    let (mut pixels, mut labels, mut captions) = (Vec::new(), Vec::new(), Vec::new());
    for shard in shards {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = samples.clone();
        rt.block_on(contrail_data::shard_reader::read_shard(
            &shard,
            "",
            1,
            move |s| {
                sink.lock().unwrap().push(s);
                async { std::ops::ControlFlow::Continue(()) }
            },
        ))
        .unwrap();
        for s in samples.lock().unwrap().iter() {
            let img = decode_rgb(s.image().unwrap().1, u64::MAX).unwrap();
            let mut px = vec![0f32; aug.view_len()];
            aug.eval_view(&img, &mut px).unwrap();
            pixels.extend(px);
            labels.push(s.class_id().unwrap());
            captions.push(s.caption().unwrap().unwrap().to_string());
        }
    }
    let sz = i64::from(cfg.data.image_size);
    let n = labels.len() as i64;
    (
        Tensor::from_slice(&pixels).view([n, 3, sz, sz]),
        Tensor::from_slice(&labels),
        captions,
    )
}
