//! `contrail data import` for the image-folder and CSV/TSV layouts: samples land in shards with
//! their class and caption; a corrupt image, a missing file and an unknown class are skipped
//! and counted, and the other samples are kept.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use contrail_data::import::{import_listing, ImportOptions};
use contrail_data::shard_reader::read_shard;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("contrail-listing-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn png(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(&[shade; 3 * 4 * 4], 4, 4, ExtendedColorType::Rgb8)
        .unwrap();
    std::fs::write(path, out).unwrap();
}

fn options(out: &Path, classes: &[&str], template: Option<&str>) -> ImportOptions {
    ImportOptions {
        out: out.to_str().unwrap().to_string(),
        s3_endpoint: String::new(),
        shard_size: 2,
        classes: classes.iter().map(|s| s.to_string()).collect(),
        caption_template: template.map(str::to_string),
        limit: None,
        test_fraction: None,
    }
}

/// (cls, txt) of every sample in the split's shards, in order.
async fn members(shards: &[String]) -> Vec<(Option<String>, Option<String>)> {
    let got = Arc::new(Mutex::new(Vec::new()));
    for url in shards {
        let sink = got.clone();
        read_shard(url, "", 0, move |s| {
            let text = |ext: &str| {
                s.members
                    .get(ext)
                    .map(|b| String::from_utf8(b.to_vec()).unwrap())
            };
            sink.lock().unwrap().push((text("cls"), text("txt")));
            async { ControlFlow::Continue(()) }
        })
        .await
        .unwrap();
    }
    let v = got.lock().unwrap().clone();
    v
}

/// The image bytes of every sample in the split's shards, in order.
async fn images(shards: &[String]) -> Vec<Vec<u8>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    for url in shards {
        let sink = got.clone();
        read_shard(url, "", 0, move |s| {
            sink.lock().unwrap().push(s.members["png"].to_vec());
            async { ControlFlow::Continue(()) }
        })
        .await
        .unwrap();
    }
    let v = got.lock().unwrap().clone();
    v
}

#[tokio::test]
async fn image_folder_with_splits_sidecar_captions_and_a_corrupt_file() {
    let src = scratch("folder-src");
    png(&src.join("train/cat/a.png"), 10);
    png(&src.join("train/cat/b.png"), 20);
    std::fs::write(src.join("train/cat/b.txt"), "a grey cat\n").unwrap();
    png(&src.join("train/dog/c.png"), 30);
    std::fs::write(src.join("train/dog/broken.jpg"), b"\xFF\xD8\xFFnot really").unwrap();
    png(&src.join("val/dog/d.png"), 40);
    let out = scratch("folder-out");
    let m = import_listing(
        "folder",
        &src,
        &options(&out, &[], Some("a photo of a {}.")),
        1 << 20,
    )
    .await
    .unwrap();
    assert_eq!(m.classes, ["cat", "dog"]);
    assert_eq!(m.splits["train"].samples, 3);
    assert_eq!(m.splits["train"].per_class, [2, 1]);
    assert_eq!(m.splits["test"].samples, 1);
    assert_eq!(m.skipped["unreadable image"], 1);
    let got = members(&m.splits["train"].shards).await;
    assert_eq!(
        got,
        [
            (Some("0".into()), Some("a photo of a cat.".into())),
            (Some("0".into()), Some("a grey cat".into())),
            (Some("1".into()), Some("a photo of a dog.".into())),
        ]
    );
}

#[tokio::test]
async fn csv_rows_with_missing_files_and_unknown_classes_are_counted() {
    let src = scratch("csv-src");
    png(&src.join("img/1.png"), 1);
    png(&src.join("img/2.png"), 2);
    png(&src.join("img/3.png"), 3);
    std::fs::write(
        src.join("list.csv"),
        "path,caption,label\nimg/1.png,\"a cat, asleep\",cat\nimg/2.png,a dog,dog\n\
         img/missing.png,gone,cat\nimg/3.png,a bird,bird\n",
    )
    .unwrap();
    let out = scratch("csv-out");
    let m = import_listing(
        "csv",
        &src.join("list.csv"),
        &options(&out, &["cat", "dog"], None),
        1 << 20,
    )
    .await
    .unwrap();
    assert_eq!(m.splits["train"].samples, 2);
    assert_eq!(m.skipped["missing file"], 1);
    assert_eq!(m.skipped["unknown class"], 1);
    let got = members(&m.splits["train"].shards).await;
    assert_eq!(
        got,
        [
            (Some("0".into()), Some("a cat, asleep".into())),
            (Some("1".into()), Some("a dog".into())),
        ]
    );
    // Without --classes the distinct labels are the classes.
    let out2 = scratch("csv-out2");
    let m = import_listing(
        "csv",
        &src.join("list.csv"),
        &options(&out2, &[], None),
        1 << 20,
    )
    .await
    .unwrap();
    assert_eq!(m.classes, ["bird", "cat", "dog"]);
    assert_eq!(m.splits["train"].samples, 3);
    std::fs::write(src.join("bad.tsv"), "only-one-field\n").unwrap();
    let err = import_listing(
        "csv",
        &src.join("bad.tsv"),
        &options(&out2, &[], None),
        1 << 20,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("bad.tsv line 1"), "{err}");
}

#[tokio::test]
async fn a_flat_folder_gets_a_held_out_test_split_per_class() {
    let src = scratch("holdout-src");
    for i in 0..10 {
        png(&src.join(format!("cat/{i}.png")), i);
    }
    for i in 0..5 {
        png(&src.join(format!("dog/{i}.png")), 100 + i);
    }
    let out = scratch("holdout-out");
    let mut opts = options(&out, &[], None);
    opts.test_fraction = Some(0.2);
    let m = import_listing("folder", &src, &opts, 1 << 20)
        .await
        .unwrap();
    assert_eq!(m.splits["train"].per_class, [8, 4]);
    assert_eq!(m.splits["test"].per_class, [2, 1]);
    let train = members(&m.splits["train"].shards).await;
    let test = members(&m.splits["test"].shards).await;
    assert_eq!((train.len(), test.len()), (12, 3));
    // A second import holds out the same samples (keys carry the position in the split).
    let again = import_listing("folder", &src, &opts, 1 << 20)
        .await
        .unwrap();
    let held = images(&m.splits["test"].shards).await;
    assert_eq!(images(&again.splits["test"].shards).await, held);
    assert!(images(&m.splits["train"].shards)
        .await
        .iter()
        .all(|t| !held.contains(t)));
    // A source that has its own test split, and a fraction outside (0, 1), are refused.
    png(&src.join("test/cat/t.png"), 7);
    std::fs::create_dir_all(src.join("train")).unwrap();
    let err = import_listing("folder", &src, &opts, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already has a test split"),
        "{err}"
    );
    opts.test_fraction = Some(1.0);
    let err = import_listing("folder", &src, &opts, 1 << 20)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--test-fraction (1)"), "{err}");
}
