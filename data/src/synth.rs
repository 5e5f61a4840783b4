//! Synthetic WebDataset shards (`contrail data synth`): one coloured shape per image on a plain
//! or gradient greyish background, with a caption that says what and where it is.
//!
//! The shape fills a good part of the image (a radius of 20–40% of its side) and the
//! background is a faintly tinted grey: with small shapes on saturated backgrounds of any
//! colour, telling two images apart needed only the background's colour, and SimCLR learnt
//! nothing about shapes (held-out kNN on the shape no better than a random network).
//!
//! Every sample is a function of `(seed, index)` alone, so a dataset is reproducible whatever the
//! shard size, and shards can be rendered in parallel. The class id is the shape kind (colour is
//! what SimCLR's colour jitter teaches the encoder to ignore, so shape is the linear-probe
//! target); the `.json` member carries every attribute for other probes.

use crate::tar_stream::TarBuilder;
use anyhow::{bail, Context, Result};
use contrail_common::storage::resolve;
use image::{ExtendedColorType, RgbImage};
use object_store::PutPayload;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Shape kinds; the index is the class id written to `.cls`.
pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "cross", "ring", "diamond"];

/// Named palette for shapes: saturated and far apart so colour names are unambiguous.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 70, 220]),
    ("yellow", [240, 220, 30]),
    ("purple", [140, 50, 200]),
    ("orange", [250, 140, 20]),
    ("white", [250, 250, 250]),
    ("black", [10, 10, 10]),
];

const SIZES: [(&str, f64, f64); 3] = [
    ("small", 0.20, 0.25),
    ("medium", 0.26, 0.32),
    ("large", 0.33, 0.40),
];

/// Minimum RGB distance between the shape and every background colour, so the shape is
/// always visible.
const MIN_CONTRAST: f64 = 110.0;
const JPEG_QUALITY: u8 = 90;

/// Everything that was drawn, as stored in the sample's `.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthAttributes {
    pub index: u64,
    pub shape: String,
    pub shape_id: u32,
    pub colour: String,
    pub colour_id: u32,
    /// "small", "medium" or "large".
    pub size: String,
    /// Which ninth of the image holds the shape's centre ("top left", "center", ...).
    pub position: String,
    /// Centre and radius in pixels.
    pub cx: f64,
    pub cy: f64,
    pub radius: f64,
    /// "plain" or "gradient".
    pub background: String,
    pub background_from: [u8; 3],
    pub background_to: [u8; 3],
    pub caption: String,
}

/// What [`write_synth_dataset`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSummary {
    /// Number of shards written.
    pub shards: u64,
    /// Their URLs, in order.
    pub shard_urls: Vec<String>,
    pub samples: u64,
    /// Total bytes of all shards.
    pub bytes: u64,
    /// Number of classes in `.cls` (shape kinds).
    pub classes: u32,
}

/// SplitMix64: tiny, fast, and fixed forever, so datasets stay reproducible across versions
/// of any RNG crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn for_sample(seed: u64, index: u64) -> Self {
        let mut r = Self(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }

    /// A greyish background colour: a grey level with a faint tint, so the background says
    /// little about the image once colour jitter has changed its brightness.
    fn colour(&mut self) -> [u8; 3] {
        let grey = self.range(20.0, 235.0);
        std::array::from_fn(|_| (grey + self.range(-12.0, 12.0)).clamp(0.0, 255.0) as u8)
    }
}

fn distance(a: [u8; 3], b: [u8; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn lerp(a: [u8; 3], b: [u8; 3], t: f64) -> [u8; 3] {
    std::array::from_fn(|c| (a[c] as f64 * (1.0 - t) + b[c] as f64 * t).round() as u8)
}

fn position_name(cx: f64, cy: f64, size: f64) -> &'static str {
    const NAMES: [[&str; 3]; 3] = [
        ["top left", "top center", "top right"],
        ["middle left", "center", "middle right"],
        ["bottom left", "bottom center", "bottom right"],
    ];
    let third = |v: f64| ((v / size * 3.0) as usize).min(2);
    NAMES[third(cy)][third(cx)]
}

/// Draws the attributes of sample `index` (no pixels yet).
pub fn sample_attributes(seed: u64, index: u64, image_size: u32) -> SynthAttributes {
    let mut rng = SplitMix64::for_sample(seed, index);
    let s = image_size as f64;
    let shape_id = rng.below(SHAPES.len());
    let colour_id = rng.below(COLOURS.len());
    let (size, lo, hi) = SIZES[rng.below(SIZES.len())];
    let radius = rng.range(lo, hi) * s;
    let cx = rng.range(radius, s - radius);
    let cy = rng.range(radius, s - radius);
    let gradient = rng.unit() < 0.5;
    let shape_rgb = COLOURS[colour_id].1;
    // A background contrasts when every colour along its gradient stays far from the shape.
    let contrasts = |from: [u8; 3], to: [u8; 3]| {
        (0..=8).all(|k| distance(lerp(from, to, k as f64 / 8.0), shape_rgb) >= MIN_CONTRAST)
    };
    // Rejection sampling keeps the draw deterministic; the grey fallbacks are for the
    // vanishingly rare run of 64 misses, and one of them contrasts with any palette colour.
    let from = (0..64)
        .map(|_| rng.colour())
        .find(|c| contrasts(*c, *c))
        .unwrap_or(if contrasts([128; 3], [128; 3]) {
            [128; 3]
        } else {
            [40; 3]
        });
    let to = if gradient {
        (0..64)
            .map(|_| rng.colour())
            .find(|c| contrasts(from, *c))
            .unwrap_or(from)
    } else {
        from
    };
    let position = position_name(cx, cy, s);
    let colour = COLOURS[colour_id].0;
    let shape = SHAPES[shape_id];
    SynthAttributes {
        index,
        shape: shape.into(),
        shape_id: shape_id as u32,
        colour: colour.into(),
        colour_id: colour_id as u32,
        size: size.into(),
        position: position.into(),
        cx,
        cy,
        radius,
        background: if gradient { "gradient" } else { "plain" }.into(),
        background_from: from,
        background_to: to,
        caption: format!("a {size} {colour} {shape} in the {position}"),
    }
}

/// Whether the offset (dx, dy) from the centre lies inside the shape of radius r.
fn inside(shape_id: u32, dx: f64, dy: f64, r: f64) -> bool {
    match SHAPES[shape_id as usize] {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
        // Upward triangle with its apex at (0, -r) and base at dy = r/2.
        "triangle" => dy >= -r && dy <= 0.5 * r && dx.abs() <= (dy + r) * 0.577,
        "cross" => (dx.abs() <= 0.3 * r && dy.abs() <= r) || (dy.abs() <= 0.3 * r && dx.abs() <= r),
        "ring" => {
            let d2 = dx * dx + dy * dy;
            d2 <= r * r && d2 >= 0.36 * r * r
        }
        _ => dx.abs() + dy.abs() <= r,
    }
}

/// Renders the attributes to pixels (4× supersampled edges).
pub fn render(a: &SynthAttributes, image_size: u32) -> RgbImage {
    let s = image_size as f64;
    let shape_rgb = COLOURS[a.colour_id as usize].1;
    // Diagonal gradient for "gradient"; from == to for "plain".
    RgbImage::from_fn(image_size, image_size, |x, y| {
        let t = (x as f64 + y as f64) / (2.0 * s);
        let bg = lerp(a.background_from, a.background_to, t);
        let mut covered = 0;
        for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
            if inside(
                a.shape_id,
                x as f64 + sx - a.cx,
                y as f64 + sy - a.cy,
                a.radius,
            ) {
                covered += 1;
            }
        }
        let w = covered as f64 / 4.0;
        image::Rgb(std::array::from_fn(|c| {
            (shape_rgb[c] as f64 * w + bg[c] as f64 * (1.0 - w)).round() as u8
        }))
    })
}

/// The members of sample `index`: (extension, bytes) for jpg, txt, cls, json.
pub fn render_sample(
    seed: u64,
    index: u64,
    image_size: u32,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let attrs = sample_attributes(seed, index, image_size);
    let pixels = render(&attrs, image_size);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
        .encode(
            pixels.as_raw(),
            image_size,
            image_size,
            ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("encoding synthetic sample {index} as JPEG"))?;
    Ok(vec![
        ("jpg", jpeg),
        ("txt", attrs.caption.clone().into_bytes()),
        ("cls", attrs.shape_id.to_string().into_bytes()),
        ("json", serde_json::to_vec(&attrs)?),
    ])
}

/// WebDataset key of sample `index`.
pub fn sample_key(index: u64) -> String {
    format!("{index:09}")
}

/// Builds one shard holding samples `first..first + count`.
pub fn build_shard(seed: u64, first: u64, count: u64, image_size: u32) -> Result<Vec<u8>> {
    let rendered: Vec<_> = (first..first + count)
        .into_par_iter()
        .map(|i| render_sample(seed, i, image_size).map(|m| (i, m)))
        .collect::<Result<_>>()?;
    let mut tar = TarBuilder::new();
    for (i, members) in rendered {
        let key = sample_key(i);
        for (ext, data) in members {
            tar.append(&format!("{key}.{ext}"), &data);
        }
    }
    Ok(tar.finish())
}

/// Writes `samples` synthetic samples as shards `synth-000000.tar`, `synth-000001.tar`, ... of
/// `shard_size` samples each under `out_url` (any URL `resolve` accepts).
pub async fn write_synth_dataset(
    out_url: &str,
    s3_endpoint: &str,
    samples: u64,
    shard_size: u64,
    image_size: u32,
    seed: u64,
) -> Result<SynthSummary> {
    if shard_size == 0 {
        bail!("synthetic dataset: shard size must be at least 1 sample");
    }
    if !(8..=4096).contains(&image_size) {
        bail!("synthetic dataset: image size {image_size} is outside 8..=4096 pixels");
    }
    let base = out_url.trim_end_matches('/');
    let mut summary = SynthSummary {
        shards: 0,
        shard_urls: Vec::new(),
        samples: 0,
        bytes: 0,
        classes: SHAPES.len() as u32,
    };
    let shard_count = samples.div_ceil(shard_size);
    for shard in 0..shard_count {
        let first = shard * shard_size;
        let count = shard_size.min(samples - first);
        let data = tokio::task::spawn_blocking(move || build_shard(seed, first, count, image_size))
            .await
            .context("synthetic shard renderer panicked")??;
        let url = format!("{base}/synth-{shard:06}.tar");
        let loc = resolve(&url, s3_endpoint)?;
        let len = data.len() as u64;
        loc.store
            .put(&loc.path, PutPayload::from(data))
            .await
            .with_context(|| format!("writing synthetic shard {}", loc.url))?;
        summary.shards += 1;
        summary.shard_urls.push(loc.url);
        summary.samples += count;
        summary.bytes += len;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard_reader::read_shard;
    use std::ops::ControlFlow;

    #[test]
    fn samples_depend_only_on_seed_and_index() {
        let a = render_sample(7, 3, 32).unwrap();
        assert_eq!(a, render_sample(7, 3, 32).unwrap());
        assert_ne!(a, render_sample(8, 3, 32).unwrap());
        assert_ne!(a, render_sample(7, 4, 32).unwrap());
        // Shard layout does not change the samples.
        let one = build_shard(7, 2, 1, 32).unwrap();
        let mut b = TarBuilder::new();
        for (ext, data) in render_sample(7, 2, 32).unwrap() {
            b.append(&format!("{}.{ext}", sample_key(2)), &data);
        }
        assert_eq!(one, b.finish());
    }

    #[test]
    fn pixels_match_the_attributes() {
        for index in 0..40 {
            let a = sample_attributes(11, index, 64);
            let img = render(&a, 64);
            let shape_rgb = COLOURS[a.colour_id as usize].1;
            let (mut n, mut sx, mut sy) = (0.0, 0.0, 0.0);
            for (x, y, p) in img.enumerate_pixels() {
                if distance(p.0, shape_rgb) < 1.0 {
                    n += 1.0;
                    sx += x as f64 + 0.5;
                    sy += y as f64 + 0.5;
                }
            }
            assert!(n > 10.0, "sample {index}: shape not drawn: {a:?}");
            // Every shape but the triangle is symmetric about its centre.
            if a.shape != "triangle" {
                assert!((sx / n - a.cx).abs() < 1.0, "{index}: {} vs {a:?}", sx / n);
                assert!((sy / n - a.cy).abs() < 1.0, "{index}: {} vs {a:?}", sy / n);
            }
            for corner in [(0, 0), (63, 0), (0, 63), (63, 63)] {
                let p = img.get_pixel(corner.0, corner.1).0;
                assert!(
                    distance(p, shape_rgb) >= MIN_CONTRAST - 10.0,
                    "{index}: corner {corner:?}"
                );
            }
        }
    }

    #[test]
    fn shapes_colours_and_sizes_are_all_used() {
        let mut shapes = [0u32; SHAPES.len()];
        let mut colours = [0u32; COLOURS.len()];
        let mut sizes = std::collections::BTreeMap::new();
        for i in 0..1200 {
            let a = sample_attributes(5, i, 64);
            shapes[a.shape_id as usize] += 1;
            colours[a.colour_id as usize] += 1;
            *sizes.entry(a.size.clone()).or_insert(0) += 1;
            assert!(a.cx - a.radius >= 0.0 && a.cx + a.radius <= 64.0, "{a:?}");
            assert!(a.caption.contains(&a.shape) && a.caption.contains(&a.position));
        }
        assert!(shapes.iter().all(|n| (140..=260).contains(n)), "{shapes:?}");
        assert!(
            colours.iter().all(|n| (100..=200).contains(n)),
            "{colours:?}"
        );
        assert_eq!(sizes.len(), 3);
    }

    #[tokio::test]
    async fn dataset_round_trips_through_the_shard_reader() {
        let out = "memory://synth-test/ds";
        let summary = write_synth_dataset(out, "", 10, 4, 64, 42).await.unwrap();
        assert_eq!(summary.samples, 10);
        assert_eq!(summary.shards, 3);
        assert_eq!(
            summary.shard_urls,
            [0, 1, 2].map(|i| format!("{out}/synth-{i:06}.tar"))
        );
        let mut keys = Vec::new();
        for url in &summary.shard_urls {
            let stats = read_shard(url, "", 0, |s| {
                let img = image::load_from_memory(&s.members["jpg"]).expect("valid JPEG");
                assert_eq!((img.width(), img.height()), (64, 64));
                let attrs: SynthAttributes = serde_json::from_slice(&s.members["json"]).unwrap();
                assert_eq!(s.caption().unwrap().unwrap(), attrs.caption);
                assert_eq!(s.class_id(), Some(attrs.shape_id as i64));
                assert_eq!(s.key, sample_key(attrs.index));
                keys.push(s.key);
                async { ControlFlow::Continue(()) }
            })
            .await
            .unwrap();
            assert!(stats.bad.is_empty());
        }
        assert_eq!(keys, (0..10).map(sample_key).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn bad_arguments_are_rejected() {
        assert!(
            write_synth_dataset("memory://synth-test/x", "", 4, 0, 64, 0)
                .await
                .is_err()
        );
        assert!(write_synth_dataset("memory://synth-test/x", "", 4, 2, 4, 0)
            .await
            .is_err());
    }
}
