//! Image bytes → interleaved RGB8, with the decompression-bomb check done on the header.
//!
//! The format is sniffed from the magic bytes, not from the member's extension: WebDataset
//! shards in the wild often store PNGs under `.jpg`. JPEG goes through `zune-jpeg` directly
//! (SIMD IDCT and colour conversion, the hot path); PNG and WebP go through the `image` crate.
//! In every case the header is parsed first and `width × height` is checked against
//! `max_pixels` before the pixel buffer is allocated.

use crate::sample::BadSampleReason;
use image::{DynamicImage, ImageDecoder};
use std::fmt;
use std::io::Cursor;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// A decoded image: `pixels` is row-major interleaved RGB, `3 × width × height` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Wraps an RGB buffer; `None` when the length does not match the dimensions.
    pub fn from_raw(width: u32, height: u32, pixels: Vec<u8>) -> Option<Self> {
        (width > 0 && height > 0 && pixels.len() == 3 * width as usize * height as usize).then_some(
            Self {
                width,
                height,
                pixels,
            },
        )
    }
}

/// Why an image was rejected: the reason that is counted, plus a detail for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub reason: BadSampleReason,
    pub detail: String,
}

impl DecodeError {
    fn corrupt(detail: impl Into<String>) -> Self {
        Self {
            reason: BadSampleReason::CorruptImage,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for BadSampleReason {
    fn from(e: DecodeError) -> Self {
        e.reason
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
}

/// The container format from the first bytes, if it is one we decode.
pub fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else {
        None
    }
}

/// Decodes JPEG, PNG or WebP bytes to RGB8. Images whose header claims more than
/// `max_pixels` pixels fail with `DecompressionBomb` before any pixel memory is allocated;
/// anything unreadable (unknown format, corrupt or truncated data) fails with `CorruptImage`.
/// Alpha is dropped, as PIL's `convert("RGB")` does.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    match sniff_format(bytes) {
        Some(ImageFormat::Jpeg) => decode_jpeg(bytes, max_pixels),
        Some(ImageFormat::Png) => {
            let dec = image::codecs::png::PngDecoder::new(Cursor::new(bytes))
                .map_err(|e| DecodeError::corrupt(format!("png header: {e}")))?;
            decode_with_image(dec, max_pixels, "png")
        }
        Some(ImageFormat::WebP) => {
            let dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
                .map_err(|e| DecodeError::corrupt(format!("webp header: {e}")))?;
            decode_with_image(dec, max_pixels, "webp")
        }
        None => Err(DecodeError::corrupt(format!(
            "not a JPEG, PNG or WebP file ({} bytes, starts with {:02x?})",
            bytes.len(),
            &bytes[..bytes.len().min(4)]
        ))),
    }
}

fn check_pixels(width: u64, height: u64, max_pixels: u64, format: &str) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::corrupt(format!(
            "{format} header says {width}x{height}"
        )));
    }
    let pixels = width.saturating_mul(height);
    if pixels > max_pixels {
        return Err(DecodeError {
            reason: BadSampleReason::DecompressionBomb,
            detail: format!(
                "{format} header says {width}x{height} = {pixels} pixels, above \
                 data.max_image_pixels = {max_pixels}"
            ),
        });
    }
    Ok(())
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    // Strict mode: a truncated scan is an error (as in PIL without LOAD_TRUNCATED_IMAGES),
    // not an image padded with grey. Size limits are ours (`max_pixels`), so lift zune's.
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true)
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX));
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers()
        .map_err(|e| DecodeError::corrupt(format!("jpeg header: {e:?}")))?;
    let (w, h) = dec
        .dimensions()
        .ok_or_else(|| DecodeError::corrupt("jpeg header has no frame dimensions"))?;
    check_pixels(w as u64, h as u64, max_pixels, "jpeg")?;
    let len = dec
        .output_buffer_size()
        .ok_or_else(|| DecodeError::corrupt("jpeg output size overflows"))?;
    if len != 3 * w * h {
        return Err(DecodeError::corrupt(format!(
            "jpeg decoder would produce {len} bytes for {w}x{h} RGB"
        )));
    }
    let mut pixels = vec![0u8; len];
    dec.decode_into(&mut pixels)
        .map_err(|e| DecodeError::corrupt(format!("jpeg data ({w}x{h}): {e:?}")))?;
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

fn decode_with_image(
    dec: impl ImageDecoder,
    max_pixels: u64,
    format: &str,
) -> Result<RgbImage, DecodeError> {
    let (w, h) = dec.dimensions();
    check_pixels(u64::from(w), u64::from(h), max_pixels, format)?;
    let img = DynamicImage::from_decoder(dec)
        .map_err(|e| DecodeError::corrupt(format!("{format} data ({w}x{h}): {e}")))?;
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    Ok(RgbImage {
        width: w,
        height: h,
        pixels: rgb.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{ExtendedColorType, ImageEncoder};

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        let mut px = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                px.extend_from_slice(&[(x * 255 / w) as u8, (y * 255 / h) as u8, 128]);
            }
        }
        px
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(&gradient(w, h), w, h, ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn png(w: u32, h: u32, color: ExtendedColorType, px: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(px, w, h, color)
            .unwrap();
        out
    }

    #[test]
    fn jpeg_decodes_close_to_the_source() {
        let img = decode_rgb(&jpeg(40, 30), 1 << 20).unwrap();
        assert_eq!(
            (img.width, img.height, img.pixels.len()),
            (40, 30, 40 * 30 * 3)
        );
        let src = gradient(40, 30);
        let max_err = src
            .iter()
            .zip(&img.pixels)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap();
        assert!(max_err < 16, "max abs error {max_err}");
    }

    #[test]
    fn png_is_lossless_and_alpha_is_dropped() {
        let rgb = gradient(7, 5);
        let img = decode_rgb(&png(7, 5, ExtendedColorType::Rgb8, &rgb), 1 << 20).unwrap();
        assert_eq!(img.pixels, rgb);
        let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 7]).collect();
        let img = decode_rgb(&png(7, 5, ExtendedColorType::Rgba8, &rgba), 1 << 20).unwrap();
        assert_eq!(img.pixels, rgb);
        let gray = vec![200u8; 35];
        let img = decode_rgb(&png(7, 5, ExtendedColorType::L8, &gray), 1 << 20).unwrap();
        assert!(img.pixels.iter().all(|&v| v == 200));
    }

    #[test]
    fn webp_lossless_roundtrips() {
        let rgb = gradient(9, 6);
        let mut out = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .write_image(&rgb, 9, 6, ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(sniff_format(&out), Some(ImageFormat::WebP));
        assert_eq!(decode_rgb(&out, 1 << 20).unwrap().pixels, rgb);
    }

    #[test]
    fn bombs_are_rejected_from_the_header_for_every_format() {
        let j = jpeg(64, 64);
        assert_eq!(decode_rgb(&j, 64 * 64).unwrap().width, 64);
        let e = decode_rgb(&j, 64 * 64 - 1).unwrap_err();
        assert_eq!(e.reason, BadSampleReason::DecompressionBomb);
        assert!(e.detail.contains("64x64"), "{e}");
        let p = png(10, 10, ExtendedColorType::Rgb8, &gradient(10, 10));
        assert_eq!(
            decode_rgb(&p, 99).unwrap_err().reason,
            BadSampleReason::DecompressionBomb
        );
        // A JPEG whose SOF claims 60000x60000 with (almost) no scan data: rejected on the header,
        // without trying to allocate 10 GB.
        let mut huge = j.clone();
        let sof = huge
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline SOF0 marker");
        huge[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let sos = huge
            .windows(2)
            .position(|w| w == [0xFF, 0xDA])
            .expect("SOS marker");
        huge.truncate(sos + 20);
        let e = decode_rgb(&huge, 64 << 20).unwrap_err();
        assert_eq!(e.reason, BadSampleReason::DecompressionBomb, "{e}");
    }

    #[test]
    fn corrupt_and_truncated_data_is_corrupt_image() {
        let j = jpeg(64, 48);
        for bad in [
            &b""[..],
            &b"hello world, not an image"[..],
            &j[..j.len() / 2],
            &j[..20],
        ] {
            let e = decode_rgb(bad, 1 << 20).unwrap_err();
            assert_eq!(e.reason, BadSampleReason::CorruptImage, "{e}");
        }
        let p = png(10, 10, ExtendedColorType::Rgb8, &gradient(10, 10));
        let e = decode_rgb(&p[..p.len() - 20], 1 << 20).unwrap_err();
        assert_eq!(e.reason, BadSampleReason::CorruptImage);
    }
}
