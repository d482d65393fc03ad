//! Pre-tokenizing an image folder with the VQ encoder, as LlamaGen's code extraction does:
//! `ROOT/<class>/<image>` -> `OUT/<class id>/<image stem>.npy` of shape `(1, n_aug, L)` (u16),
//! the paper's layout, which `arpg pack --paper` reads. Class ids follow the sorted folder
//! names (as torchvision's ImageFolder). Finished files are kept, so a rerun resumes.

use crate::tokenizer::image::{center_crop_resize, load_rgb};
use anyhow::{bail, Context, Result};
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

/// Images to encode: (class id, image path, output path), in a stable order.
pub fn plan(root: &Path, out: &Path) -> Result<Vec<(usize, PathBuf, PathBuf)>> {
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
    for (id, dir) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| ["png", "jpg", "jpeg", "JPEG", "JPG", "PNG"].contains(&e))
            })
            .collect();
        files.sort();
        for f in files {
            let stem = f.file_stem().unwrap().to_string_lossy().to_string();
            jobs.push((id, f, out.join(id.to_string()).join(format!("{stem}.npy"))));
        }
    }
    Ok(jobs)
}

/// Write one image's codes, `(1, n_aug, L)` u16, atomically.
pub fn write_codes(path: &Path, codes: &[Vec<u32>]) -> Result<()> {
    let l = codes[0].len();
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
