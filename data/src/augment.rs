//! SimCLR two-view augmentation: RGB8 image → normalized f32 CHW, with torchvision semantics.
//!
//! Per view, in torchvision's order: RandomResizedCrop (bilinear, antialiased like PIL),
//! horizontal flip, ColorJitter (brightness, contrast, saturation, hue in random order),
//! random grayscale, Gaussian blur, Normalize. Parameters are drawn first ([`ViewParams`]),
//! then applied in as few passes as the ops allow:
//!
//! 1. crop + resize on u8 (`fast_image_resize`, SIMD convolution like PIL's BILINEAR);
//! 2. one row-by-row pass: deinterleave + flip + ÷255 into f32 planes, then the jitter ops that
//!    come before contrast, accumulating the grey mean that contrast needs;
//! 3. if contrast was drawn, a second row pass for contrast and the ops after it;
//!    grayscale, the horizontal blur and (without blur) normalization run on the row while it
//!    is still in L1;
//! 4. with blur, a vertical pass that also normalizes into the output.
//!
//! Colour ops work on f32 in [0, 1] and clamp after each op like torchvision's float path;
//! torchvision on PIL images rounds to u8 between ops, a difference below 1/255 per op.

use crate::decode::RgbImage;
use contrail_common::config::AugmentConfig;
use contrail_common::shards::SplitMix64;
use fast_image_resize as fir;

/// ITU-R 601-2 luma, as PIL's `convert("L")` and torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];
/// torchvision RandomResizedCrop's default aspect-ratio range.
const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// f32 lanes of an AVX2 register: the width the hot loops are blocked for.
const LANES: usize = 8;
/// SimCLR's blur sigma range.
const BLUR_SIGMA: (f64, f64) = (0.1, 2.0);

/// Uniform in [lo, hi).
fn uniform(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    let unit = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    lo + (hi - lo) * unit
}

fn bernoulli(rng: &mut SplitMix64, p: f32) -> bool {
    uniform(rng, 0.0, 1.0) < f64::from(p)
}

/// The crop or resize could not run (a bug or an inconsistent image buffer, never a random draw).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("augmentation failed: {0}")]
pub struct AugmentError(pub String);

/// A crop rectangle in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// torchvision `RandomResizedCrop.get_params`: ten tries at an area fraction in `scale` and a
/// log-uniform aspect ratio in `ratio`, then a centre crop with the ratio clamped.
pub fn random_resized_crop(
    width: u32,
    height: u32,
    scale: (f32, f32),
    ratio: (f64, f64),
    rng: &mut SplitMix64,
) -> CropBox {
    let (w_img, h_img) = (f64::from(width), f64::from(height));
    let area = w_img * h_img;
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, f64::from(scale.0), f64::from(scale.1));
        let aspect = uniform(rng, log_ratio.0, log_ratio.1).exp();
        let w = (target_area * aspect).sqrt().round();
        let h = (target_area / aspect).sqrt().round();
        if w > 0.0 && w <= w_img && h > 0.0 && h <= h_img {
            let (w, h) = (w as u32, h as u32);
            let top = rng.below(u64::from(height - h) + 1) as u32;
            let left = rng.below(u64::from(width - w) + 1) as u32;
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = w_img / h_img;
    let (w, h) = if in_ratio < ratio.0 {
        (width, ((w_img / ratio.0).round() as u32).clamp(1, height))
    } else if in_ratio > ratio.1 {
        (((h_img * ratio.1).round() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorOp {
    /// Multiply by the factor.
    Brightness(f32),
    /// Blend with the image's mean grey level.
    Contrast(f32),
    /// Blend with each pixel's grey level.
    Saturation(f32),
    /// Rotate hue by this fraction of a turn (in [-0.5, 0.5]).
    Hue(f32),
}

/// Everything random about one view, drawn before any pixel is touched.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewParams {
    pub crop: CropBox,
    pub flip: bool,
    /// Colour-jitter ops in the order they apply (empty when jitter was not drawn).
    pub jitter: Vec<ColorOp>,
    pub grayscale: bool,
    pub blur_sigma: Option<f32>,
}

impl ViewParams {
    /// Draws the parameters of one view in torchvision's order.
    pub fn sample(cfg: &AugmentConfig, width: u32, height: u32, rng: &mut SplitMix64) -> Self {
        let crop = random_resized_crop(
            width,
            height,
            (cfg.crop_scale_min, cfg.crop_scale_max),
            CROP_RATIO,
            rng,
        );
        let flip = bernoulli(rng, cfg.flip_p);
        let mut jitter = Vec::new();
        if bernoulli(rng, cfg.jitter_p) {
            // ColorJitter.get_params: a random permutation, then each factor.
            let mut order = [0u8, 1, 2, 3];
            for i in (1..4).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let factor = |rng: &mut SplitMix64, spread: f32| {
                uniform(
                    rng,
                    f64::from((1.0 - spread).max(0.0)),
                    f64::from(1.0 + spread),
                ) as f32
            };
            let b = factor(rng, cfg.brightness);
            let c = factor(rng, cfg.contrast);
            let s = factor(rng, cfg.saturation);
            let h = uniform(rng, -f64::from(cfg.hue), f64::from(cfg.hue)) as f32;
            for op in order {
                // A zero spread disables the op, as torchvision's `None`.
                match op {
                    0 if cfg.brightness > 0.0 => jitter.push(ColorOp::Brightness(b)),
                    1 if cfg.contrast > 0.0 => jitter.push(ColorOp::Contrast(c)),
                    2 if cfg.saturation > 0.0 => jitter.push(ColorOp::Saturation(s)),
                    3 if cfg.hue > 0.0 => jitter.push(ColorOp::Hue(h)),
                    _ => {}
                }
            }
        }
        let grayscale = bernoulli(rng, cfg.grayscale_p);
        let blur_sigma =
            bernoulli(rng, cfg.blur_p).then(|| uniform(rng, BLUR_SIGMA.0, BLUR_SIGMA.1) as f32);
        Self {
            crop,
            flip,
            jitter,
            grayscale,
            blur_sigma,
        }
    }
}

/// SimCLR's blur kernel: about 10% of the output side, made odd (23 at 224, 3 at 32).
pub fn blur_kernel_size(size: u32) -> usize {
    let k = (size as f32 * 0.1) as usize;
    if k.is_multiple_of(2) {
        k + 1
    } else {
        k
    }
}

/// torchvision `_get_gaussian_kernel1d`: samples at integer offsets, normalized to sum 1.
pub fn gaussian_kernel(ksize: usize, sigma: f32) -> Vec<f32> {
    let r = (ksize / 2) as f32;
    let mut k: Vec<f32> = (0..ksize)
        .map(|i| {
            let x = (i as f32 - r) / sigma;
            (-0.5 * x * x).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

/// Reflect padding without repeating the edge (torch's "reflect"); needs `i` within one
/// length of the range, which holds because the blur radius is below the image side.
#[inline(always)]
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let j = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    j.clamp(0, n - 1) as usize
}

/// Reusable state for augmenting views at one output size (one per thread).
pub struct Augmenter {
    cfg: AugmentConfig,
    size: usize,
    blur_ksize: usize,
    resizer: fir::Resizer,
    resize_opts: fir::ResizeOptions,
    /// Cropped and resized view, interleaved RGB8.
    resized: Vec<u8>,
    /// Three f32 planes of `size²`, values in [0, 1].
    planes: Vec<f32>,
    /// One row with blur padding on both sides.
    padded: Vec<f32>,
    /// Accumulator row for the vertical blur.
    acc: Vec<f32>,
}

impl Augmenter {
    pub fn new(cfg: &AugmentConfig, size: u32) -> Self {
        let s = size as usize;
        let blur_ksize = blur_kernel_size(size);
        Self {
            cfg: cfg.clone(),
            size: s,
            blur_ksize,
            resizer: fir::Resizer::new(),
            resize_opts: fir::ResizeOptions::new()
                .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear)),
            resized: vec![0; 3 * s * s],
            planes: vec![0.0; 3 * s * s],
            padded: vec![0.0; s + blur_ksize],
            acc: vec![0.0; s],
        }
    }

    /// Side of the square output.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Floats in one view: `3 × size²` (CHW).
    pub fn view_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Two independent views of `img` (SimCLR's positive pair) into `out1` and `out2`.
    pub fn two_views(
        &mut self,
        img: &RgbImage,
        rng: &mut SplitMix64,
        out1: &mut [f32],
        out2: &mut [f32],
    ) -> Result<(), AugmentError> {
        self.random_view(img, rng, out1)?;
        self.random_view(img, rng, out2)
    }

    /// One randomly augmented view of `img` into `out` (`view_len()` floats, CHW).
    pub fn random_view(
        &mut self,
        img: &RgbImage,
        rng: &mut SplitMix64,
        out: &mut [f32],
    ) -> Result<(), AugmentError> {
        let params = ViewParams::sample(&self.cfg, img.width, img.height, rng);
        self.apply(img, &params, out)
    }

    /// [`Self::eval_view`] of an encoded image: false when the bytes do not decode (or claim
    /// more than `max_pixels`) or give no view, and the sample is to be skipped.
    pub fn eval_view_of(&mut self, bytes: &[u8], max_pixels: u64, out: &mut [f32]) -> bool {
        crate::decode::decode_rgb(bytes, max_pixels)
            .ok()
            .is_some_and(|img| self.eval_view(&img, out).is_ok())
    }

    /// The deterministic view evaluation and export use (torchvision's `Resize` +
    /// `CenterCrop` + `Normalize`, in one step): the centred square of the shorter side,
    /// resized to `size`, normalised; no flip, jitter, grayscale or blur.
    pub fn eval_view(&mut self, img: &RgbImage, out: &mut [f32]) -> Result<(), AugmentError> {
        let side = img.width.min(img.height);
        let params = ViewParams {
            crop: CropBox {
                top: (img.height - side) / 2,
                left: (img.width - side) / 2,
                height: side,
                width: side,
            },
            flip: false,
            jitter: Vec::new(),
            grayscale: false,
            blur_sigma: None,
        };
        self.apply(img, &params, out)
    }

    /// Applies drawn parameters; `out` must hold `view_len()` floats.
    pub fn apply(
        &mut self,
        img: &RgbImage,
        p: &ViewParams,
        out: &mut [f32],
    ) -> Result<(), AugmentError> {
        let s = self.size;
        let ss = s * s;
        assert_eq!(out.len(), 3 * ss, "output slice must hold 3 × size² floats");
        self.crop_resize(img, p.crop)?;

        let blur = p
            .blur_sigma
            .map(|sigma| gaussian_kernel(self.blur_ksize, sigma));
        let job = PixelJob {
            s,
            resized: &self.resized,
            params: p,
            blur: blur.as_deref(),
            norm: self.norm_coeffs(),
        };
        let scratch = Scratch {
            planes: &mut self.planes,
            padded: &mut self.padded,
            acc: &mut self.acc,
        };
        run_pixel_passes(&job, scratch, out);
        Ok(())
    }

    /// Per channel (scale, bias) so that `x * scale + bias == (x - mean) / std`.
    fn norm_coeffs(&self) -> [(f32, f32); 3] {
        std::array::from_fn(|c| {
            let inv = 1.0 / self.cfg.std[c];
            (inv, -self.cfg.mean[c] * inv)
        })
    }

    fn crop_resize(&mut self, img: &RgbImage, crop: CropBox) -> Result<(), AugmentError> {
        let src =
            fir::images::ImageRef::new(img.width, img.height, &img.pixels, fir::PixelType::U8x3)
                .map_err(|e| {
                    AugmentError(format!("{}x{} RGB buffer: {e}", img.width, img.height))
                })?;
        let s = self.size as u32;
        let mut dst =
            fir::images::Image::from_slice_u8(s, s, &mut self.resized, fir::PixelType::U8x3)
                .map_err(|e| AugmentError(format!("output buffer: {e}")))?;
        let opts = self.resize_opts.crop(
            f64::from(crop.left),
            f64::from(crop.top),
            f64::from(crop.width),
            f64::from(crop.height),
        );
        self.resizer.resize(&src, &mut dst, &opts).map_err(|e| {
            AugmentError(format!(
                "crop {crop:?} of {}x{}: {e}",
                img.width, img.height
            ))
        })
    }
}

/// Inputs of the f32 passes of one view (everything after the u8 crop + resize).
struct PixelJob<'a> {
    s: usize,
    resized: &'a [u8],
    params: &'a ViewParams,
    blur: Option<&'a [f32]>,
    norm: [(f32, f32); 3],
}

struct Scratch<'a> {
    planes: &'a mut [f32],
    padded: &'a mut [f32],
    acc: &'a mut [f32],
}

/// Runs the passes with AVX2 when the CPU has it. The crate is built for baseline x86-64
/// (SSE2), so without this the row loops run 4 lanes wide and `floor` is a libm call.
/// Results are bit-identical either way: Rust never contracts mul+add into FMA, and every
/// loop keeps its per-element operation order.
fn run_pixel_passes(job: &PixelJob, sc: Scratch, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { pixel_passes_avx2(job, sc, out) };
        return;
    }
    pixel_passes(job, sc, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pixel_passes_avx2(job: &PixelJob, sc: Scratch, out: &mut [f32]) {
    pixel_passes(job, sc, out)
}

#[inline(always)]
fn pixel_passes(job: &PixelJob, sc: Scratch, out: &mut [f32]) {
    let s = job.s;
    let ss = s * s;
    let split = job
        .params
        .jitter
        .iter()
        .position(|op| matches!(op, ColorOp::Contrast(_)))
        .unwrap_or(job.params.jitter.len());
    let (before, after) = job.params.jitter.split_at(split);
    let has_contrast = !after.is_empty();
    let tail = Tail {
        grayscale: job.params.grayscale,
        blur: job.blur,
        norm: job.norm,
    };

    // Pass 1: load rows, ops before contrast, grey sum for contrast.
    let mut grey_sum = 0.0f64;
    {
        let (r_pl, rest) = sc.planes.split_at_mut(ss);
        let (g_pl, b_pl) = rest.split_at_mut(ss);
        for y in 0..s {
            let rows = y * s..(y + 1) * s;
            let (r, g, b) = (
                &mut r_pl[rows.clone()],
                &mut g_pl[rows.clone()],
                &mut b_pl[rows],
            );
            load_row(
                &job.resized[y * s * 3..(y + 1) * s * 3],
                job.params.flip,
                r,
                g,
                b,
            );
            apply_ops(before, r, g, b);
            if has_contrast {
                grey_sum += f64::from(grey_row_sum(r, g, b));
            } else {
                tail.row(y, s, r, g, b, sc.padded, out);
            }
        }
    }
    // Pass 2: contrast (with the mean of pass 1) and the ops after it.
    if has_contrast {
        let mean = (grey_sum / ss as f64) as f32;
        let (r_pl, rest) = sc.planes.split_at_mut(ss);
        let (g_pl, b_pl) = rest.split_at_mut(ss);
        for y in 0..s {
            let rows = y * s..(y + 1) * s;
            let (r, g, b) = (
                &mut r_pl[rows.clone()],
                &mut g_pl[rows.clone()],
                &mut b_pl[rows],
            );
            if let ColorOp::Contrast(c) = after[0] {
                contrast(c, mean, r, g, b);
            }
            apply_ops(&after[1..], r, g, b);
            tail.row(y, s, r, g, b, sc.padded, out);
        }
    }
    // Pass 3: vertical blur + normalize. A grey view blurs one plane and reuses it.
    if let Some(k) = job.blur {
        let channels = if job.params.grayscale { 1 } else { 3 };
        for c in 0..channels {
            let plane = &sc.planes[c * ss..(c + 1) * ss];
            for y in 0..s {
                blur_column_row(plane, s, y, k, sc.acc);
                for oc in if job.params.grayscale { 0..3 } else { c..c + 1 } {
                    let (a, bias) = tail.norm[oc];
                    let dst = &mut out[oc * ss + y * s..oc * ss + (y + 1) * s];
                    for (d, v) in dst.iter_mut().zip(sc.acc.iter()) {
                        *d = v * a + bias;
                    }
                }
            }
        }
    }
}

/// What happens to a row after the colour ops.
struct Tail<'a> {
    grayscale: bool,
    blur: Option<&'a [f32]>,
    norm: [(f32, f32); 3],
}

impl Tail<'_> {
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn row(
        &self,
        y: usize,
        s: usize,
        r: &mut [f32],
        g: &mut [f32],
        b: &mut [f32],
        padded: &mut [f32],
        out: &mut [f32],
    ) {
        if self.grayscale {
            for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                let v = LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b;
                (*r, *g, *b) = (v, v, v);
            }
        }
        if let Some(k) = self.blur {
            // Only the first plane matters for a grey view (pass 3 reuses it).
            blur_row(r, k, padded);
            if !self.grayscale {
                blur_row(g, k, padded);
                blur_row(b, k, padded);
            }
            return;
        }
        let ss = s * s;
        for (c, src) in [&*r, &*g, &*b].into_iter().enumerate() {
            let (a, bias) = self.norm[c];
            let dst = &mut out[c * ss + y * s..c * ss + (y + 1) * s];
            for (d, v) in dst.iter_mut().zip(src) {
                *d = v * a + bias;
            }
        }
    }
}

/// Interleaved RGB8 row → three f32 rows in [0, 1], mirrored when `flip`.
#[inline(always)]
fn load_row(src: &[u8], flip: bool, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    const INV: f32 = 1.0 / 255.0;
    let px = src.chunks_exact(3);
    // Two loops rather than a per-pixel branch, so each one vectorizes.
    if flip {
        for (((px, r), g), b) in px
            .zip(r.iter_mut().rev())
            .zip(g.iter_mut().rev())
            .zip(b.iter_mut().rev())
        {
            (*r, *g, *b) = (
                f32::from(px[0]) * INV,
                f32::from(px[1]) * INV,
                f32::from(px[2]) * INV,
            );
        }
    } else {
        for (((px, r), g), b) in px.zip(r.iter_mut()).zip(g.iter_mut()).zip(b.iter_mut()) {
            (*r, *g, *b) = (
                f32::from(px[0]) * INV,
                f32::from(px[1]) * INV,
                f32::from(px[2]) * INV,
            );
        }
    }
}

#[inline(always)]
fn grey_row_sum(r: &[f32], g: &[f32], b: &[f32]) -> f32 {
    // Eight running sums (a fixed order, so still deterministic) let the loop vectorize;
    // a single `.sum()` is a serial dependency chain.
    let mut lanes = [0.0f32; LANES];
    let n = r.len() / LANES * LANES;
    for ((r, g), b) in r[..n]
        .chunks_exact(LANES)
        .zip(g.chunks_exact(LANES))
        .zip(b.chunks_exact(LANES))
    {
        for i in 0..LANES {
            lanes[i] += LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i];
        }
    }
    let tail: f32 = (n..r.len())
        .map(|i| LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i])
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn apply_ops(ops: &[ColorOp], r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for op in ops {
        match *op {
            ColorOp::Brightness(f) => {
                // One loop per plane: a `chain`ed iterator does not vectorize.
                for plane in [r.iter_mut(), g.iter_mut(), b.iter_mut()] {
                    for v in plane {
                        *v = (*v * f).clamp(0.0, 1.0);
                    }
                }
            }
            ColorOp::Contrast(_) => unreachable!("contrast is applied with the image mean"),
            ColorOp::Saturation(f) => {
                for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
                    let grey = (1.0 - f) * (LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b);
                    *r = (f * *r + grey).clamp(0.0, 1.0);
                    *g = (f * *g + grey).clamp(0.0, 1.0);
                    *b = (f * *b + grey).clamp(0.0, 1.0);
                }
            }
            ColorOp::Hue(h) => hue_shift(h, r, g, b),
        }
    }
}

#[inline(always)]
fn contrast(f: f32, mean: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    let bias = (1.0 - f) * mean;
    for plane in [r.iter_mut(), g.iter_mut(), b.iter_mut()] {
        for v in plane {
            *v = (*v * f + bias).clamp(0.0, 1.0);
        }
    }
}

/// torchvision's `adjust_hue` (RGB → HSV, rotate H, back). V = max and V·S = max − min are
/// unchanged by the rotation, so the way back is the branch-free form
/// `c_n = V − V·S · clamp(min(k, 4 − k), 0, 1)` with `k = (n + H/60°) mod 6`, n = 5, 3, 1 for
/// R, G, B. Written with selects only (no `floor`, no sector `match`) so the loop vectorizes.
#[inline(always)]
fn hue_shift(shift: f32, r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    let shift6 = shift * 6.0;
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (rv, gv, bv) = (*r, *g, *b);
        let maxc = rv.max(gv).max(bv);
        let minc = rv.min(gv).min(bv);
        let cr = maxc - minc;
        let inv = if cr > 0.0 { 1.0 / cr } else { 0.0 };
        let rc = (maxc - rv) * inv;
        let gc = (maxc - gv) * inv;
        let bc = (maxc - bv) * inv;
        // Hue in sextants, in [-1, 5); torchvision's tie order: red, then green, then blue.
        let h_g = if maxc == gv {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = if maxc == rv { bc - gc } else { h_g };
        // |shift| <= 0.5 turn, so one wrap each way brings it into [0, 6).
        let h = h + shift6;
        let h = if h < 0.0 { h + 6.0 } else { h };
        let h = if h >= 6.0 { h - 6.0 } else { h };
        let channel = |n: f32| {
            let k = n + h;
            let k = if k >= 6.0 { k - 6.0 } else { k };
            maxc - cr * k.min(4.0 - k).clamp(0.0, 1.0)
        };
        (*r, *g, *b) = (channel(5.0), channel(3.0), channel(1.0));
    }
}

/// Horizontal Gaussian blur of one row in place, reflect padding.
#[inline(always)]
fn blur_row(row: &mut [f32], k: &[f32], padded: &mut [f32]) {
    let n = row.len();
    let rad = k.len() / 2;
    let padded = &mut padded[..n + 2 * rad];
    padded[rad..rad + n].copy_from_slice(row);
    for j in 1..=rad {
        padded[rad - j] = row[reflect(j as isize, n)];
        padded[rad + n - 1 + j] = row[reflect((n - 1 + j) as isize, n)];
    }
    // The kernel is symmetric: pair taps t and 2·rad − t to halve the multiplies. Eight
    // outputs at a time keep the accumulators in one vector register across all taps.
    let (centre, side) = (k[rad], &k[..rad]);
    let tap = |x: usize| {
        let mut acc = centre * padded[x + rad];
        for (t, &w) in side.iter().enumerate() {
            acc += w * (padded[x + t] + padded[x + 2 * rad - t]);
        }
        acc
    };
    let full = n / LANES * LANES;
    for (c, out) in row[..full].chunks_exact_mut(LANES).enumerate() {
        let x0 = c * LANES;
        let mut acc = [0.0f32; LANES];
        let mid = &padded[x0 + rad..x0 + rad + LANES];
        for i in 0..LANES {
            acc[i] = centre * mid[i];
        }
        for (t, &w) in side.iter().enumerate() {
            let lo = &padded[x0 + t..x0 + t + LANES];
            let hi = &padded[x0 + 2 * rad - t..x0 + 2 * rad - t + LANES];
            for i in 0..LANES {
                acc[i] += w * (lo[i] + hi[i]);
            }
        }
        out.copy_from_slice(&acc);
    }
    for (x, o) in row.iter_mut().enumerate().skip(full) {
        *o = tap(x);
    }
}

/// Row `y` of the vertical Gaussian blur of `plane` (side `s`) into `acc`.
#[inline(always)]
fn blur_column_row(plane: &[f32], s: usize, y: usize, k: &[f32], acc: &mut [f32]) {
    let rad = k.len() / 2;
    let row = |dy: isize| {
        let sy = reflect(y as isize + dy, s);
        &plane[sy * s..(sy + 1) * s]
    };
    let centre = k[rad];
    for (o, v) in acc.iter_mut().zip(row(0)) {
        *o = centre * v;
    }
    for (t, &w) in k[..rad].iter().enumerate() {
        let d = (rad - t) as isize;
        for ((o, a), b) in acc.iter_mut().zip(row(-d)).zip(row(d)) {
            *o += w * (a + b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every random op off, full-image crops: only resize + normalize remain.
    fn identity_cfg() -> AugmentConfig {
        AugmentConfig {
            crop_scale_min: 1.0,
            crop_scale_max: 1.0,
            flip_p: 0.0,
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            ..AugmentConfig::default()
        }
    }

    fn pattern(w: u32, h: u32) -> RgbImage {
        let mut px = Vec::new();
        for y in 0..h {
            for x in 0..w {
                px.extend_from_slice(&[
                    (x * 255 / w) as u8,
                    (y * 255 / h) as u8,
                    ((x * 7 + y * 13) % 256) as u8,
                ]);
            }
        }
        RgbImage::from_raw(w, h, px).unwrap()
    }

    fn constant(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage::from_raw(w, h, rgb.repeat((w * h) as usize)).unwrap()
    }

    fn full(img: &RgbImage) -> CropBox {
        CropBox {
            top: 0,
            left: 0,
            height: img.height,
            width: img.width,
        }
    }

    fn plain(img: &RgbImage) -> ViewParams {
        ViewParams {
            crop: full(img),
            flip: false,
            jitter: vec![],
            grayscale: false,
            blur_sigma: None,
        }
    }

    /// Undo Normalize: back to [0, 1] pixel values.
    fn denorm(cfg: &AugmentConfig, out: &[f32], s: usize) -> Vec<f32> {
        out.iter()
            .enumerate()
            .map(|(i, v)| v * cfg.std[i / (s * s)] + cfg.mean[i / (s * s)])
            .collect()
    }

    fn run(aug: &mut Augmenter, img: &RgbImage, p: &ViewParams) -> Vec<f32> {
        let mut out = vec![f32::NAN; aug.view_len()];
        aug.apply(img, p, &mut out).unwrap();
        out
    }

    #[test]
    fn constant_image_normalizes_to_expected_values_under_every_op() {
        let cfg = AugmentConfig::default();
        let img = constant(50, 40, [200, 100, 30]);
        let mut aug = Augmenter::new(&cfg, 16);
        let mut rng = SplitMix64::new(3);
        let mut out = vec![f32::NAN; aug.view_len()];
        // Plain view: exact (x/255 - mean)/std.
        aug.apply(&img, &plain(&img), &mut out).unwrap();
        for c in 0..3 {
            let want = ([200.0, 100.0, 30.0][c] / 255.0 - cfg.mean[c]) / cfg.std[c];
            for v in &out[c * 256..(c + 1) * 256] {
                assert!((v - want).abs() < 1e-5, "channel {c}: {v} vs {want}");
            }
        }
        // Blur and crops must not change a constant image; any view stays finite and within
        // the normalized range of [0, 1].
        let blurred = ViewParams {
            blur_sigma: Some(2.0),
            ..plain(&img)
        };
        assert_eq!(run(&mut aug, &img, &blurred).len(), 3 * 16 * 16);
        for (a, b) in run(&mut aug, &img, &blurred).iter().zip(&out) {
            assert!(
                (a - b).abs() < 1e-4,
                "blur changed a constant image: {a} vs {b}"
            );
        }
        for _ in 0..50 {
            aug.random_view(&img, &mut rng, &mut out).unwrap();
            for (i, v) in denorm(&cfg, &out, 16).iter().enumerate() {
                assert!((-1e-4..=1.0 + 1e-4).contains(v), "value {v} at {i}");
            }
        }
    }

    #[test]
    fn flip_mirrors_the_view() {
        let cfg = identity_cfg();
        let img = pattern(32, 32);
        let mut aug = Augmenter::new(&cfg, 32);
        let a = run(&mut aug, &img, &plain(&img));
        let b = run(
            &mut aug,
            &img,
            &ViewParams {
                flip: true,
                ..plain(&img)
            },
        );
        assert_ne!(a, b);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let i = c * 1024 + y * 32;
                    assert_eq!(a[i + x], b[i + 31 - x]);
                }
            }
        }
    }

    #[test]
    fn same_size_crop_is_exact_and_subcrop_picks_the_region() {
        let cfg = identity_cfg();
        let img = pattern(40, 30);
        let mut aug = Augmenter::new(&cfg, 10);
        let crop = CropBox {
            top: 5,
            left: 12,
            height: 10,
            width: 10,
        };
        let out = denorm(
            &cfg,
            &run(
                &mut aug,
                &img,
                &ViewParams {
                    crop,
                    ..plain(&img)
                },
            ),
            10,
        );
        for y in 0..10 {
            for x in 0..10 {
                for c in 0..3 {
                    let src = img.pixels[((y + 5) * 40 + x + 12) * 3 + c] as f32 / 255.0;
                    assert!((out[c * 100 + y * 10 + x] - src).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn grayscale_makes_channels_equal_with_luma_weights() {
        let cfg = identity_cfg();
        let img = pattern(24, 24);
        let mut aug = Augmenter::new(&cfg, 24);
        for blur_sigma in [None, Some(1.5)] {
            let p = ViewParams {
                grayscale: true,
                blur_sigma,
                ..plain(&img)
            };
            let out = denorm(&cfg, &run(&mut aug, &img, &p), 24);
            for i in 0..576 {
                assert!(
                    (out[i] - out[576 + i]).abs() < 1e-5 && (out[i] - out[1152 + i]).abs() < 1e-5
                );
            }
            if blur_sigma.is_none() {
                let px = &img.pixels[..3];
                let want =
                    (0.299 * px[0] as f32 + 0.587 * px[1] as f32 + 0.114 * px[2] as f32) / 255.0;
                assert!((out[0] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn crop_params_respect_scale_ratio_and_bounds() {
        let mut rng = SplitMix64::new(11);
        let (w, h) = (320u32, 256u32);
        let mut seen_small = false;
        for _ in 0..2000 {
            let c = random_resized_crop(w, h, (0.08, 1.0), CROP_RATIO, &mut rng);
            assert!(c.left + c.width <= w && c.top + c.height <= h, "{c:?}");
            let frac = f64::from(c.width * c.height) / f64::from(w * h);
            // Rounding each side to an integer moves the area by at most ~1 pixel per side.
            let slack = f64::from(c.width + c.height + 1) / f64::from(w * h);
            assert!(frac >= 0.08 - slack && frac <= 1.0, "area fraction {frac}");
            let ratio = f64::from(c.width) / f64::from(c.height);
            let r_slack = 1.0 / f64::from(c.height.min(c.width)) * 2.0;
            assert!(
                ratio >= 0.75 - r_slack && ratio <= 4.0 / 3.0 + r_slack,
                "ratio {ratio}"
            );
            seen_small |= frac < 0.15;
        }
        assert!(
            seen_small,
            "2000 draws never produced a crop near the lower scale bound"
        );
        // Impossible constraints fall back to a centred crop with the ratio clamped.
        let c = random_resized_crop(1000, 10, (0.9, 1.0), CROP_RATIO, &mut rng);
        assert_eq!(
            c,
            CropBox {
                top: 0,
                left: (1000 - 13) / 2,
                height: 10,
                width: 13
            }
        );
    }

    #[test]
    fn blur_smooths_but_keeps_the_mean() {
        let cfg = identity_cfg();
        let mut px = Vec::new();
        for y in 0..32u32 {
            for x in 0..32u32 {
                let v = if (x + y) % 2 == 0 { 255 } else { 0 };
                px.extend_from_slice(&[v, v, v]);
            }
        }
        let img = RgbImage::from_raw(32, 32, px).unwrap();
        let mut aug = Augmenter::new(&cfg, 32);
        assert_eq!(blur_kernel_size(32), 3);
        assert_eq!(blur_kernel_size(224), 23);
        let sharp = denorm(&cfg, &run(&mut aug, &img, &plain(&img)), 32);
        let soft = denorm(
            &cfg,
            &run(
                &mut aug,
                &img,
                &ViewParams {
                    blur_sigma: Some(2.0),
                    ..plain(&img)
                },
            ),
            32,
        );
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let var = |v: &[f32]| {
            let m = mean(v);
            v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32
        };
        assert!((mean(&sharp) - mean(&soft)).abs() < 0.02);
        assert!(
            var(&soft) < var(&sharp) * 0.5,
            "{} vs {}",
            var(&soft),
            var(&sharp)
        );
        let k = gaussian_kernel(23, 0.7);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6 && k[11] > k[10] && k[0] == k[22]);
    }

    #[test]
    fn colour_ops_match_their_definitions() {
        let cfg = identity_cfg();
        let img = constant(8, 8, [255, 0, 0]);
        let mut aug = Augmenter::new(&cfg, 8);
        let pixel = |aug: &mut Augmenter, jitter: Vec<ColorOp>| {
            let out = denorm(
                &cfg,
                &run(
                    aug,
                    &img,
                    &ViewParams {
                        jitter,
                        ..plain(&img)
                    },
                ),
                8,
            );
            [out[0], out[64], out[128]]
        };
        let close = |a: [f32; 3], b: [f32; 3]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4);
        // Hue +1/3 turns red to green, -1/3 to blue; 0 is the identity.
        assert!(close(
            pixel(&mut aug, vec![ColorOp::Hue(1.0 / 3.0)]),
            [0.0, 1.0, 0.0]
        ));
        assert!(close(
            pixel(&mut aug, vec![ColorOp::Hue(-1.0 / 3.0)]),
            [0.0, 0.0, 1.0]
        ));
        assert!(close(
            pixel(&mut aug, vec![ColorOp::Hue(0.0)]),
            [1.0, 0.0, 0.0]
        ));
        // Saturation 0 is the luma grey; brightness scales then clamps.
        assert!(close(
            pixel(&mut aug, vec![ColorOp::Saturation(0.0)]),
            [0.299; 3]
        ));
        assert!(close(
            pixel(&mut aug, vec![ColorOp::Brightness(0.5)]),
            [0.5, 0.0, 0.0]
        ));
        // Contrast blends with the grey mean (0.299 for a red image); order matters.
        let c = pixel(&mut aug, vec![ColorOp::Contrast(0.5)]);
        assert!(
            close(c, [0.5 + 0.5 * 0.299, 0.5 * 0.299, 0.5 * 0.299]),
            "{c:?}"
        );
        let bc = pixel(
            &mut aug,
            vec![ColorOp::Brightness(0.5), ColorOp::Contrast(0.5)],
        );
        let m = 0.5 * 0.299;
        assert!(close(bc, [0.25 + 0.5 * m, 0.5 * m, 0.5 * m]), "{bc:?}");
        // Hue on a 2-colour pixel matches the textbook HSV rotation.
        let img2 = constant(4, 4, [204, 102, 51]); // h = 20°, s = 0.75, v = 0.8
        let mut aug2 = Augmenter::new(&cfg, 4);
        let out = denorm(
            &cfg,
            &run(
                &mut aug2,
                &img2,
                &ViewParams {
                    jitter: vec![ColorOp::Hue(0.25)],
                    ..plain(&img2)
                },
            ),
            4,
        );
        // h = 110°: sector 1, f = 5/6 → (q, v, p) with q = v(1 - s f) = 0.8(1 - 0.625) = 0.3.
        assert!(
            close([out[0], out[16], out[32]], [0.3, 0.8, 0.2]),
            "{:?}",
            [out[0], out[16], out[32]]
        );
    }

    /// torchvision's `_rgb2hsv` → shift → `_hsv2rgb`, written the direct way.
    fn hue_reference(px: [f32; 3], shift: f32) -> [f32; 3] {
        let [r, g, b] = px;
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let cr = maxc - minc;
        let s = if maxc > 0.0 { cr / maxc } else { 0.0 };
        let d = if cr > 0.0 { cr } else { 1.0 };
        let (rc, gc, bc) = ((maxc - r) / d, (maxc - g) / d, (maxc - b) / d);
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = ((h / 6.0 + 1.0) % 1.0 + shift).rem_euclid(1.0);
        let i = (h * 6.0).floor();
        let f = h * 6.0 - i;
        let v = maxc;
        let p = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        match (i as i32).rem_euclid(6) {
            0 => [v, t, p],
            1 => [q, v, p],
            2 => [p, v, t],
            3 => [p, q, v],
            4 => [t, p, v],
            _ => [v, p, q],
        }
    }

    #[test]
    fn branch_free_hue_matches_the_hsv_round_trip() {
        let mut rng = SplitMix64::new(9);
        let mut unit = || uniform(&mut rng, 0.0, 1.0) as f32;
        let n = 4096;
        let mut px: Vec<[f32; 3]> = (0..n).map(|_| [unit(), unit(), unit()]).collect();
        // Ties and greys exercise the max-channel tie order.
        px.extend([
            [0.5, 0.5, 0.2],
            [0.2, 0.5, 0.5],
            [0.5, 0.2, 0.5],
            [0.3, 0.3, 0.3],
            [0.0; 3],
            [1.0; 3],
        ]);
        for shift in [-0.5f32, -0.37, -0.1, 0.0, 0.05, 0.1, 0.33, 0.5] {
            let mut r: Vec<f32> = px.iter().map(|p| p[0]).collect();
            let mut g: Vec<f32> = px.iter().map(|p| p[1]).collect();
            let mut b: Vec<f32> = px.iter().map(|p| p[2]).collect();
            hue_shift(shift, &mut r, &mut g, &mut b);
            for (i, p) in px.iter().enumerate() {
                let want = hue_reference(*p, shift);
                let got = [r[i], g[i], b[i]];
                for c in 0..3 {
                    assert!(
                        (got[c] - want[c]).abs() < 1e-4,
                        "{p:?} shift {shift}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn views_are_deterministic_per_seed_and_differ_between_views() {
        let cfg = AugmentConfig::default();
        let img = pattern(64, 48);
        let mut aug = Augmenter::new(&cfg, 24);
        let n = aug.view_len();
        let mut draw = |seed| {
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            aug.two_views(&img, &mut SplitMix64::new(seed), &mut a, &mut b)
                .unwrap();
            (a, b)
        };
        let (a1, b1) = draw(5);
        let (a2, b2) = draw(5);
        let (a3, _) = draw(6);
        assert_eq!((&a1, &b1), (&a2, &b2));
        assert_ne!(a1, b1);
        assert_ne!(a1, a3);
        assert!(a1.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn jitter_draws_every_op_once_in_varied_orders() {
        let cfg = AugmentConfig {
            jitter_p: 1.0,
            ..AugmentConfig::default()
        };
        let mut rng = SplitMix64::new(1);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = ViewParams::sample(&cfg, 100, 100, &mut rng);
            assert_eq!(p.jitter.len(), 4);
            for op in &p.jitter {
                match *op {
                    ColorOp::Brightness(f) | ColorOp::Contrast(f) | ColorOp::Saturation(f) => {
                        assert!((0.6..=1.4).contains(&f))
                    }
                    ColorOp::Hue(h) => assert!((-0.1..=0.1).contains(&h)),
                }
            }
            firsts.insert(std::mem::discriminant(&p.jitter[0]));
        }
        assert_eq!(firsts.len(), 4);
    }
}
