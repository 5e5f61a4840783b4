//! Evaluation against its references, on the fixed banks of
//! `tests/fixtures/reference/eval/make_fixtures.py`: kNN rankings equal lightly 1.6.0's
//! `knn_predict` (cosine) and solo-learn 1.0.2's `WeightedKNNClassifier` accuracies (euclidean);
//! BERT-whitening equals the numpy reference; the linear probe's test accuracy is within 0.5
//! point of scikit-learn 1.9.1's `LogisticRegression`; zero-shot and retrieval equal
//! open_clip 3.3.0's `build_zero_shot_classifier`/`accuracy` and `get_clip_metrics`.

use std::collections::HashMap;

use contrail_test_support as support;
use contrail_worker::eval::knn::{self, KnnIndex, KnnOptions, Metric};
use contrail_worker::eval::linear::{LinearOptions, LinearProbe};
use contrail_worker::eval::whiten::Whitening;
use contrail_worker::eval::{retrieval, zeroshot, Bank};
use serde_json::Value;
use tch::{Kind, Tensor};

struct Fixtures {
    tensors: HashMap<String, Tensor>,
    cases: Value,
}

impl Fixtures {
    fn load() -> Fixtures {
        let (tensors, cases) =
            support::read_fixture(&support::fixture_dir("reference/eval"), "eval.safetensors");
        Fixtures { tensors, cases }
    }

    fn t(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor \"{key}\" missing"))
            .shallow_clone()
    }

    fn num(&self, case: &str, key: &str) -> f64 {
        self.cases[case][key]
            .as_f64()
            .unwrap_or_else(|| panic!("cases.json: {case}.{key} is not a number"))
    }

    fn banks(&self) -> (Bank, Bank) {
        (
            Bank::new("train", self.t("train_x"), Some(self.t("train_y"))).unwrap(),
            Bank::new("test", self.t("test_x"), Some(self.t("test_y"))).unwrap(),
        )
    }
}

/// Accuracies are counts over a few hundred rows (one row moves them by at least 1/500), and
/// some references average in float32: equal up to that rounding.
fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() < 1e-6,
        "{what}: {got} vs reference {want}"
    );
}

#[test]
fn knn_rankings_equal_lightly_and_accuracies_equal_solo_learn() {
    let f = Fixtures::load();
    let (train, test) = f.banks();
    for case in ["knn_cosine_k20", "knn_cosine_k200"] {
        let opts = KnnOptions {
            k: f.num(case, "k") as i64,
            temperature: f.num(case, "temperature"),
            metric: Metric::Cosine,
            // Several bank chunks, so the running top-k merge is what is compared.
            bank_chunk_rows: 700,
            ..Default::default()
        };
        let ranking = KnnIndex::new(&train, opts)
            .unwrap()
            .predict(&test.embeddings);
        let want = f.t(&format!("{case}.ranking"));
        // The first five places: later ones hold classes with (near-)zero votes whose order
        // is arbitrary in both.
        let agree = ranking
            .narrow(1, 0, 5)
            .eq_tensor(&want.narrow(1, 0, 5))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert_eq!(agree, 1.0, "{case}: top-5 rankings differ from lightly's");
        let acc = knn::classify(&train, &test, opts).unwrap();
        assert_close(acc.top1, f.num(case, "top1"), case);
        assert_close(acc.top5, f.num(case, "top5"), case);
    }
    for case in ["knn_euclidean_k20", "knn_euclidean_k3"] {
        let opts = KnnOptions {
            k: f.num(case, "k") as i64,
            metric: Metric::Euclidean,
            chunk_rows: 128,
            ..Default::default()
        };
        let acc = knn::classify(&train, &test, opts).unwrap();
        assert_close(acc.top1, f.num(case, "top1"), case);
        assert_close(acc.top5, f.num(case, "top5"), case);
    }
}

#[test]
fn whitening_equals_the_numpy_reference() {
    let f = Fixtures::load();
    let (train, test) = f.banks();
    let case = "whiten_knn_k20";
    let dim = f.num(case, "whiten_dim") as i64;
    let w = Whitening::fit(&train, Some(dim)).unwrap();
    let (wtrain, wtest) = (w.apply_bank(&train).unwrap(), w.apply_bank(&test).unwrap());
    let gram = wtest
        .embeddings
        .narrow(0, 0, 64)
        .matmul(&wtrain.embeddings.narrow(0, 0, 256).tr());
    let want = f.t("whiten.gram");
    let err = (&gram - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        err <= 1e-4 * scale,
        "whitened Gram off by {err} (scale {scale})"
    );
    let opts = KnnOptions {
        k: f.num(case, "k") as i64,
        temperature: f.num(case, "temperature"),
        ..Default::default()
    };
    let acc = knn::classify(&wtrain, &wtest, opts).unwrap();
    assert_close(acc.top1, f.num(case, "top1"), case);
    assert_close(acc.top5, f.num(case, "top5"), case);
}

#[test]
fn linear_probe_is_within_half_a_point_of_scikit_learn() {
    let f = Fixtures::load();
    let (train, test) = f.banks();
    let opts = LinearOptions {
        c: f.num("linear", "c"),
        ..Default::default()
    };
    let (probe, report) = LinearProbe::fit(&train, opts).unwrap();
    assert!(report.converged, "{report:?}");
    let acc = probe.evaluate(&test).unwrap();
    let want = f.num("linear", "top1");
    assert!(
        (acc.top1 - want).abs() <= 0.005,
        "linear probe top-1 {} vs scikit-learn {want}",
        acc.top1
    );
    // Both found the same optimum: the predicted probabilities agree.
    let logits = test.embeddings.matmul(&probe.weight) + &probe.bias;
    let proba = logits.softmax(1, Kind::Float);
    let err = (proba - f.t("linear.proba")).abs().max().double_value(&[]);
    assert!(
        err < 5e-4,
        "probabilities differ from scikit-learn's by {err}"
    );
    eprintln!(
        "linear probe: top-1 {} (scikit-learn {want}), {} L-BFGS iterations, max |Δp| {err:.1e}",
        acc.top1, report.iterations
    );
}

#[test]
fn zero_shot_equals_open_clip() {
    let f = Fixtures::load();
    let prompts = f.t("zeroshot.prompts");
    let per_class: Vec<Tensor> = (0..prompts.size()[0]).map(|c| prompts.get(c)).collect();
    let classifier = zeroshot::classifier(&per_class).unwrap();
    let err = (&classifier - f.t("zeroshot.classifier"))
        .abs()
        .max()
        .double_value(&[]);
    assert!(err < 1e-6, "classifier differs from open_clip's by {err}");
    let images = Bank::new("images", f.t("zeroshot.x"), Some(f.t("zeroshot.y"))).unwrap();
    let acc = zeroshot::evaluate(&images, &classifier).unwrap();
    assert_close(acc.top1, f.num("zeroshot", "top1"), "zero-shot top-1");
    assert_close(acc.top5, f.num("zeroshot", "top5"), "zero-shot top-5");
}

/// The named template sets are open_clip's, word for word
/// (tests/fixtures/reference/zeroshot_templates/make_fixture.py).
#[test]
fn template_sets_equal_open_clip() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference/zeroshot_templates/templates.json");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (name, ours) in [
        ("openai", &zeroshot::OPENAI_IMAGENET_TEMPLATES[..]),
        ("simple", &zeroshot::SIMPLE_IMAGENET_TEMPLATES[..]),
    ] {
        let theirs: Vec<&str> = want[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(ours, &theirs[..], "{name}");
        assert_eq!(zeroshot::expand_templates(&[name.to_string()]), theirs);
    }
}

#[test]
fn retrieval_equals_open_clip_metrics() {
    let f = Fixtures::load();
    let img = Bank::new("images", f.t("retrieval.image"), None).unwrap();
    let txt = Bank::new("texts", f.t("retrieval.text"), None).unwrap();
    let r = retrieval::evaluate(&img, &txt, Some(64)).unwrap();
    for (name, d) in [
        ("image_to_text", r.image_to_text),
        ("text_to_image", r.text_to_image),
    ] {
        for (k, got) in [1, 5, 10].iter().zip(d.recall) {
            assert_close(got, f.num("retrieval", &format!("{name}_R@{k}")), name);
        }
        assert_close(
            d.mean_rank,
            f.num("retrieval", &format!("{name}_mean_rank")),
            name,
        );
        assert_close(
            d.median_rank,
            f.num("retrieval", &format!("{name}_median_rank")),
            name,
        );
    }
}
