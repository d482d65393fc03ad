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
    let f = crate::util::open_regular(path, ".npz")?;
    zip::ZipArchive::new(BufReader::new(f))
        .with_context(|| format!("{} is not an .npz (zip) archive", path.display()))
}

/// Largest array read whole (`mu`, `sigma`: 32 MB at 2048 x 2048 f64).
const MAX_WHOLE_ARRAY: u64 = 1 << 30;

/// A reader over the raw bytes of one stored or deflated entry, independent of the archive,
/// with the entry's uncompressed size as the archive records it.
fn entry_reader(path: &Path, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
    let mut zip = open_zip(path)?;
    let entry = format!("{name}.npy");
    let have: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.trim_end_matches(".npy").to_string()))
        .collect();
    let (start, size, method, full) = {
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
            f.size(),
        )
    };
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.seek(SeekFrom::Start(start))?;
    let raw = BufReader::with_capacity(1 << 20, file).take(size);
    if method == CompressionMethod::Stored {
        let r: Box<dyn Read + Send> = Box::new(raw);
        Ok((r, full))
    } else if method == CompressionMethod::DEFLATE {
        // np.savez_compressed: deflate through flate2 (the zip crate is built without it).
        let inflated = flate2::read::DeflateDecoder::new(raw).take(full);
        let r: Box<dyn Read + Send> = Box::new(BufReader::new(inflated));
        Ok((r, full))
    } else {
        bail!(
            "{}: {entry} uses unsupported compression {method:?} (save with np.savez or np.savez_compressed)",
            path.display()
        )
    }
}

/// Read a whole (small) array, e.g. `mu` or `sigma`.
pub fn read_array(path: &Path, name: &str) -> Result<Npy> {
    let (r, size) = entry_reader(path, name)?;
    ensure!(
        size <= MAX_WHOLE_ARRAY,
        "{}: array `{name}` is {size} bytes, more than the {MAX_WHOLE_ARRAY} read whole",
        path.display()
    );
    let mut bytes = Vec::with_capacity(size as usize);
    r.take(size)
        .read_to_end(&mut bytes)
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
        let (mut reader, size) = entry_reader(path, name)?;
        let h = npy::read_header(&mut reader)
            .with_context(|| format!("{}: array `{name}` is not a valid .npy", path.display()))?;
        let (descr, shape) = (&h.descr, &h.shape);
        if !h.is_u8() {
            bail!(
                "{}: `{name}` has dtype {descr}, expected uint8 images (N x H x W x 3, values 0..255)",
                path.display()
            );
        }
        if shape.len() != 4 || shape[3] != 3 || shape[1] == 0 || shape[2] == 0 {
            bail!(
                "{}: `{name}` has shape {shape:?}, expected N x H x W x 3 (uint8 RGB, channels last)",
                path.display()
            );
        }
        // The header's claim against the archive's record, before any batch is allocated.
        let want = (h.offset + h.data_bytes()) as u64;
        ensure!(
            size == want,
            "{}: `{name}` is {size} bytes in the archive, its header ({shape:?} uint8) needs {want}{}",
            path.display(),
            if size < want { " (truncated)" } else { "" }
        );
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
        let bytes = k as u128 * self.image_bytes() as u128;
        crate::util::check_memory(
            bytes,
            &format!(
                "a batch of {k} images of {}x{} from {}",
                self.height,
                self.width,
                self.path.display()
            ),
        )?;
        let mut buf = vec![0u8; bytes as usize];
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
    // A second Ctrl-C waits for the archive instead of orphaning its temporary file.
    let _busy = crate::util::Critical::enter();
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

/// The body of a C-order `.npy` file (after its header), with its header, the file's size
/// checked against it (a truncated file is an error that names it).
pub fn npy_body(path: &Path) -> Result<(npy::Header, BufReader<File>)> {
    let f = crate::util::open_regular(path, ".npy file")?;
    let size = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let h = npy::read_header(&mut r)
        .with_context(|| format!("{} is not a valid .npy", path.display()))?;
    let want = (h.offset + h.data_bytes()) as u64;
    ensure!(
        size == want,
        "{}: {size} bytes, its header ({:?} of {}) needs {want}{}",
        path.display(),
        h.shape,
        h.descr,
        if size < want { " (truncated)" } else { "" }
    );
    Ok((h, r))
}
