//! `contrail data import` for IDX folders: the real Fashion-MNIST of the Debian package
//! `dataset-fashion-mnist` (installed by scripts/setup-test.sh) becomes shards whose PNGs hold
//! the IDX pixels exactly, with labels, captions and a manifest; a bad label is skipped and
//! counted, a truncated file is an error that names it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use contrail_data::decode::decode_rgb;
use contrail_data::import::{idx, import_idx, read_manifest, ImportOptions, FASHION_MNIST_CLASSES};
use contrail_data::shard_reader::read_shard;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("contrail-import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(out: &Path, limit: usize) -> ImportOptions {
    ImportOptions {
        out: out.to_str().unwrap().to_string(),
        s3_endpoint: String::new(),
        shard_size: 128,
        classes: FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        caption_template: Some("a photo of a {}.".into()),
        limit: Some(limit),
        test_fraction: None,
    }
}

/// (key, png, cls, txt) of every sample of a shard.
async fn samples(url: &str) -> Vec<(String, Vec<u8>, String, String)> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    read_shard(url, "", 0, move |s| {
        let text = |ext: &str| String::from_utf8(s.members[ext].to_vec()).unwrap();
        sink.lock().unwrap().push((
            s.key.clone(),
            s.members["png"].to_vec(),
            text("cls"),
            text("txt"),
        ));
        async { ControlFlow::Continue(()) }
    })
    .await
    .unwrap();
    let v = got.lock().unwrap().clone();
    v
}

#[tokio::test]
async fn fashion_mnist_becomes_shards_with_exact_pixels() {
    let dir = Path::new(FASHION_MNIST);
    assert!(
        dir.exists(),
        "{FASHION_MNIST} is missing: scripts/setup-test.sh installs dataset-fashion-mnist"
    );
    let out = scratch("fashion");
    let m = import_idx(dir, &options(&out, 300)).await.unwrap();
    assert_eq!(m.classes.len(), 10);
    let train = &m.splits["train"];
    assert_eq!(train.samples, 300);
    assert_eq!(train.shards.len(), 3, "300 samples in shards of 128");
    assert_eq!(train.per_class.iter().sum::<u64>(), 300);
    assert_eq!(m.splits["test"].samples, 300);
    assert!(m.skipped.is_empty());
    assert_eq!(read_manifest(out.to_str().unwrap(), "").await.unwrap(), m);

    let (img_file, lbl_file) = idx::split_files(dir, "train").unwrap();
    let images = idx::parse_images(&idx::read_maybe_gz(&img_file).unwrap(), "train").unwrap();
    let labels = idx::parse_labels(&idx::read_maybe_gz(&lbl_file).unwrap(), "train").unwrap();
    assert_eq!((images.count, images.rows, images.cols), (60000, 28, 28));
    let first = samples(&train.shards[0]).await;
    assert_eq!(first.len(), 128);
    for (i, (key, png, cls, txt)) in first.iter().enumerate() {
        assert_eq!(key, &format!("train-{i:06}"));
        assert_eq!(cls, &labels[i].to_string());
        assert_eq!(
            txt,
            &format!(
                "a photo of a {}.",
                FASHION_MNIST_CLASSES[labels[i] as usize]
            )
        );
        // Lossless, and the grayscale channel is what the decoder replicates.
        let rgb = decode_rgb(png, 1 << 20).unwrap();
        assert_eq!((rgb.width, rgb.height), (28, 28));
        let red: Vec<u8> = rgb.pixels.chunks_exact(3).map(|p| p[0]).collect();
        assert_eq!(red, images.image(i), "sample {i}");
    }
}

fn idx_file(kind: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(body);
    b
}

#[tokio::test]
async fn unknown_labels_are_skipped_and_truncated_files_named() {
    let src = scratch("bad-src");
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(src.join(name), bytes).unwrap();
    write("train-images-idx3-ubyte", idx_file(8, &[3, 2, 2], &[7; 12]));
    write("train-labels-idx1-ubyte", idx_file(8, &[3], &[0, 12, 1]));
    write("t10k-images-idx3-ubyte", idx_file(8, &[1, 2, 2], &[9; 4]));
    write("t10k-labels-idx1-ubyte", idx_file(8, &[1], &[2]));
    let out = scratch("bad-out");
    let mut opts = options(&out, usize::MAX);
    opts.limit = None;
    let m = import_idx(&src, &opts).await.unwrap();
    assert_eq!(m.splits["train"].samples, 2);
    assert_eq!(m.skipped["unknown class"], 1);
    assert_eq!(m.splits["train"].per_class[..3], [1, 1, 0]);

    write("t10k-images-idx3-ubyte", idx_file(8, &[2, 2, 2], &[9; 5]));
    let err = import_idx(&src, &opts).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("t10k-images-idx3-ubyte") && msg.contains("need 8 bytes, the file has 5"),
        "{msg}"
    );
    std::fs::remove_file(src.join("t10k-labels-idx1-ubyte")).unwrap();
    let err = import_idx(&src, &opts).await.unwrap_err();
    assert!(
        err.to_string().contains("has no t10k-labels-idx1-ubyte"),
        "{err}"
    );
}
