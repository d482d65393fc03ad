//! NumPy `.npz` archives as ADM's evaluator uses them: `arr_0` (uint8 images, N x H x W x 3)
//! and reference statistics (`mu`, `sigma`, `mu_s`, `sigma_s`). Image arrays are streamed in
//! batches (50k images at 256x256 are 9.8 GB); small arrays are read whole.

use crate::data::npy::{self, Npy, NpyData};
use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use zip::CompressionMethod;

/// The names of the arrays in an `.npz` (without `.npy`).
pub fn names(path: &Path) -> Result<Vec<String>> {
    let zip = open_zip(path)?;
    Ok(zip
        .file_names()
        .filter_map(|n| {
            n.ok()
                .and_then(|n| n.strip_suffix(".npy").map(str::to_string))
        })
        .collect())
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    zip::ZipArchive::new(BufReader::new(f))
        .with_context(|| format!("{} is not an .npz (zip) archive", path.display()))
}

/// A reader over the raw bytes of one stored or deflated entry, independent of the archive.
fn entry_reader(path: &Path, name: &str) -> Result<Box<dyn Read + Send>> {
    let mut zip = open_zip(path)?;
    let entry = format!("{name}.npy");
    let have: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.trim_end_matches(".npy").to_string()))
        .collect();
    let (start, size, method) = {
        let f = zip.by_name(&entry).map_err(|_| {
            anyhow::anyhow!(
                "{}: no array `{name}` (it has: {})",
                path.display(),
                have.join(", ")
            )
        })?;
        (
            f.data_start()
                .with_context(|| format!("{}: cannot locate {entry}", path.display()))?,
            f.compressed_size(),
            f.compression(),
        )
    };
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.seek(SeekFrom::Start(start))?;
    let raw = BufReader::with_capacity(1 << 20, file).take(size);
    if method == CompressionMethod::Stored {
        Ok(Box::new(raw))
    } else if method == CompressionMethod::DEFLATE {
        // np.savez_compressed: deflate through flate2 (the zip crate is built without it).
        Ok(Box::new(BufReader::new(flate2::read::DeflateDecoder::new(
            raw,
        ))))
    } else {
        bail!(
            "{}: {entry} uses unsupported compression {method:?} (save with np.savez or np.savez_compressed)",
            path.display()
        )
    }
}

/// Parse an `.npy` header from a stream: (descr, shape), leaving the reader at the data.
fn read_header(r: &mut dyn Read) -> Result<(String, Vec<usize>)> {
    let mut pre = [0u8; 10];
    r.read_exact(&mut pre).context("truncated .npy header")?;
    if &pre[..6] != b"\x93NUMPY" {
        bail!("bad magic (not a .npy file)");
    }
    let hlen = match pre[6] {
        1 => u16::from_le_bytes([pre[8], pre[9]]) as usize,
        2 | 3 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).context("truncated .npy header")?;
            u32::from_le_bytes([pre[8], pre[9], b[0], b[1]]) as usize
        }
        v => bail!("unsupported .npy version {v}"),
    };
    let mut h = vec![0u8; hlen];
    r.read_exact(&mut h).context("truncated .npy header")?;
    let text = std::str::from_utf8(&h).context("non-UTF-8 .npy header")?;
    let after = |key: &str| -> Result<&str> {
        let i = text
            .find(&format!("'{key}'"))
            .with_context(|| format!("header lacks {key}"))?;
        Ok(text[i + key.len() + 2..].trim_start_matches([' ', ':']))
    };
    let descr = after("descr")?
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .context("bad descr")?
        .to_string();
    if after("fortran_order")?.starts_with("True") {
        bail!("Fortran-ordered arrays are not supported");
    }
    let s = after("shape")?;
    let s = &s[1..s.find(')').context("bad shape")?];
    let shape = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<usize>().context("bad shape"))
        .collect::<Result<_>>()?;
    Ok((descr, shape))
}

/// Read a whole (small) array, e.g. `mu` or `sigma`.
pub fn read_array(path: &Path, name: &str) -> Result<Npy> {
    let mut r = entry_reader(path, name)?;
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read array `{name}`", path.display()))?;
    npy::parse(&bytes).with_context(|| format!("{}: array `{name}` is invalid", path.display()))
}

/// A float array (f32 or f64) with its shape checked, as f64.
pub fn read_floats(
    path: &Path,
    name: &str,
    shape: &[Option<usize>],
) -> Result<(Vec<usize>, Vec<f64>)> {
    let a = read_array(path, name)?;
    let ok_shape = a.shape.len() == shape.len()
        && a.shape
            .iter()
            .zip(shape)
            .all(|(&d, s)| s.is_none_or(|s| s == d));
    if !ok_shape {
        let want: Vec<String> = shape
            .iter()
            .map(|s| s.map(|d| d.to_string()).unwrap_or("N".into()))
            .collect();
        bail!(
            "{}: array `{name}` has shape {:?}, expected ({})",
            path.display(),
            a.shape,
            want.join(", ")
        );
    }
    match a.data {
        NpyData::Float(v) => Ok((a.shape, v)),
        NpyData::Int(_) => bail!(
            "{}: array `{name}` has dtype {}, expected float32 or float64",
            path.display(),
            a.descr
        ),
    }
}

/// Streams uint8 images (N x H x W x 3) from an `.npz` array in batches.
pub struct ImageReader {
    reader: Box<dyn Read + Send>,
    pub path: PathBuf,
    /// Total images, height, width.
    pub n: usize,
    pub height: usize,
    pub width: usize,
    done: usize,
}

impl ImageReader {
    pub fn open(path: &Path, name: &str) -> Result<Self> {
        let mut reader = entry_reader(path, name)?;
        let (descr, shape) = read_header(&mut reader)
            .with_context(|| format!("{}: array `{name}` is not a valid .npy", path.display()))?;
        if descr != "|u1" && descr != "<u1" {
            bail!(
                "{}: `{name}` has dtype {descr}, expected uint8 images (N x H x W x 3, values 0..255)",
                path.display()
            );
        }
        if shape.len() != 4 || shape[3] != 3 {
            bail!(
                "{}: `{name}` has shape {shape:?}, expected N x H x W x 3 (uint8 RGB, channels last)",
                path.display()
            );
        }
        Ok(Self {
            reader,
            path: path.to_path_buf(),
            n: shape[0],
            height: shape[1],
            width: shape[2],
            done: 0,
        })
    }

    pub fn image_bytes(&self) -> usize {
        self.height * self.width * 3
    }

    /// Up to `max` more images as one HWC byte buffer, with their count; None at the end.
    pub fn next_batch(&mut self, max: usize) -> Result<Option<(usize, Vec<u8>)>> {
        let k = max.min(self.n - self.done);
        if k == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; k * self.image_bytes()];
        self.reader.read_exact(&mut buf).with_context(|| {
            format!(
                "{}: truncated image data (image {} of {})",
                self.path.display(),
                self.done,
                self.n
            )
        })?;
        self.done += k;
        Ok(Some((k, buf)))
    }
}

/// An array to put into an `.npz`: a name, a `.npy` dtype (`|u1`, `<f4`, `<f8`), a shape, and
/// a source of raw little-endian bytes (streamed, so 10 GB image arrays need no copy in RAM).
pub struct Entry<'a> {
    pub name: String,
    pub descr: String,
    pub shape: Vec<usize>,
    pub body: Box<dyn Read + 'a>,
}

impl<'a> Entry<'a> {
    pub fn f64s(name: &str, shape: &[usize], v: &'a [f64]) -> Self {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self {
            name: name.into(),
            descr: "<f8".into(),
            shape: shape.to_vec(),
            body: Box::new(std::io::Cursor::new(bytes)),
        }
    }
    pub fn f32s(name: &str, shape: &[usize], v: &'a [f32]) -> Self {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self {
            name: name.into(),
            descr: "<f4".into(),
            shape: shape.to_vec(),
            body: Box::new(std::io::Cursor::new(bytes)),
        }
    }
    pub fn u8s(name: &str, shape: &[usize], v: &'a [u8]) -> Self {
        Self {
            name: name.into(),
            descr: "|u1".into(),
            shape: shape.to_vec(),
            body: Box::new(v),
        }
    }
}

/// Write an uncompressed `.npz` (what `np.savez` writes) atomically: into a temporary file in
/// the same folder, renamed into place when complete. Zip64, so arrays over 4 GB work.
pub fn write(path: &Path, entries: Vec<Entry>) -> Result<()> {
    let tmp = crate::util::temp_beside(path)?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::with_capacity(1 << 20, tmp));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(true);
    let result = (|| -> Result<()> {
        for mut e in entries {
            z.start_file(format!("{}.npy", e.name), opts)?;
            let width = match e.descr.as_str() {
                "<f8" => 8,
                "<f4" => 4,
                _ => 1,
            };
            let expect = e.shape.iter().product::<usize>() * width;
            z.write_all(&npy::to_bytes(&e.descr, &e.shape, &[]))?;
            let n = std::io::copy(&mut e.body, &mut z)
                .with_context(|| format!("cannot read the data of array `{}`", e.name))?;
            ensure!(
                n as usize == expect,
                "array `{}`: {n} bytes of data for shape {:?} ({expect} expected)",
                e.name,
                e.shape
            );
        }
        Ok(())
    })();
    result.with_context(|| format!("cannot write {}", path.display()))?;
    let tmp = z
        .finish()
        .with_context(|| format!("cannot write {}", path.display()))?
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", path.display()))?;
    crate::util::persist_atomic(tmp, path, ".npz")
}

/// The body of a C-order `.npy` file (after its header), with its dtype and shape.
pub fn npy_body(path: &Path) -> Result<(String, Vec<usize>, BufReader<File>)> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let (descr, shape) =
        read_header(&mut r).with_context(|| format!("{} is not a valid .npy", path.display()))?;
    Ok((descr, shape, r))
}
