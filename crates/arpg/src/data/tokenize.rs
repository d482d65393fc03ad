//! Pre-tokenizing an image folder with the VQ encoder, as LlamaGen's code extraction does:
//! `ROOT/<class>/<image>` -> `OUT/<class id>/<image stem>.npy` of shape `(1, n_aug, L)` (u16),
//! the paper's layout, which `arpg pack --paper` reads. Class ids follow the sorted folder
//! names (as torchvision's ImageFolder). Finished files are kept, so a rerun resumes.

use crate::tokenizer::image::{center_crop_resize, load_rgb};
use anyhow::{bail, ensure, Context, Result};
use image::{imageops, RgbImage};
use std::path::{Path, PathBuf};

/// The crops encoded per image: the ADM centre crop and its mirror image, or with
/// `ten_crop` the ADM centre crop at 1.1x size, then its four corners and centre at the
/// target size and their mirror images (torchvision's TenCrop).
pub fn augmentations(img: &RgbImage, size: usize, ten_crop: bool) -> Vec<RgbImage> {
    if !ten_crop {
        let c = center_crop_resize(img, size);
        let f = imageops::flip_horizontal(&c);
        return vec![c, f];
    }
    let big = center_crop_resize(img, (size as f64 * 1.1) as usize);
    let (b, s) = (big.width(), size as u32);
    let corners = [
        (0, 0),
        (b - s, 0),
        (0, b - s),
        (b - s, b - s),
        ((b - s) / 2, (b - s) / 2),
    ];
    let crops: Vec<RgbImage> = corners
        .iter()
        .map(|&(x, y)| imageops::crop_imm(&big, x, y, s, s).to_image())
        .collect();
    let flips: Vec<RgbImage> = crops.iter().map(imageops::flip_horizontal).collect();
    crops.into_iter().chain(flips).collect()
}

/// Image files this reads, by extension, in any letter case.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Images to encode: (class id, image path, output path), in a stable order. Refuses an
/// output folder inside the image root (the next run would read it as a class) and two images
/// of one class with the same stem (`a.png`, `a.jpg`: both would be written to `a.npy`).
pub fn plan(root: &Path, out: &Path) -> Result<Vec<(usize, PathBuf, PathBuf)>> {
    if let (Ok(r), Ok(o)) = (std::fs::canonicalize(root), canonical_target(out)) {
        if o.starts_with(&r) {
            bail!(
                "the output folder {} is inside the image root {}: a later run would read it \
                 as a class (and shift every label); put it elsewhere",
                out.display(),
                root.display()
            );
        }
    }
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: no class folders (expected ROOT/<class>/<images>)",
            root.display()
        );
    }
    let mut jobs = Vec::new();
    let mut skipped = 0usize;
    for (id, dir) in classes.iter().enumerate() {
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let p = e
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            if is_image(&p) && p.is_file() {
                files.push(p);
            } else {
                skipped += 1;
            }
        }
        files.sort();
        let mut by_stem: std::collections::BTreeMap<String, &PathBuf> = Default::default();
        for f in &files {
            let stem = f
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if let Some(other) = by_stem.insert(stem.clone(), f) {
                bail!(
                    "{} and {} would both be encoded to {}: rename one",
                    other.display(),
                    f.display(),
                    out.join(id.to_string())
                        .join(format!("{stem}.npy"))
                        .display()
                );
            }
            jobs.push((
                id,
                f.clone(),
                out.join(id.to_string()).join(format!("{stem}.npy")),
            ));
        }
    }
    if skipped > 0 {
        eprintln!(
            "note: {skipped} entries in the class folders are not .png/.jpg/.jpeg images and are skipped"
        );
    }
    Ok(jobs)
}

/// `path` made absolute through its nearest existing ancestor (it may not exist yet).
fn canonical_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut tail = Vec::new();
    let mut p = path.to_path_buf();
    loop {
        match std::fs::canonicalize(&p) {
            Ok(c) => {
                return Ok(tail
                    .iter()
                    .rev()
                    .fold(c, |acc, t: &std::ffi::OsString| acc.join(t)))
            }
            Err(e) => {
                let name = p.file_name().map(|n| n.to_os_string());
                match (name, p.parent()) {
                    (Some(n), Some(parent)) => {
                        tail.push(n);
                        p = if parent.as_os_str().is_empty() {
                            PathBuf::from(".")
                        } else {
                            parent.to_path_buf()
                        };
                    }
                    _ => return Err(e),
                }
            }
        }
    }
}

/// Write one image's codes, `(1, n_aug, L)` u16, atomically.
pub fn write_codes(path: &Path, codes: &[Vec<u32>]) -> Result<()> {
    let l = codes.first().context("no crops to write")?.len();
    let mut body = Vec::with_capacity(codes.len() * l * 2);
    for c in codes {
        for &t in c {
            let t = u16::try_from(t).with_context(|| format!("token {t} does not fit u16"))?;
            body.extend_from_slice(&t.to_le_bytes());
        }
    }
    crate::util::write_atomic(
        path,
        &super::npy::to_bytes("<u2", &[1, codes.len(), l], &body),
    )
}

/// Where a control condition comes from when tokenizing.
#[derive(Debug, Clone)]
pub enum ControlSource {
    /// Canny edges of each crop (low, high thresholds).
    Canny(f32, f32),
    /// A folder mirroring the image tree: `DIR/<class>/<stem>.{png,jpg,jpeg}`, the same size
    /// as its image, cropped as the image is; `channels` 1 (luma) or 3.
    Folder(std::path::PathBuf, usize),
}

impl ControlSource {
    /// `--control`: `canny` (thresholds `low`, `high`) or a folder of condition images of
    /// `channels` (1 or 3).
    pub fn parse(s: &str, channels: u8, low: f32, high: f32) -> Result<Self> {
        if s == "canny" {
            // Checked before any image is encoded, not at the first one.
            crate::control::check_canny(low, high)?;
            return Ok(Self::Canny(low, high));
        }
        let dir = PathBuf::from(s);
        ensure!(
            dir.is_dir(),
            "--control {}: neither `canny` nor a folder of condition images",
            dir.display()
        );
        ensure!(channels != 2, "--control-channels must be 1 or 3");
        Ok(Self::Folder(dir, channels as usize))
    }
}

/// One image of a [`plan`]: its crops encoded by `tk` into `dst`, and with `control` their
/// conditions beside (written first: existing codes mean a finished image).
pub fn tokenize_image(
    tk: &crate::tokenizer::ImageTokenizer,
    (root, src, dst): (&Path, &Path, &Path),
    control: Option<&ControlSource>,
    size: usize,
    ten_crop: bool,
    device: &candle_core::Device,
) -> Result<()> {
    let crops = augmentations(&load(src)?, size, ten_crop);
    if let Some(c) = control {
        let (shape, conds) = conditions(c, root, src, &crops, size, ten_crop)?;
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        write_conditions(&super::layouts::control_path(dst), shape, &conds)?;
    }
    write_codes(dst, &tk.encode(&crops, device)?)
}

/// Whether a planned image is done: its codes exist, and its conditions when `control`.
pub fn is_done(dst: &Path, control: bool) -> bool {
    dst.exists() && (!control || super::layouts::control_path(dst).exists())
}

/// The conditions of one image's crops, u8 `[C, size, size]` each, cropped as
/// [`augmentations`] crops the image (`image` is the image's path under `root`).
pub fn conditions(
    src: &ControlSource,
    root: &Path,
    image: &Path,
    crops: &[RgbImage],
    size: usize,
    ten_crop: bool,
) -> Result<super::layouts::Conditions> {
    match src {
        ControlSource::Canny(lo, hi) => {
            let e = crops
                .iter()
                .map(|c| Ok(crate::control::canny(c, *lo, *hi)?.into_raw()))
                .collect::<Result<Vec<_>>>()?;
            Ok(((1, size, size), e))
        }
        ControlSource::Folder(dir, channels) => {
            let rel = image.strip_prefix(root).unwrap_or(image);
            let stem = rel.with_extension("");
            let found = IMAGE_EXTENSIONS
                .iter()
                .map(|e| dir.join(stem.with_extension(e)))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "--control {}: no condition image for {} (expected {}.png/.jpg)",
                        dir.display(),
                        image.display(),
                        dir.join(&stem).display()
                    )
                })?;
            let cond = load_rgb(&found)?;
            let img_dims = image::image_dimensions(image)
                .with_context(|| format!("cannot read {}", image.display()))?;
            ensure!(
                cond.dimensions() == img_dims,
                "condition {} is {}x{}, its image {} {}x{}: they must be the same size",
                found.display(),
                cond.width(),
                cond.height(),
                image.display(),
                img_dims.0,
                img_dims.1
            );
            let cc = augmentations(&cond, size, ten_crop);
            let out = cc
                .iter()
                .map(|c| crate::control::condition_bytes(c, *channels))
                .collect::<Result<_>>()?;
            Ok(((*channels, size, size), out))
        }
    }
}

/// Write one image's conditions, `(n_aug, C, H, W)` u8, atomically.
pub fn write_conditions(
    path: &Path,
    shape: (usize, usize, usize),
    conds: &[Vec<u8>],
) -> Result<()> {
    let body: Vec<u8> = conds.concat();
    crate::util::write_atomic(
        path,
        &super::npy::to_bytes("|u1", &[conds.len(), shape.0, shape.1, shape.2], &body),
    )
}

/// Load an image for [`augmentations`].
pub fn load(path: &Path) -> Result<RgbImage> {
    load_rgb(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_crops_are_corners_centre_and_mirrors() {
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let a = augmentations(&img, 20, true);
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|c| c.dimensions() == (20, 20)));
        assert_eq!(a[5], imageops::flip_horizontal(&a[0]));
        assert_ne!(a[0], a[3]);
        let b = augmentations(&img, 8, false);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1], imageops::flip_horizontal(&b[0]));
    }
}

/// What `arpg tokenize` asks for: the image tree, the output, the tokenizer and the crops.
#[derive(Debug, Clone)]
pub struct TokenizeJob {
    pub image_root: PathBuf,
    pub out: PathBuf,
    pub tokenizer: crate::zoo::TokenizerSpec,
    pub placement: crate::zoo::Placement,
    /// Side of the square crops.
    pub image_size: usize,
    pub ten_crop: bool,
    pub control: Option<ControlSource>,
}

/// A [`TokenizeJob`] with its tokenizer loaded and its images listed.
pub struct Planned<'a> {
    job: &'a TokenizeJob,
    tk: crate::tokenizer::ImageTokenizer,
    device: candle_core::Device,
    /// Every image: (class id, image, codes).
    pub images: Vec<(usize, PathBuf, PathBuf)>,
    /// Those not encoded by an earlier run, in order.
    pub todo: Vec<usize>,
}

impl TokenizeJob {
    /// Loads the tokenizer, checks the crop size against its patch, lists the images and
    /// which are done.
    pub fn plan(&self) -> Result<Planned<'_>> {
        let (device, dtype) = self.placement.resolve()?;
        crate::tokenizer::check_image_size(self.image_size)?;
        let tk = self.tokenizer.load_standalone(dtype, &device)?;
        let p = tk.patch_size();
        if !self.image_size.is_multiple_of(p) {
            bail!(
                "--image-size {} is not a multiple of the {p}-pixel patch",
                self.image_size
            );
        }
        let images = plan(&self.image_root, &self.out)?;
        let todo = (0..images.len())
            .filter(|&i| !is_done(&images[i].2, self.control.is_some()))
            .collect();
        Ok(Planned {
            job: self,
            tk,
            device,
            images,
            todo,
        })
    }
}

impl Planned<'_> {
    /// Classes of the image tree.
    pub fn classes(&self) -> usize {
        self.images.last().map_or(0, |j| j.0 + 1)
    }

    /// Encodes the images still to do ([`tokenize_image`]), stopping between images on
    /// Ctrl-C; `on_image(done, total)` after each.
    pub fn run(&self, on_image: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let j = self.job;
        for (k, &i) in self.todo.iter().enumerate() {
            if crate::util::interrupted() {
                break;
            }
            let (_, src, dst) = &self.images[i];
            let paths = (j.image_root.as_path(), src.as_path(), dst.as_path());
            let control = j.control.as_ref();
            let (size, ten) = (j.image_size, j.ten_crop);
            tokenize_image(&self.tk, paths, control, size, ten, &self.device)?;
            on_image(k + 1, self.todo.len());
        }
        Ok(())
    }
}
