//! `contrail eval` as a user runs it, on embedding folders written with contrail's own writer
//! from the fixed banks of `tests/fixtures/reference/eval`: the numbers in its JSON equal the
//! references' (lightly's kNN, the numpy whitening, scikit-learn's probe), numpy and pyarrow
//! read the folders back, and bad input is refused with the file named.

use std::path::{Path, PathBuf};
use std::process::Command;

use contrail_data::embeddings::{write_part, Matrix, Part, Record};
use contrail_test_support as support;
use tch::Tensor;

fn matrix(t: &Tensor) -> Matrix {
    let (rows, dim) = (t.size()[0] as usize, t.size()[1] as usize);
    Matrix::new(rows, dim, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()).unwrap()
}

/// Writes `x` (rows × dim) with labels `y` as an embedding folder of `parts` parts.
fn write_folder(dir: &Path, x: &Tensor, y: &[i64], parts: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = x.size()[0] as usize;
    let per = n.div_ceil(parts);
    for (i, start) in (0..n).step_by(per).enumerate() {
        let len = per.min(n - start);
        let m = matrix(&x.narrow(0, start as i64, len as i64));
        let records: Vec<Record> = (start..start + len)
            .map(|r| Record {
                key: format!("{r:06}"),
                caption: Some(format!("sample {r}")),
                label: Some(y[r]),
            })
            .collect();
        let part = Part {
            index: i,
            image: Some(&m),
            text: None,
            records: &records,
        };
        rt.block_on(write_part(dir.to_str().unwrap(), "", part))
            .unwrap();
    }
}

struct Banks {
    dir: PathBuf,
    cases: serde_json::Value,
}

fn banks(name: &str) -> Banks {
    let dir = support::cluster::temp_dir("e2e", name);
    let (t, cases) =
        support::read_fixture(&support::fixture_dir("reference/eval"), "eval.safetensors");
    let labels = |k: &str| Vec::<i64>::try_from(&t[k]).unwrap();
    write_folder(&dir.join("train"), &t["train_x"], &labels("train_y"), 3);
    write_folder(&dir.join("test"), &t["test_x"], &labels("test_y"), 1);
    Banks { dir, cases }
}

fn eval(args: &[&str]) -> (bool, String, String) {
    crate::contrail_output(&[&["eval"], args].concat())
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!((g - w).abs() < 1e-6, "{what}: {g} vs reference {w}");
}

#[test]
fn knn_and_linear_commands_report_the_reference_numbers() {
    let b = banks("eval-knn");
    let (train, test) = (b.dir.join("train"), b.dir.join("test"));
    let json = b.dir.join("knn.json");
    let (ok, stdout, stderr) = eval(&[
        "knn",
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--k",
        "20",
        "--temperature",
        "0.07",
        "--whiten-dim",
        "16",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("kNN, whitened to 16 dims"), "{stdout}");
    let r = read_json(&json);
    assert_eq!(r["train_rows"], 2000);
    assert_eq!(r["test_rows"], 500);
    close(
        &r["knn"]["top1"],
        &b.cases["knn_cosine_k20"]["top1"],
        "kNN top-1",
    );
    close(
        &r["knn"]["top5"],
        &b.cases["knn_cosine_k20"]["top5"],
        "kNN top-5",
    );
    close(
        &r["knn_whitened"]["top1"],
        &b.cases["whiten_knn_k20"]["top1"],
        "whitened kNN top-1",
    );

    let json = b.dir.join("linear.json");
    let (ok, stdout, stderr) = eval(&[
        "linear",
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("linear probe"), "{stdout}");
    let r = read_json(&json);
    let (got, want) = (
        r["linear"]["top1"].as_f64().unwrap(),
        b.cases["linear"]["top1"].as_f64().unwrap(),
    );
    assert!(
        (got - want).abs() <= 0.005,
        "probe {got} vs scikit-learn {want}"
    );
    assert_eq!(r["fit"]["converged"], true);
}

/// numpy and pyarrow read what contrail wrote, row for row.
#[test]
fn numpy_and_pyarrow_read_the_folders() {
    let b = banks("eval-python");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test.sh",
        python.display()
    );
    let script = r#"
import glob, json, sys
import numpy as np, pyarrow.parquet as pq
root = sys.argv[1]
parts = sorted(glob.glob(root + "/img_emb/img_emb_*.npy"), key=lambda p: int(p.rsplit("_", 1)[1][:-4]))
x = np.concatenate([np.load(p) for p in parts])
meta = [pq.read_table(p.replace("img_emb/img_emb_", "metadata/metadata_").replace(".npy", ".parquet")) for p in parts]
labels = [v for t in meta for v in t.column("label").to_pylist()]
keys = [v for t in meta for v in t.column("key").to_pylist()]
print(json.dumps({"shape": list(x.shape), "dtype": str(x.dtype), "sum": float(x.astype(np.float64).sum()),
                  "labels": labels[:5], "keys": keys[-1:], "parts": len(parts)}))
"#;
    let out = Command::new(&python)
        .args(["-c", script, b.dir.join("train").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (t, _) = support::read_fixture(&support::fixture_dir("reference/eval"), "eval.safetensors");
    assert_eq!(got["shape"], serde_json::json!([2000, 32]));
    assert_eq!(got["dtype"], "float32");
    assert_eq!(got["parts"], 3);
    assert_eq!(got["keys"], serde_json::json!(["001999"]));
    let want_labels = Vec::<i64>::try_from(t["train_y"].narrow(0, 0, 5)).unwrap();
    assert_eq!(got["labels"], serde_json::json!(want_labels));
    let want_sum = t["train_x"]
        .to_kind(tch::Kind::Double)
        .sum(tch::Kind::Double);
    let diff = (got["sum"].as_f64().unwrap() - want_sum.double_value(&[])).abs();
    assert!(diff < 1e-6, "sums differ by {diff}");
}

#[test]
fn bad_input_names_the_file() {
    let dir = support::cluster::temp_dir("e2e", "eval-bad");
    let ok = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.5, 0.5]).view([3, 2]);
    write_folder(&dir.join("good"), &ok, &[0, 1, 1], 1);
    let nan = ok.copy();
    let _ = nan.get(1).get(0).fill_(f64::NAN);
    write_folder(&dir.join("nan"), &nan, &[0, 1, 1], 1);
    let wide = Tensor::ones([2, 3], (tch::Kind::Float, tch::Device::Cpu));
    write_folder(&dir.join("wide"), &wide, &[0, 1], 1);
    let path = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let run = |train: &str, test: &str, k: &str| {
        let (ok, _, stderr) = eval(&[
            "knn",
            "--train",
            &path(train),
            "--test",
            &path(test),
            "--k",
            k,
            "--device",
            "cpu",
        ]);
        assert!(!ok, "{train} / {test} was accepted");
        stderr
    };
    let e = run("good", "nan", "2");
    assert!(
        e.contains(&path("nan")) && e.contains("row 1 holds NaN"),
        "{e}"
    );
    let e = run("good", "wide", "2");
    assert!(
        e.contains("has dimension 3 but") && e.contains(&path("good")),
        "{e}"
    );
    let e = run("good", "good", "5");
    assert!(
        e.contains("k = 5 is larger than") && e.contains("(3 rows)"),
        "{e}"
    );
    let e = run("good", "missing", "2");
    assert!(e.contains("holds no img_emb/img_emb_{i}.npy"), "{e}");
}

/// Several captions per image (`--group-by key-stem`): 4 images with 3 captions each, every
/// caption close to its own image, so every image and caption is found first; the image rows
/// of one group must hold the same image.
#[test]
fn retrieval_groups_captions_by_key_stem() {
    let dir = support::cluster::temp_dir("e2e", "retrieval-groups");
    tch::manual_seed(4);
    let images = Tensor::randn([4, 8], (tch::Kind::Float, tch::Device::Cpu)) * 3.0;
    let image_of: Vec<i64> = (0..12).map(|r| r / 3).collect();
    let rows = images.index_select(0, &Tensor::from_slice(&image_of));
    let noise = Tensor::randn([12, 8], (tch::Kind::Float, tch::Device::Cpu)) * 0.1;
    let texts: Tensor = &rows + noise;
    let write = |root: &Path, img: &Tensor| {
        let (im, tx) = (matrix(img), matrix(&texts));
        let records: Vec<Record> = (0..12)
            .map(|r| Record {
                key: format!("img{:03}_{}", r / 3, r % 3),
                caption: Some(format!("caption {r}")),
                label: None,
            })
            .collect();
        let part = Part {
            index: 0,
            image: Some(&im),
            text: Some(&tx),
            records: &records,
        };
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(write_part(root.to_str().unwrap(), "", part))
            .unwrap();
    };
    let good = dir.join("good");
    write(&good, &rows);
    let json = dir.join("r.json");
    let (ok, out, err) = eval(&[
        "retrieval",
        "--embeddings",
        good.to_str().unwrap(),
        "--group-by",
        "key-stem",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("retrieval over 4 images and 12 captions (3.00 per image)"),
        "{out}"
    );
    let r = &read_json(&json)["retrieval"];
    assert_eq!(
        (r["images"].as_u64(), r["pairs"].as_u64()),
        (Some(4), Some(12))
    );
    assert_eq!(r["mean_recall"].as_f64(), Some(1.0), "{r}");
    // Without grouping the 12 rows are 12 pairs, and identical images tie.
    let (ok, out, _) = eval(&["retrieval", "--embeddings", good.to_str().unwrap()]);
    assert!(
        ok && out.contains("retrieval over 12 image–text pairs"),
        "{out}"
    );

    // A group whose rows hold different images is refused, naming them.
    let bad = dir.join("bad");
    let other = rows.copy();
    let _ = other.get(1).fill_(0.5);
    write(&bad, &other);
    let (ok, _, err) = eval(&[
        "retrieval",
        "--embeddings",
        bad.to_str().unwrap(),
        "--group-by",
        "key-stem",
    ]);
    assert!(!ok);
    assert!(
        err.contains("rows 0 and 1") && err.contains("different images"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
