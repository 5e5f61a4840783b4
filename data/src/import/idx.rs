//! MNIST-style IDX files (LeCun's format; Fashion-MNIST uses it too), plain or gzipped:
//! `idx3-ubyte` image stacks (count × rows × cols bytes) and `idx1-ubyte` label vectors.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// An IDX image stack: `count` grayscale images of `rows × cols` bytes, row-major.
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// The bytes of `path`, gunzipped when they start with gzip's magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("gunzipping {}", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The element type byte, dimension count and dimensions of an IDX header.
fn header(bytes: &[u8], what: &str) -> Result<(u8, Vec<usize>, usize)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{what}: not an IDX file (it must start with two zero bytes)");
    }
    let (kind, ndim) = (bytes[2], bytes[3] as usize);
    let start = 4 + 4 * ndim;
    if bytes.len() < start {
        bail!("{what}: truncated IDX header");
    }
    let dims = (0..ndim)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4")) as usize)
        .collect();
    Ok((kind, dims, start))
}

/// Parses an `idx3-ubyte` image stack.
pub fn parse_images(bytes: &[u8], what: &str) -> Result<IdxImages> {
    let (kind, dims, start) = header(bytes, what)?;
    if kind != 0x08 || dims.len() != 3 {
        bail!(
            "{what}: expected unsigned-byte images with 3 dimensions (idx3-ubyte), got type \
             {kind:#04x} with {} dimensions",
            dims.len()
        );
    }
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    let body = &bytes[start..];
    if body.len() != count * rows * cols {
        bail!(
            "{what}: {count} images of {rows}×{cols} need {} bytes, the file has {}",
            count * rows * cols,
            body.len()
        );
    }
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: body.to_vec(),
    })
}

/// Parses an `idx1-ubyte` label vector.
pub fn parse_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let (kind, dims, start) = header(bytes, what)?;
    if kind != 0x08 || dims.len() != 1 {
        bail!("{what}: expected unsigned-byte labels with 1 dimension (idx1-ubyte)");
    }
    let body = &bytes[start..];
    if body.len() != dims[0] {
        bail!(
            "{what}: {} labels announced, {} present",
            dims[0],
            body.len()
        );
    }
    Ok(body.to_vec())
}

/// The (images, labels) file names of a split in the usual MNIST naming, found in `dir` with
/// or without `.gz`.
pub fn split_files(dir: &Path, split: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let stem = match split {
        "train" => "train",
        "test" => "t10k",
        other => bail!("IDX split {other:?} is neither train nor test"),
    };
    let find = |kind: &str| {
        let base = format!("{stem}-{kind}");
        [format!("{base}.gz"), base.clone()]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{} has no {base} or {base}.gz (an MNIST-style IDX folder has \
                     train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte \
                     and t10k-labels-idx1-ubyte)",
                    dir.display()
                )
            })
    };
    Ok((find("images-idx3-ubyte")?, find("labels-idx1-ubyte")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(kind: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, kind, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn images_and_labels_parse_and_bad_files_are_named() {
        let imgs = parse_images(
            &idx(8, &[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
            "x",
        )
        .unwrap();
        assert_eq!((imgs.count, imgs.rows, imgs.cols), (2, 2, 3));
        assert_eq!(imgs.image(1), [7, 8, 9, 10, 11, 12]);
        assert_eq!(
            parse_labels(&idx(8, &[3], &[0, 9, 4]), "y").unwrap(),
            [0, 9, 4]
        );
        let e = parse_images(&idx(8, &[2, 2, 3], &[0; 11]), "a.idx")
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .starts_with("a.idx: 2 images of 2×3 need 12 bytes, the file has 11"));
        assert!(parse_images(&idx(8, &[3], &[0; 3]), "b").is_err());
        assert!(parse_labels(&idx(8, &[4], &[0; 3]), "c")
            .unwrap_err()
            .to_string()
            .contains("4 labels announced, 3 present"));
        assert!(parse_images(b"PK\x03\x04....", "d")
            .err()
            .unwrap()
            .to_string()
            .contains("not an IDX file"));
    }
}
