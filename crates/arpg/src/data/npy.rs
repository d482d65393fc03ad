//! NumPy `.npy` (format 1.0/2.0/3.0) reading and writing, C order, little-endian: the one
//! reader for every `.npy` the project reads (token files, raw decoder input, FID shards, the
//! arrays inside `.npz`). The header is parsed as the Python literal it is, strictly, and the
//! data size is checked against the file before anything is allocated.
//!
//! Ours rather than a crate's, measured: `npyz` 0.8 (the maintained reader) accepts a header
//! whose element count overflows (`shape (2^62, 8)` of `<u2` reads as 0 values, no error), a
//! silently wrong result that our overflow-checked count refuses; the hostile-input and fuzz
//! tests hold ours to that.

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::Path;

/// Longest header accepted (numpy's own reader refuses more than 10,000 bytes by default).
pub const MAX_HEADER: usize = 1 << 16;

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

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// As written, e.g. `<f4` or `|u1`.
    pub descr: String,
    /// `i`, `u`, `f` or `b`.
    pub kind: u8,
    /// Bytes per value.
    pub width: usize,
    pub shape: Vec<usize>,
    /// Bytes before the data (magic, lengths and header text).
    pub offset: usize,
    /// Values (the product of `shape`, checked).
    pub count: usize,
}

impl Header {
    /// Bytes of data the header promises (checked against overflow when parsed).
    pub fn data_bytes(&self) -> usize {
        self.count * self.width
    }
    /// Whether the values are unsigned bytes (`|u1`, `<u1`).
    pub fn is_u8(&self) -> bool {
        self.kind == b'u' && self.width == 1
    }
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

/// A value of the header dict: the subset of Python literals numpy writes there.
enum Lit {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parse `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_dict(text: &str) -> Result<Vec<(String, Lit)>> {
    let s = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] as char).is_ascii_whitespace() {
            *i += 1;
        }
    };
    let expect = |i: &mut usize, c: u8| -> Result<()> {
        ensure!(
            *i < s.len() && s[*i] == c,
            "header: expected {:?} at byte {}",
            c as char,
            *i
        );
        *i += 1;
        Ok(())
    };
    let string = |i: &mut usize| -> Result<String> {
        ensure!(
            *i < s.len() && (s[*i] == b'\'' || s[*i] == b'"'),
            "header: expected a quoted string at byte {}",
            *i
        );
        let q = s[*i];
        let start = *i + 1;
        let end = s[start..]
            .iter()
            .position(|&c| c == q)
            .context("header: unterminated string")?;
        *i = start + end + 1;
        Ok(text[start..start + end].to_string())
    };
    ws(&mut i);
    expect(&mut i, b'{')?;
    let mut out = Vec::new();
    loop {
        ws(&mut i);
        if i < s.len() && s[i] == b'}' {
            i += 1;
            break;
        }
        let key = string(&mut i)?;
        ws(&mut i);
        expect(&mut i, b':')?;
        ws(&mut i);
        ensure!(i < s.len(), "header: no value for {key:?}");
        let val = match s[i] {
            b'\'' | b'"' => Lit::Str(string(&mut i)?),
            b'(' => Lit::Tuple(parse_tuple(text, &mut i)?),
            _ if s[i..].starts_with(b"True") => {
                i += 4;
                Lit::Bool(true)
            }
            _ if s[i..].starts_with(b"False") => {
                i += 5;
                Lit::Bool(false)
            }
            _ => bail!("header: unsupported value for {key:?} at byte {i}"),
        };
        out.push((key, val));
        ws(&mut i);
        match s.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => {}
            _ => bail!("header: expected ',' or '}}' at byte {i}"),
        }
    }
    ws(&mut i);
    ensure!(i == s.len(), "header: text after the dict at byte {i}");
    Ok(out)
}

/// Parse the tuple of dimensions at `text[*i]` (`(2, 3)`, `(5,)`, `()`), past its `)`.
fn parse_tuple(text: &str, i: &mut usize) -> Result<Vec<usize>> {
    let s = text.as_bytes();
    let ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] as char).is_ascii_whitespace() {
            *i += 1;
        }
    };
    *i += 1;
    let mut dims = Vec::new();
    loop {
        ws(i);
        if *i < s.len() && s[*i] == b')' {
            *i += 1;
            return Ok(dims);
        }
        let start = *i;
        while *i < s.len() && s[*i].is_ascii_digit() {
            *i += 1;
        }
        ensure!(
            *i > start,
            "header: bad dimension in 'shape' at byte {start}"
        );
        let d: usize = text[start..*i]
            .parse()
            .with_context(|| format!("header: dimension {} is too large", &text[start..*i]))?;
        dims.push(d);
        // Python 2 numpy wrote long integers as `3L`.
        if *i < s.len() && s[*i] == b'L' {
            *i += 1;
        }
        ws(i);
        match s.get(*i) {
            Some(b',') => *i += 1,
            Some(b')') => {}
            _ => bail!("header: expected ',' or ')' in 'shape' at byte {}", *i),
        }
    }
}

/// Parse `<f4`-style type strings: byte order, kind, width.
fn parse_descr(descr: &str) -> Result<(u8, usize)> {
    let b = descr.as_bytes();
    ensure!(
        (3..=4).contains(&b.len()) && descr.is_ascii(),
        "unsupported dtype {descr:?}"
    );
    let (order, kind) = (b[0], b[1]);
    let width: usize = descr[2..]
        .parse()
        .with_context(|| format!("unsupported dtype {descr:?}"))?;
    ensure!(
        matches!(order, b'<' | b'|' | b'=' | b'>'),
        "unsupported dtype {descr:?} (byte order {:?})",
        order as char
    );
    ensure!(
        order != b'>' || width == 1,
        "big-endian dtype {descr} is not supported"
    );
    let ok = match kind {
        b'i' | b'u' => matches!(width, 1 | 2 | 4 | 8),
        b'f' => matches!(width, 4 | 8),
        b'b' => width == 1,
        _ => false,
    };
    ensure!(ok, "unsupported dtype {descr:?}");
    Ok((kind, width))
}

/// Read and check a `.npy` header, leaving `r` at the first data byte.
pub fn read_header(r: &mut dyn Read) -> Result<Header> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).context("truncated header")?;
    if &pre[..6] != b"\x93NUMPY" {
        bail!("bad magic (not a .npy file)");
    }
    let (hlen, offset) = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).context("truncated header")?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).context("truncated header")?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => bail!("unsupported .npy version {v}"),
    };
    ensure!(
        hlen <= MAX_HEADER,
        "header of {hlen} bytes is longer than the {MAX_HEADER} accepted"
    );
    let mut h = vec![0u8; hlen];
    r.read_exact(&mut h).context("truncated header")?;
    let text = std::str::from_utf8(&h).context("header is not UTF-8 text")?;
    let dict = parse_dict(text)?;
    let get = |k: &str| {
        dict.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v)
            .with_context(|| format!("header lacks '{k}'"))
    };
    let descr = match get("descr")? {
        Lit::Str(s) => s.clone(),
        _ => bail!("header: 'descr' is not a string"),
    };
    match get("fortran_order")? {
        Lit::Bool(false) => {}
        Lit::Bool(true) => bail!("Fortran-ordered arrays are not supported (C order only)"),
        _ => bail!("header: 'fortran_order' is neither True nor False"),
    }
    let shape = match get("shape")? {
        Lit::Tuple(d) => d.clone(),
        _ => bail!("header: 'shape' is not a tuple"),
    };
    let (kind, width) = parse_descr(&descr)?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|c| {
            c.checked_mul(width)
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .with_context(|| format!("shape {shape:?} of {descr} is too large"))?;
    Ok(Header {
        descr,
        kind,
        width,
        shape,
        offset: offset + hlen,
        count,
    })
}

/// Read a `.npy` file: the header first, the file's size checked against it, then the data.
pub fn read(path: &Path) -> Result<Npy> {
    let f = crate::util::open_regular(path, ".npy file")?;
    let size = f.metadata()?.len();
    let mut r = std::io::BufReader::new(f);
    let h = read_header(&mut r).with_context(|| format!("invalid .npy file {}", path.display()))?;
    let want = (h.offset + h.data_bytes()) as u64;
    ensure!(
        size == want,
        "invalid .npy file {}: {size} bytes, its header ({} values of {}) needs {want}{}",
        path.display(),
        h.count,
        h.descr,
        if size < want { " (truncated)" } else { "" }
    );
    let mut body = vec![0u8; h.data_bytes()];
    r.read_exact(&mut body)
        .with_context(|| format!("cannot read {}", path.display()))?;
    decode(h, &body).with_context(|| format!("invalid .npy file {}", path.display()))
}

/// Parse a whole `.npy` held in memory.
pub fn parse(bytes: &[u8]) -> Result<Npy> {
    let mut r = bytes;
    let h = read_header(&mut r)?;
    let n = h.data_bytes();
    ensure!(
        r.len() >= n,
        "truncated data: {} bytes for {} values of {}",
        r.len(),
        h.count,
        h.descr
    );
    ensure!(
        r.len() == n,
        "{} bytes after the {} values of {}",
        r.len() - n,
        h.count,
        h.descr
    );
    decode(h, r)
}

fn decode(h: Header, body: &[u8]) -> Result<Npy> {
    let chunks = body[..h.data_bytes()].chunks_exact(h.width);
    let le = |c: &[u8]| {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    };
    let data = match (h.kind, h.width) {
        (b'i', 1) => NpyData::Int(chunks.map(|c| c[0] as i8 as i64).collect()),
        (b'u', 1) | (b'b', 1) => NpyData::Int(chunks.map(|c| c[0] as i64).collect()),
        (b'i', 2) => NpyData::Int(chunks.map(|c| le(c) as u16 as i16 as i64).collect()),
        (b'i', 4) => NpyData::Int(chunks.map(|c| le(c) as u32 as i32 as i64).collect()),
        (b'u', 2 | 4) => NpyData::Int(chunks.map(|c| le(c) as i64).collect()),
        (b'i', 8) => NpyData::Int(chunks.map(|c| le(c) as i64).collect()),
        (b'u', 8) => {
            let v: Vec<u64> = chunks.map(le).collect();
            if let Some(&x) = v.iter().find(|&&x| x > i64::MAX as u64) {
                bail!(
                    "value {x} of {} does not fit a signed 64-bit integer",
                    h.descr
                );
            }
            NpyData::Int(v.into_iter().map(|x| x as i64).collect())
        }
        (b'f', 4) => NpyData::Float(
            chunks
                .map(|c| f32::from_bits(le(c) as u32) as f64)
                .collect(),
        ),
        (b'f', 8) => NpyData::Float(chunks.map(|c| f64::from_bits(le(c))).collect()),
        _ => bail!("unsupported dtype {}", h.descr),
    };
    Ok(Npy {
        shape: h.shape,
        descr: h.descr,
        data,
    })
}

/// A float32 array (from `<f4` or `<f8`, narrowed): the shape and the values.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let a = read(path)?;
    match a.data {
        NpyData::Float(_) => Ok((a.shape.clone(), a.floats())),
        NpyData::Int(_) => bail!(
            "{}: dtype {:?} is not supported (only '<f4' and '<f8')",
            path.display(),
            a.descr
        ),
    }
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

    fn with_header(h: &str, body: &[u8]) -> Vec<u8> {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn malformed_headers_are_errors_not_panics() {
        let bad = [
            (
                "{'descr': 'x', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '>i8', 'fortran_order': False, 'shape': (1,), }",
                "big-endian",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': ), }",
                "shape",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (,), }",
                "dimension",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (-1,), }",
                "dimension",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (1",
                "shape",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
                "too large",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
                "too large",
            ),
            (
                "{'descr': '<i8', 'fortran_order': True, 'shape': (1,), }",
                "Fortran",
            ),
            (
                "{'descr': '<i8', 'fortran_order': 1, 'shape': (1,), }",
                "fortran_order",
            ),
            ("{'descr': '<i8', 'shape': (1,), }", "fortran_order"),
            ("{'descr': '<i8 ", "unterminated"),
            ("", "expected"),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), } x",
                "after",
            ),
        ];
        for (h, needle) in bad {
            let e = format!("{:#}", parse(&with_header(h, &[0; 8])).unwrap_err());
            assert!(e.contains(needle), "{h:?}: {e}");
        }
        // numpy's own spellings: double quotes, no trailing comma, Python 2 longs, a scalar.
        let ok = parse(&with_header(
            r#"{"descr": "<u2", "fortran_order": False, "shape": (2L, 1L)}"#,
            &[1, 0, 2, 0],
        ))
        .unwrap();
        assert_eq!(ok.shape, vec![2, 1]);
        assert_eq!(
            parse(&with_header(
                "{'descr': '|u1', 'fortran_order': False, 'shape': (), }",
                &[7]
            ))
            .unwrap()
            .len(),
            1
        );
        // Data bytes beyond the shape, and a v2 header longer than accepted.
        assert!(parse(&with_header(
            "{'descr': '|u1', 'fortran_order': False, 'shape': (1,), }",
            &[7, 8]
        ))
        .is_err());
        let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
        v2.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(format!("{:#}", parse(&v2).unwrap_err()).contains("longer than"));
    }
}
