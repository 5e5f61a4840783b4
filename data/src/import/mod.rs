//! `contrail data import`: a dataset in a layout users have, written as WebDataset shards with
//! a `dataset.json` manifest (class names, per-split sample and class counts, skipped input).
//!
//! Layouts: MNIST-style IDX files ([`idx`]; Fashion-MNIST from the Debian package
//! `dataset-fashion-mnist` is the real dataset of our tests and benchmarks), an image folder
//! tree and a CSV/TSV listing ([`listing`]). An IDX sample becomes `KEY.png` (lossless;
//! grayscale stays one channel, the decoder replicates it); a listed image keeps its file's
//! bytes (`KEY.jpg|png|webp`) once it decodes. Beside it: `KEY.cls` (the class index) and
//! `KEY.txt` (the listing's caption, or one from the caption template).

pub mod idx;
pub mod listing;
pub mod shards;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use object_store::PutPayload;
use serde::Serialize;

use contrail_common::storage::resolve;
use listing::Listed;
use shards::{ImportedSample, ShardWriter};

/// Fashion-MNIST's class names, in label order (its README).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// What every importer is told.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub out: String,
    pub s3_endpoint: String,
    pub shard_size: usize,
    /// Class names in label order; labels at or past its end are skipped as unknown classes.
    pub classes: Vec<String>,
    /// Caption per sample from its class name: `{}` is replaced by the name.
    pub caption_template: Option<String>,
    /// At most this many samples per split (for quick runs and tests).
    pub limit: Option<usize>,
    /// Folder and CSV layouts without a test split: hold out this fraction of every class as
    /// the test split ([`listing::hold_out`]).
    pub test_fraction: Option<f64>,
}

/// One split in `dataset.json`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct SplitManifest {
    pub samples: u64,
    pub shards: Vec<String>,
    pub bytes: u64,
    /// Samples per class, in class order.
    pub per_class: Vec<u64>,
}

/// `dataset.json`: written last, after every shard.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct DatasetManifest {
    /// The layout imported from ("idx", ...) and from where.
    pub format: String,
    pub source: String,
    pub classes: Vec<String>,
    pub caption_template: Option<String>,
    pub splits: BTreeMap<String, SplitManifest>,
    /// Input that was skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
}

/// Prints `import: <split> n/total` every few seconds, and at the end.
struct Progress {
    split: String,
    total: usize,
    last: Instant,
}

impl Progress {
    /// Prints when `last` or when two seconds have passed since the previous line.
    fn tick(&mut self, done: usize, shards: usize, last: bool) {
        if last || self.last.elapsed().as_secs_f64() >= 2.0 {
            eprintln!(
                "import: {} {done}/{} samples ({:.0}%), {shards} shards",
                self.split,
                self.total,
                100.0 * done as f64 / self.total.max(1) as f64
            );
            self.last = Instant::now();
        }
    }
}

fn png_gray(pixels: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(pixels, w, h, ExtendedColorType::L8)
        .context("encoding a PNG")?;
    Ok(out)
}

/// Imports an MNIST-style IDX folder (train and t10k files, plain or gzipped).
pub async fn import_idx(dir: &Path, options: &ImportOptions) -> Result<DatasetManifest> {
    if options.classes.is_empty() {
        bail!("import: no class names");
    }
    if options.test_fraction.is_some() {
        bail!("import: IDX files have their own test split (t10k-*); --test-fraction is for folder and csv");
    }
    check_template(options)?;
    let mut manifest = DatasetManifest {
        format: "idx".into(),
        source: dir.display().to_string(),
        classes: options.classes.clone(),
        caption_template: options.caption_template.clone(),
        ..Default::default()
    };
    for split in ["train", "test"] {
        let (img_path, lbl_path) = idx::split_files(dir, split)?;
        let images = idx::parse_images(
            &idx::read_maybe_gz(&img_path)?,
            &img_path.display().to_string(),
        )?;
        let labels = idx::parse_labels(
            &idx::read_maybe_gz(&lbl_path)?,
            &lbl_path.display().to_string(),
        )?;
        if labels.len() != images.count {
            bail!(
                "{} holds {} images but {} holds {} labels",
                img_path.display(),
                images.count,
                lbl_path.display(),
                labels.len()
            );
        }
        let total = options.limit.unwrap_or(usize::MAX).min(images.count);
        let mut writer = ShardWriter::new(
            &options.out,
            split,
            &options.s3_endpoint,
            options.shard_size,
        );
        let mut progress = Progress {
            split: split.into(),
            total,
            last: Instant::now(),
        };
        for (i, &label) in labels.iter().enumerate().take(total) {
            let label = label as usize;
            let Some(class) = options.classes.get(label) else {
                *manifest.skipped.entry("unknown class".into()).or_default() += 1;
                continue;
            };
            let png = png_gray(images.image(i), images.cols as u32, images.rows as u32)?;
            let mut members = vec![("png", png), ("cls", label.to_string().into_bytes())];
            if let Some(t) = &options.caption_template {
                members.push(("txt", t.replace("{}", class).into_bytes()));
            }
            writer
                .push(ImportedSample {
                    key: format!("{split}-{i:06}"),
                    members,
                    label: Some(label),
                })
                .await?;
            progress.tick(i + 1, writer.shards.len(), false);
        }
        writer.finish().await?;
        progress.tick(total, writer.shards.len(), true);
        manifest
            .splits
            .insert(split.into(), writer.manifest(options.classes.len()));
    }
    write_manifest(&options.out, &options.s3_endpoint, &manifest).await?;
    Ok(manifest)
}

/// Refuses a caption template without the `{}` the class name goes into.
fn check_template(options: &ImportOptions) -> Result<()> {
    match &options.caption_template {
        Some(t) if !t.contains("{}") => {
            bail!("import: caption template {t:?} has no {{}} for the class name")
        }
        _ => Ok(()),
    }
}

/// Writes `OUT/dataset.json`.
pub async fn write_manifest(out: &str, s3_endpoint: &str, m: &DatasetManifest) -> Result<()> {
    let url = format!("{}/dataset.json", out.trim_end_matches('/'));
    let loc = resolve(&url, s3_endpoint)?;
    let body = serde_json::to_vec_pretty(m)?;
    loc.store
        .put(&loc.path, PutPayload::from(body))
        .await
        .with_context(|| format!("writing {}", loc.url))?;
    Ok(())
}

/// Reads `OUT/dataset.json` back.
pub async fn read_manifest(out: &str, s3_endpoint: &str) -> Result<DatasetManifest> {
    let url = format!("{}/dataset.json", out.trim_end_matches('/'));
    let loc = resolve(&url, s3_endpoint)?;
    let bytes = loc
        .store
        .get(&loc.path)
        .await
        .with_context(|| format!("reading {}", loc.url))?
        .bytes()
        .await?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", loc.url))
}

/// The class list a listing's samples are labelled against: `options.classes` when given,
/// else the folder names found, else (CSV) the distinct labels: `0..=max` when all are
/// integers, their sorted names otherwise.
fn listing_classes(options: &ImportOptions, found: Vec<String>, listed: &[&Listed]) -> Vec<String> {
    if !options.classes.is_empty() {
        return options.classes.clone();
    }
    if !found.is_empty() {
        return found;
    }
    let labels: std::collections::BTreeSet<&str> =
        listed.iter().filter_map(|l| l.class.as_deref()).collect();
    let ints: Option<Vec<usize>> = labels.iter().map(|l| l.parse().ok()).collect();
    match ints {
        Some(v) if !v.is_empty() => (0..=*v.iter().max().expect("not empty"))
            .map(|i| i.to_string())
            .collect(),
        _ => labels.into_iter().map(str::to_string).collect(),
    }
}

/// A listed class (a name, or an index) as its index in `classes`.
fn class_index(classes: &[String], class: &str) -> Option<usize> {
    classes
        .iter()
        .position(|c| c == class)
        .or_else(|| class.parse().ok().filter(|&i: &usize| i < classes.len()))
}

/// Imports an image folder (`folder`) or a CSV/TSV listing (`csv`); see [`listing`].
pub async fn import_listing(
    format: &str,
    source: &Path,
    options: &ImportOptions,
    max_image_pixels: u64,
) -> Result<DatasetManifest> {
    check_template(options)?;
    let (mut splits, found) = match format {
        "folder" => listing::image_folder(source)?,
        "csv" => (
            BTreeMap::from([("train".to_string(), listing::csv_listing(source)?)]),
            Vec::new(),
        ),
        other => bail!("import: format {other:?} is not a listing (folder, csv)"),
    };
    if let Some(fraction) = options.test_fraction {
        if !(fraction > 0.0 && fraction < 1.0) {
            bail!("import: --test-fraction ({fraction}) must lie strictly between 0 and 1");
        }
        if splits.contains_key("test") {
            bail!(
                "import: {} already has a test split (test/ or val/); --test-fraction is for layouts without one",
                source.display()
            );
        }
        let listed = splits.remove("train").unwrap_or_default();
        let (train, test) = listing::hold_out(listed, fraction);
        splits.insert("train".into(), train);
        splits.insert("test".into(), test);
    }
    let all: Vec<&Listed> = splits.values().flatten().collect();
    let classes = listing_classes(options, found, &all);
    let mut manifest = DatasetManifest {
        format: format.into(),
        source: source.display().to_string(),
        classes: classes.clone(),
        caption_template: options.caption_template.clone(),
        ..Default::default()
    };
    for (split, listed) in &splits {
        let total = options.limit.unwrap_or(usize::MAX).min(listed.len());
        let mut writer = ShardWriter::new(
            &options.out,
            split,
            &options.s3_endpoint,
            options.shard_size,
        );
        let mut progress = Progress {
            split: split.clone(),
            total,
            last: Instant::now(),
        };
        for (i, item) in listed.iter().take(total).enumerate() {
            let mut skip = |reason: &str| {
                tracing::warn!(path = %item.path.display(), "import: skipped ({reason})");
                *manifest.skipped.entry(reason.to_string()).or_default() += 1;
            };
            let label = match &item.class {
                None => None,
                Some(c) => match class_index(&classes, c) {
                    Some(i) => Some(i),
                    None => {
                        skip("unknown class");
                        continue;
                    }
                },
            };
            let Ok(bytes) = std::fs::read(&item.path) else {
                skip("missing file");
                continue;
            };
            let ext = match crate::decode::sniff_format(&bytes) {
                Some(crate::decode::ImageFormat::Jpeg) => "jpg",
                Some(crate::decode::ImageFormat::Png) => "png",
                Some(crate::decode::ImageFormat::WebP) => "webp",
                None => {
                    skip("unreadable image");
                    continue;
                }
            };
            if crate::decode::decode_rgb(&bytes, max_image_pixels).is_err() {
                skip("unreadable image");
                continue;
            }
            let caption = item.caption.clone().or_else(|| {
                let t = options.caption_template.as_ref()?;
                Some(t.replace("{}", &classes[label?]))
            });
            let mut members = vec![(ext, bytes)];
            if let Some(l) = label {
                members.push(("cls", l.to_string().into_bytes()));
            }
            if let Some(c) = caption {
                members.push(("txt", c.into_bytes()));
            }
            writer
                .push(ImportedSample {
                    key: format!("{split}-{i:06}"),
                    members,
                    label,
                })
                .await?;
            progress.tick(i + 1, writer.shards.len(), false);
        }
        writer.finish().await?;
        progress.tick(total, writer.shards.len(), true);
        manifest
            .splits
            .insert(split.clone(), writer.manifest(classes.len()));
    }
    write_manifest(&options.out, &options.s3_endpoint, &manifest).await?;
    Ok(manifest)
}
