//! Minimal NumPy `.npy` (format 1.0/2.0/3.0) reading and writing, C order, little-endian.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// An array read from a `.npy` file, values widened to i64 or f64.
#[derive(Debug, Clone)]
pub enum NpyData {
    Int(Vec<i64>),
    Float(Vec<f64>),
}

#[derive(Debug, Clone)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub descr: String,
    pub data: NpyData,
}

impl Npy {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn ints(&self, path: &Path) -> Result<&[i64]> {
        match &self.data {
            NpyData::Int(v) => Ok(v),
            NpyData::Float(_) => bail!(
                "{}: expected integers, found dtype {}",
                path.display(),
                self.descr
            ),
        }
    }
    pub fn floats(&self) -> Vec<f32> {
        match &self.data {
            NpyData::Int(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::Float(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

pub fn read(path: &Path) -> Result<Npy> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("invalid .npy file {}", path.display()))
}

pub fn parse(bytes: &[u8]) -> Result<Npy> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("bad magic (not a .npy file)");
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into()?) as usize, 12),
        v => bail!("unsupported .npy version {v}"),
    };
    let header = std::str::from_utf8(
        bytes
            .get(hstart..hstart + hlen)
            .context("truncated header")?,
    )?;
    let field = |key: &str| -> Result<&str> {
        let i = header
            .find(&format!("'{key}'"))
            .with_context(|| format!("header lacks {key}"))?;
        Ok(header[i + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr[1..]
        .split('\'')
        .next()
        .context("bad descr")?
        .to_string();
    if field("fortran_order")?.starts_with("True") {
        bail!("Fortran-ordered arrays are not supported");
    }
    let s = field("shape")?;
    let s = &s[1..s.find(')').context("bad shape")?];
    let shape: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<usize>().context("bad shape"))
        .collect::<Result<_>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[hstart + hlen..];
    let width: usize = descr[2..]
        .parse()
        .with_context(|| format!("unsupported dtype {descr}"))?;
    if descr.starts_with('>') {
        bail!("big-endian dtype {descr} is not supported");
    }
    if body.len() < n * width {
        bail!(
            "truncated data: {} bytes for {n} values of {descr}",
            body.len()
        );
    }
    let kind = descr.as_bytes()[1];
    let chunks = body[..n * width].chunks_exact(width);
    let data = match (kind, width) {
        (b'i', 1) => NpyData::Int(chunks.map(|c| c[0] as i8 as i64).collect()),
        (b'u', 1) | (b'b', 1) => NpyData::Int(chunks.map(|c| c[0] as i64).collect()),
        (b'i', 2) => NpyData::Int(
            chunks
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
        ),
        (b'u', 2) => NpyData::Int(
            chunks
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
        ),
        (b'i', 4) => NpyData::Int(
            chunks
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        (b'u', 4) => NpyData::Int(
            chunks
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        (b'i', 8) => NpyData::Int(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        (b'u', 8) => NpyData::Int(
            chunks
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        (b'f', 4) => NpyData::Float(
            chunks
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
        ),
        (b'f', 8) => NpyData::Float(
            chunks
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        _ => bail!("unsupported dtype {descr}"),
    };
    Ok(Npy { shape, descr, data })
}

/// Serialise a C-order array; `descr` is e.g. `<f4` or `|u1`, `body` its raw little-endian bytes.
pub fn to_bytes(descr: &str, shape: &[usize], body: &[u8]) -> Vec<u8> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Pad so that the data starts on a 64-byte boundary, header ending in a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let body: Vec<u8> = [1i64, -2, 300]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let bytes = to_bytes("<i8", &[3], &body);
        assert_eq!(bytes.len() % 64, 24);
        let npy = parse(&bytes).unwrap();
        assert_eq!(npy.shape, vec![3]);
        assert!(matches!(npy.data, NpyData::Int(ref v) if v == &vec![1, -2, 300]));
        assert!(parse(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(parse(b"garbage!!!!!")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let f = to_bytes("<f4", &[1, 2], &[0, 0, 128, 63, 0, 0, 0, 64]);
        assert_eq!(parse(&f).unwrap().floats(), vec![1.0, 2.0]);
    }
}
