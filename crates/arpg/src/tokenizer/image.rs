//! Image helpers for the tokenizer: loading, the ADM/LlamaGen center crop, tensor conversion,
//! grids, atomic PNG writes and `.npy` files for raw decoder output.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::ImageEncoder;
/// Re-exported so callers can name the image type through this module.
pub use image::RgbImage;
use std::path::Path;

/// Loads any PNG/JPEG as 8-bit RGB (format sniffed from the content, not the extension).
/// A JPEG must pass [`super::jpeg_check::validate`] first: its decoder turns truncated or
/// garbled data into grey blocks without an error.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    crate::util::open_regular(path, "image")?;
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let format = reader.format();
    if let Ok((w, h)) = reader.into_dimensions() {
        crate::util::check_memory(
            w as u128 * h as u128 * 8,
            &format!("decoding the {w}x{h} image {}", path.display()),
        )?;
    }
    let decoded = if format == Some(image::ImageFormat::Jpeg) {
        // One read for both the check and the decoder (which reads it whole anyway).
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
        super::jpeg_check::validate(&bytes)
            .map_err(|e| anyhow::anyhow!("image {} {e}", path.display()))?;
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
    } else {
        image::ImageReader::open(path)?
            .with_guessed_format()?
            .decode()
    };
    let img = decoded
        .with_context(|| format!("cannot decode image {}", path.display()))?
        .to_rgb8();
    ensure!(
        img.width() > 0 && img.height() > 0,
        "image {} is empty",
        path.display()
    );
    Ok(img)
}

/// Halves both sides by averaging 2x2 blocks (PIL's BOX reduce for even sides; an odd last
/// row/column is dropped, where PIL would spread it over the neighbouring output pixels).
fn box_halve(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() / 2, img.height() / 2);
    RgbImage::from_fn(w, h, |x, y| {
        let mut px = [0u8; 3];
        for (c, v) in px.iter_mut().enumerate() {
            let s: u32 = [(0, 0), (1, 0), (0, 1), (1, 1)]
                .iter()
                .map(|&(dx, dy)| img.get_pixel(2 * x + dx, 2 * y + dy)[c] as u32)
                .sum();
            *v = ((s + 2) / 4) as u8;
        }
        image::Rgb(px)
    })
}

/// ADM/LlamaGen `center_crop_arr`: halve with a box filter while the short side is at least
/// `2 * size`, resize bicubically so the short side is `size` (each side `round(x * scale)`,
/// Python's round-half-even), then crop the centre `size x size`.
///
/// The `image` crate's filters (CatmullRom for PIL's BICUBIC, a hand-rolled 2x2 box) differ
/// slightly from PIL's fixed-point ones, so pixels can be off by a level or so.
///
/// Panics if `size` is 0 or the image is empty (`load_rgb` never returns an empty image).
pub fn center_crop_resize(img: &RgbImage, size: usize) -> RgbImage {
    assert!(size > 0, "center_crop_resize: size must be positive");
    assert!(
        img.width() > 0 && img.height() > 0,
        "center_crop_resize: empty image"
    );
    let size32 = u32::try_from(size).unwrap_or(u32::MAX);
    let mut cur = img.clone();
    while (cur.width().min(cur.height()) as usize) >= 2 * size {
        cur = box_halve(&cur);
    }
    let scale = size as f64 / cur.width().min(cur.height()) as f64;
    let nw = ((cur.width() as f64 * scale).round_ties_even() as u32).max(size32);
    let nh = ((cur.height() as f64 * scale).round_ties_even() as u32).max(size32);
    if (nw, nh) != cur.dimensions() {
        cur = image::imageops::resize(&cur, nw, nh, FilterType::CatmullRom);
    }
    let crop_y = (nh - size32) / 2;
    let crop_x = (nw - size32) / 2;
    image::imageops::crop_imm(&cur, crop_x, crop_y, size32, size32).to_image()
}

/// [N, 3, H, W] f32 in [-1, 1]: pixel / 127.5 - 1 (bit-identical in f32 to the reference's
/// ToTensor + Normalize(0.5, 0.5) for all 256 levels).
pub fn images_to_tensor(imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = imgs.first().context("images_to_tensor: no images")?;
    let (w, h) = first.dimensions();
    let (wu, hu) = (w as usize, h as usize);
    let mut data = Vec::with_capacity(imgs.len() * 3 * hu * wu);
    for (i, img) in imgs.iter().enumerate() {
        if img.dimensions() != (w, h) {
            bail!(
                "images_to_tensor: image {i} is {}x{} but image 0 is {w}x{h} (all must be the same size)",
                img.width(),
                img.height()
            );
        }
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(
                raw.iter()
                    .skip(c)
                    .step_by(3)
                    .map(|&p| p as f32 / 127.5 - 1.0),
            );
        }
    }
    Ok(Tensor::from_vec(data, (imgs.len(), 3, hu, wu), device)?)
}

/// From decoder output [N, 3, H, W] (any float dtype/device): pixel = clamp(127.5 x + 128, 0, 255)
/// truncated to u8, as the reference's `.to(torch.uint8)` after the clamp.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    nhwc_to_images(&t.permute((0, 2, 3, 1))?)
}

/// [`tensor_to_images`] of a decoder output in NHWC, `[N, H, W, 3]`.
pub fn nhwc_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, h, w, _) = t.dims4()?;
    let raw = nhwc_to_u8(t)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let plane = 3 * h * w;
    Ok((0..n)
        .map(|i| {
            let px = raw[i * plane..(i + 1) * plane].to_vec();
            RgbImage::from_raw(w as u32, h as u32, px).expect("buffer size matches dimensions")
        })
        .collect())
}

/// Decoder output [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] on the tensor's own device, as
/// the reference's `sample_c2i_ddp.py` converts it: `clamp(127.5 * x + 128, 0, 255)` truncated
/// to uint8. On a GPU only the uint8 pixels cross to the host (a quarter of the f32 bytes).
pub fn tensor_to_u8_nhwc(t: &Tensor) -> Result<Tensor> {
    t.dims4().with_context(|| {
        format!(
            "tensor_to_images: expected [N, 3, H, W], got shape {:?}",
            t.dims()
        )
    })?;
    nhwc_to_u8(&t.permute((0, 2, 3, 1))?)
}

/// [`tensor_to_u8_nhwc`] of a decoder output already in NHWC, `[N, H, W, 3]`.
pub fn nhwc_to_u8(t: &Tensor) -> Result<Tensor> {
    let (_, _, _, c) = t.dims4().with_context(|| {
        format!(
            "tensor_to_images: expected [N, H, W, 3], got shape {:?}",
            t.dims()
        )
    })?;
    ensure!(c == 3, "tensor_to_images: expected 3 channels, got {c}");
    Ok(t.to_dtype(DType::F32)?
        .affine(127.5, 128.0)?
        .clamp(0f32, 255f32)?
        .contiguous()?
        .to_dtype(DType::U8)?)
}

/// A batch of RGB images as one uint8 buffer, N x H x W x 3 (ADM's `.npz` layout).
pub struct Pixels {
    pub data: Vec<u8>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

impl Pixels {
    pub fn from_images(imgs: &[RgbImage]) -> Result<Self> {
        let (w, h) = imgs.first().map_or((0, 0), |i| i.dimensions());
        ensure!(
            imgs.iter().all(|i| i.dimensions() == (w, h)),
            "images of different sizes in one batch"
        );
        Ok(Self {
            data: imgs
                .iter()
                .flat_map(|i| i.as_raw().iter().copied())
                .collect(),
            n: imgs.len(),
            h: h as usize,
            w: w as usize,
        })
    }

    /// Image `i` of the batch.
    pub fn image(&self, i: usize) -> RgbImage {
        let plane = self.h * self.w * 3;
        RgbImage::from_raw(
            self.w as u32,
            self.h as u32,
            self.data[i * plane..(i + 1) * plane].to_vec(),
        )
        .expect("buffer size matches dimensions")
    }
}

/// PNG encoding and writing on background threads, so that the GPU does not wait for it.
/// `flush` waits for everything submitted and reports the first error.
pub struct PngWriter {
    tx: Option<std::sync::mpsc::SyncSender<(std::path::PathBuf, RgbImage)>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    pending: std::sync::Arc<(std::sync::Mutex<PngState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct PngState {
    queued: usize,
    error: Option<String>,
}

impl PngWriter {
    /// `threads` encoders (at least one); at most `4 * threads` images wait in the queue, so a
    /// slow disk slows the producer instead of filling memory.
    pub fn new(threads: usize) -> Self {
        use std::sync::{Arc, Condvar, Mutex};
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(std::path::PathBuf, RgbImage)>(4 * threads);
        let rx = Arc::new(Mutex::new(rx));
        let pending = Arc::new((Mutex::new(PngState::default()), Condvar::new()));
        let workers = (0..threads)
            .map(|_| {
                let (rx, pending) = (rx.clone(), pending.clone());
                std::thread::spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((path, img)) = job else { return };
                    let r = save_png_atomic(&img, &path);
                    let (m, cv) = &*pending;
                    let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
                    st.queued -= 1;
                    if let Err(e) = r {
                        st.error.get_or_insert(format!("{e:#}"));
                    }
                    cv.notify_all();
                })
            })
            .collect();
        Self {
            tx: Some(tx),
            workers,
            pending,
        }
    }

    pub fn submit(&self, path: std::path::PathBuf, img: RgbImage) -> Result<()> {
        {
            let mut st = self.pending.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = &st.error {
                bail!("writing PNGs: {e}");
            }
            st.queued += 1;
        }
        self.tx
            .as_ref()
            .expect("sender lives until drop")
            .send((path, img))
            .map_err(|_| anyhow::anyhow!("PNG writer threads stopped"))
    }

    pub fn flush(&self) -> Result<()> {
        let (m, cv) = &*self.pending;
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        while st.queued > 0 {
            st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match &st.error {
            Some(e) => bail!("writing PNGs: {e}"),
            None => Ok(()),
        }
    }
}

impl Drop for PngWriter {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Tiles images row by row into `ncols` columns with `pad` black pixels around every cell
/// (torchvision `make_grid` layout). Cells are sized to the largest image.
pub fn make_grid(imgs: &[RgbImage], ncols: usize, pad: usize) -> RgbImage {
    if imgs.is_empty() {
        return RgbImage::new(0, 0);
    }
    let ncols = ncols.clamp(1, imgs.len());
    let nrows = imgs.len().div_ceil(ncols);
    let cw = imgs.iter().map(|i| i.width()).max().unwrap_or(0) as usize;
    let ch = imgs.iter().map(|i| i.height()).max().unwrap_or(0) as usize;
    let width = ncols * (cw + pad) + pad;
    let height = nrows * (ch + pad) + pad;
    let mut out = RgbImage::new(width as u32, height as u32);
    for (i, img) in imgs.iter().enumerate() {
        let x = pad + (i % ncols) * (cw + pad);
        let y = pad + (i / ncols) * (ch + pad);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// The VQ encoder's raw input (`encode --raw-in`): `.npy` f32 of N x 3 x H x W with square
/// images (token grids are square) and finite values.
pub fn read_raw_images(path: &Path, device: &Device) -> Result<Tensor> {
    let (shape, data) = read_npy_f32(path)?;
    if shape.len() != 4 || shape[1] != 3 || shape[0] == 0 {
        bail!(
            "--raw-in {}: shape {shape:?}, expected N x 3 x H x W",
            path.display()
        );
    }
    // `decode` reads square grids only: refuse what it could not read back.
    if shape[2] != shape[3] {
        bail!(
            "--raw-in {}: images of {}x{} pixels; only square images are supported \
             (token grids are square)",
            path.display(),
            shape[3],
            shape[2]
        );
    }
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        bail!("--raw-in {}: value {i} is {}", path.display(), data[i]);
    }
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// An editing command's outputs in `dir`: `{stem}_N.png` per image and `input.png`.
pub fn save_edits(dir: &Path, stem: &str, src: &RgbImage, images: &[RgbImage]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --out {}", dir.display()))?;
    for (i, im) in images.iter().enumerate() {
        save_png_atomic(im, &dir.join(format!("{stem}_{i}.png")))?;
    }
    save_png_atomic(src, &dir.join("input.png"))
}

/// The PNG name of sample `i` of class `class` (`sample`, `sample-fid`).
pub fn sample_png_name(i: usize, class: usize) -> String {
    format!("{i:06}_class{class}.png")
}

/// The overview of a sampling run: one row per class when there are several images a class,
/// else a square; tiny images (the digits model's 8x8) enlarged so that they can be seen.
pub fn sample_grid(images: &[RgbImage], per_class: usize) -> RgbImage {
    let ncols = match per_class {
        1 => (images.len() as f64).sqrt().ceil() as usize,
        n => n,
    };
    let g = make_grid(images, ncols, 2);
    let side = images.first().map_or(1, |i| i.width().max(1));
    if side >= 64 {
        return g;
    }
    let k = 64 / side;
    image::imageops::resize(&g, g.width() * k, g.height() * k, FilterType::Nearest)
}

/// A rerun into the same folder must not leave the earlier run's images beside the new ones:
/// remove the sampling outputs (`NNNNNN_classC.png`, `grid.png`) of `dir` that are not in
/// `written`. Other files are left alone.
pub fn remove_stale_samples(dir: &Path, written: &[String]) -> Result<()> {
    let written: std::collections::HashSet<&String> = written.iter().collect();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let ours = match name
            .strip_suffix(".png")
            .and_then(|n| n.split_once("_class"))
        {
            Some((idx, class)) => idx.len() == 6 && digits(idx) && digits(class),
            None => name == "grid.png",
        };
        if ours && !written.contains(&name) {
            std::fs::remove_file(e.path()).with_context(|| {
                format!("cannot remove the earlier run's {}", e.path().display())
            })?;
        }
    }
    Ok(())
}

pub fn save_png_atomic(img: &RgbImage, path: &Path) -> Result<()> {
    crate::util::write_atomic_with(path, "PNG", |w| {
        image::codecs::png::PngEncoder::new(w).write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )?;
        Ok(())
    })
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Writes an NPY v1.0 file ('<f4', C order) atomically.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("write_npy_f32: shape too large")?;
    ensure!(
        count == data.len(),
        "write_npy_f32 {}: shape {shape:?} holds {count} values but {} were given",
        path.display(),
        data.len()
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Pad with spaces so the data starts on a 64-byte boundary; the header ends with '\n'.
    let unpadded = NPY_MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let hlen = u16::try_from(header.len())
        .context("write_npy_f32: shape too long for an NPY v1.0 header")?;
    crate::util::write_atomic_with(path, "NPY file", |w| {
        w.write_all(NPY_MAGIC)?;
        w.write_all(&[1, 0])?;
        w.write_all(&hlen.to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        let mut bytes = Vec::with_capacity(data.len() * 4);
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes)?;
        Ok(())
    })
}

/// Reads an NPY file of '<f4' or '<f8' in C order (v1, v2 or v3 header); f64 is narrowed to
/// f32. (The one `.npy` reader, `data::npy`.)
pub fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    crate::data::npy::read_f32(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_header_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_npy_f32(&path, &[2, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert!((10 + hlen).is_multiple_of(64));
        assert_eq!(bytes[10 + hlen - 1], b'\n');
        assert_eq!(read_npy_f32(&path).unwrap(), (vec![2, 3, 4], data));

        write_npy_f32(&path, &[5], &[1.0; 5]).unwrap();
        assert_eq!(read_npy_f32(&path).unwrap().0, vec![5]);
        write_npy_f32(&path, &[], &[7.0]).unwrap();
        assert_eq!(read_npy_f32(&path).unwrap(), (vec![], vec![7.0]));
        assert!(write_npy_f32(&path, &[2, 2], &[1.0; 3]).is_err());
    }

    #[test]
    fn npy_reads_f64_and_rejects_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.npy");
        // A hand-made '<f8' file, the way numpy writes one.
        let mut header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }".to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = NPY_MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&1.5f64.to_le_bytes());
        bytes.extend_from_slice(&(-2.25f64).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_npy_f32(&path).unwrap(), (vec![2], vec![1.5, -2.25]));

        // Truncated data.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = format!("{:#}", read_npy_f32(&path).unwrap_err());
        assert!(e.contains("truncated") && e.contains("y.npy"), "{e}");
        // Bad magic.
        let mut bad = bytes.clone();
        bad[1] = b'X';
        std::fs::write(&path, &bad).unwrap();
        let e = format!("{:#}", read_npy_f32(&path).unwrap_err());
        assert!(e.contains("magic") && e.contains("y.npy"), "{e}");
        // Unsupported dtype and Fortran order.
        let mut other = bytes.clone();
        let at = other.windows(3).position(|w| w == b"<f8").unwrap();
        other[at..at + 3].copy_from_slice(b"<i8");
        std::fs::write(&path, &other).unwrap();
        assert!(format!("{:#}", read_npy_f32(&path).unwrap_err()).contains("<i8"));
        let mut fort = bytes.clone();
        let at = fort.windows(5).position(|w| w == b"False").unwrap();
        fort[at..at + 5].copy_from_slice(b"True ");
        std::fs::write(&path, &fort).unwrap();
        assert!(format!("{:#}", read_npy_f32(&path).unwrap_err()).contains("Fortran"));
        // Missing file.
        let e = format!(
            "{:#}",
            read_npy_f32(&dir.path().join("nope.npy")).unwrap_err()
        );
        assert!(e.contains("nope.npy"), "{e}");
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn center_crop_sizes_for_non_square_images() {
        // Short side 300 < 512: only the bicubic resize (to 427x256) and the crop.
        let out = center_crop_resize(&gradient(500, 300), 256);
        assert_eq!(out.dimensions(), (256, 256));
        // Short side 600 >= 512: one box halving (to 400x300 for 800x600) first.
        let out = center_crop_resize(&gradient(600, 800), 256);
        assert_eq!(out.dimensions(), (256, 256));
        // Odd sizes, upscaling, and an already-square image of the right size is unchanged.
        assert_eq!(
            center_crop_resize(&gradient(33, 17), 64).dimensions(),
            (64, 64)
        );
        let sq = gradient(64, 64);
        assert_eq!(center_crop_resize(&sq, 64), sq);
        // A 2x-wide exact image is box-halved to the same content as averaging 2x2 blocks.
        let flat = RgbImage::from_pixel(512, 256, image::Rgb([10, 20, 30]));
        let out = center_crop_resize(&flat, 128);
        assert_eq!(out.dimensions(), (128, 128));
        assert!(out.pixels().all(|p| p.0 == [10, 20, 30]));
    }

    #[test]
    fn center_crop_takes_the_middle() {
        // 4 columns of distinct colours, 2 tall: cropping to 2 keeps the middle two columns.
        let img = RgbImage::from_fn(4, 2, |x, _| image::Rgb([x as u8 * 60, 0, 0]));
        let out = center_crop_resize(&img, 2);
        assert_eq!(out.dimensions(), (2, 2));
        assert_eq!(out.get_pixel(0, 0).0[0], 60);
        assert_eq!(out.get_pixel(1, 1).0[0], 120);
    }

    #[test]
    fn tensor_image_round_trip() {
        let imgs = vec![gradient(5, 3), gradient(5, 3)];
        let t = images_to_tensor(&imgs, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 3, 5]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        // pixel/127.5 - 1 maps back through 127.5 x + 128 to pixel + 0.5, truncated to pixel.
        assert_eq!(tensor_to_images(&t).unwrap(), imgs);
        assert_eq!(
            tensor_to_images(&t.to_dtype(DType::BF16).unwrap())
                .unwrap()
                .len(),
            2
        );
        // Clamping of out-of-range decoder output.
        let t = Tensor::new(&[-2f32, 2.0, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        assert_eq!(
            tensor_to_images(&t).unwrap()[0].get_pixel(0, 0).0,
            [0, 255, 128]
        );
        assert!(images_to_tensor(&[gradient(5, 3), gradient(3, 5)], &Device::Cpu).is_err());
        assert!(images_to_tensor(&[], &Device::Cpu).is_err());
    }

    #[test]
    fn grid_layout_and_atomic_png() {
        let imgs = vec![gradient(4, 3); 5];
        let g = make_grid(&imgs, 2, 1);
        assert_eq!(g.dimensions(), (2 * 5 + 1, 3 * 4 + 1));
        assert_eq!(g.get_pixel(1, 1), imgs[0].get_pixel(0, 0));
        assert_eq!(g.get_pixel(0, 0).0, [0, 0, 0]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        save_png_atomic(&g, &path).unwrap();
        assert_eq!(load_rgb(&path).unwrap(), g);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
