//! NumPy's `.npy` format for 2-D float matrices: what `np.save` writes and `np.load` reads
//! (format 1.0, little-endian, C order, header padded to 64 bytes). Reading also takes format
//! 2.0/3.0 headers and float16/float64 data, converted to float32.

use anyhow::{bail, Context, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A row-major `rows × dim` float32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, dim: usize, data: Vec<f32>) -> Result<Matrix> {
        if data.len() != rows * dim {
            bail!(
                "a {rows} × {dim} matrix needs {} values, got {}",
                rows * dim,
                data.len()
            );
        }
        Ok(Matrix { rows, dim, data })
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.dim..(r + 1) * self.dim]
    }
}

/// The `.npy` bytes of `m` as float32.
pub fn encode(m: &Matrix) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        m.rows, m.dim
    );
    // Magic (6) + version (2) + length (2) + header, padded with spaces and a newline to a
    // multiple of 64 bytes, as numpy does.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * m.data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &m.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A 2-D float matrix from `.npy` bytes; `name` (the file) goes into every error.
pub fn decode(bytes: &[u8], name: &str) -> Result<Matrix> {
    decode_inner(bytes).with_context(|| format!("reading {name} as a .npy matrix"))
}

fn decode_inner(bytes: &[u8]) -> Result<Matrix> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!("not a .npy file (no \\x93NUMPY magic)");
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("unsupported .npy format version {v}"),
    };
    let header = bytes.get(start..start + len).context("truncated header")?;
    let header = std::str::from_utf8(header).context("header is not text")?;
    let descr = field(header, "descr").context("header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let width = match descr {
        "<f4" | "=f4" => 4,
        "<f2" | "=f2" => 2,
        "<f8" | "=f8" => 8,
        other => bail!("element type {other:?} is not a little-endian float (<f2, <f4, <f8)"),
    };
    if field(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        bail!("Fortran-ordered arrays are not supported; save with np.ascontiguousarray");
    }
    let shape = header
        .split_once("'shape':")
        .and_then(|(_, rest)| rest.split_once('('))
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(dims, _)| dims)
        .context("header has no 'shape'")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().with_context(|| format!("bad dimension {s:?}")))
        .collect::<Result<_>>()?;
    let [rows, dim] = dims[..] else {
        bail!("shape {dims:?} is not 2-D (rows, dim)");
    };
    let body = &bytes[start + len..];
    if body.len() != rows * dim * width {
        bail!(
            "shape ({rows}, {dim}) needs {} bytes of data, the file has {}",
            rows * dim * width,
            body.len()
        );
    }
    let data = match width {
        4 => body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        8 => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => body
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    };
    Matrix::new(rows, dim, data)
}

/// The text after `'key':` up to the next comma at nesting depth 0.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let (_, rest) = header.split_once(&format!("'{key}':"))?;
    let rest = rest.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

/// IEEE half to single precision (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: value = frac · 2^-24.
            let v = frac as f32 * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads_the_header_like_numpy() {
        let m = Matrix::new(3, 2, vec![1.0, -2.5, 3.0, 0.0, f32::MAX, 1e-8]).unwrap();
        let bytes = encode(&m);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + header_len])
            .unwrap()
            .starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }"));
        assert_eq!(decode(&bytes, "m.npy").unwrap(), m);
    }

    /// A version-1.0 file with this header dict and data.
    fn with_header(dict: &str, body: &[u8]) -> Vec<u8> {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let h = format!("{dict}\n");
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn half_and_double_are_read_as_float() {
        // 1.0, -2.0, 2^-24 (the smallest subnormal).
        let halves: Vec<u8> = [0x3c00u16, 0xc000, 0x0001]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f2 = with_header(
            "{'descr': '<f2', 'fortran_order': False, 'shape': (1, 3), }",
            &halves,
        );
        assert_eq!(
            decode(&f2, "h.npy").unwrap().data,
            [1.0, -2.0, 2f32.powi(-24)]
        );
        let doubles: Vec<u8> = [0.5f64, -4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f8 = with_header(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1), }",
            &doubles,
        );
        assert_eq!(decode(&f8, "d.npy").unwrap().data, [0.5, -4.0]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = |b: &[u8]| format!("{:#}", decode(b, "x.npy").unwrap_err());
        assert!(err(b"PK\x03\x04").starts_with("reading x.npy as a .npy matrix"));
        let m = Matrix::new(2, 2, vec![0.0; 4]).unwrap();
        let mut short = encode(&m);
        short.truncate(short.len() - 3);
        assert!(err(&short).contains("needs 16 bytes of data, the file has 13"));
        let flat = with_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
            &[0; 16],
        );
        assert!(
            err(&flat).contains("shape [4] is not 2-D"),
            "{}",
            err(&flat)
        );
        let ints = with_header(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 1), }",
            &[0; 8],
        );
        assert!(err(&ints).contains("\"<i8\" is not a little-endian float"));
        let fortran = with_header(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1), }",
            &[0; 4],
        );
        assert!(err(&fortran).contains("Fortran-ordered"));
        assert!(Matrix::new(2, 2, vec![0.0; 3]).is_err());
    }
}
