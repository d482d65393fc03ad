//! Conditions for controllable generation: condition images from files (any single-channel
//! or RGB image: a depth map, a segmentation, a sketch), Canny edges of photos, and the
//! digits' sketch condition. The encoder that reads them is `model::control`.

use crate::tokenizer::image::{center_crop_resize, load_rgb, RgbImage};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::GrayImage;
use std::path::{Path, PathBuf};

/// ControlNet's usual Canny thresholds (its annotator's defaults).
pub const CANNY_LOW: f32 = 100.0;
pub const CANNY_HIGH: f32 = 200.0;

/// Canny's hysteresis thresholds: finite, 0 <= low <= high.
pub fn check_canny(low: f32, high: f32) -> Result<()> {
    if !(low.is_finite() && high.is_finite() && low >= 0.0 && low <= high) {
        bail!("--canny-low {low} / --canny-high {high}: need 0 <= low <= high");
    }
    Ok(())
}

/// Canny edges of a photo (white = edge), on its luma, with a 1.4-sigma Gaussian first.
pub fn canny(img: &RgbImage, low: f32, high: f32) -> Result<GrayImage> {
    check_canny(low, high)?;
    let gray = image::DynamicImage::ImageRgb8(img.clone()).to_luma8();
    Ok(imageproc::edges::canny(&gray, low, high))
}

/// A condition image `[1, C, side, side]` in [0, 1] from an image in memory: resized as ADM
/// resizes (box halvings, bicubic, centre crop) when it is not `side` square, then reduced to
/// luma for one channel. Returns the tensor and the image actually used, and whether it was
/// resized.
pub fn condition_from_image(
    img: &RgbImage,
    channels: usize,
    side: usize,
) -> Result<(Tensor, RgbImage, bool)> {
    let resized = img.width() as usize != side || img.height() as usize != side;
    let img = if resized {
        center_crop_resize(img, side)
    } else {
        img.clone()
    };
    let bytes = condition_bytes(&img, channels)?;
    let used = match channels {
        1 => image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(img.width(), img.height(), bytes.clone())
                .expect("one byte per pixel"),
        )
        .to_rgb8(),
        _ => img,
    };
    let data: Vec<f32> = bytes.iter().map(|&v| v as f32 / 255.0).collect();
    let t = Tensor::from_vec(data, (1, channels, side, side), &Device::Cpu)?;
    Ok((t, used, resized))
}

/// An image as condition bytes `[C, H, W]`: its luma for one channel, its planes for three.
pub fn condition_bytes(img: &RgbImage, channels: usize) -> Result<Vec<u8>> {
    match channels {
        1 => Ok(image::DynamicImage::ImageRgb8(img.clone())
            .to_luma8()
            .into_raw()),
        3 => {
            let n = img.pixels().len();
            let mut planes = vec![0u8; 3 * n];
            for (i, px) in img.pixels().enumerate() {
                for c in 0..3 {
                    planes[c * n + i] = px[c];
                }
            }
            Ok(planes)
        }
        c => bail!("conditions have 1 or 3 channels, not {c}"),
    }
}

/// [`condition_of`] the image in a file at the condition shape of the control model `mc`
/// (errors name the file as `--condition`).
pub fn load_condition(
    path: &Path,
    mc: &crate::ArpgConfig,
    canny_thresholds: Option<(f32, f32)>,
) -> Result<(Tensor, RgbImage, bool)> {
    let Some((channels, side, _)) = mc.control_shape() else {
        bail!(
            "--condition {}: this model has no control encoder (a class-only model takes \
             no condition)",
            path.display()
        );
    };
    let img =
        load_rgb(path).map_err(|e| anyhow::anyhow!("--condition {}: {e:#}", path.display()))?;
    condition_of(&img, channels, side, canny_thresholds)
}

/// [`condition_from_image`]; with `canny = Some((low, high))` the image is a photo whose
/// edges are the condition (extracted after the resize, at the model's resolution).
pub fn condition_of(
    img: &RgbImage,
    channels: usize,
    side: usize,
    canny_thresholds: Option<(f32, f32)>,
) -> Result<(Tensor, RgbImage, bool)> {
    let Some((lo, hi)) = canny_thresholds else {
        return condition_from_image(img, channels, side);
    };
    let resized = img.width() as usize != side || img.height() as usize != side;
    let img = match resized {
        true => center_crop_resize(img, side),
        false => img.clone(),
    };
    let edges = image::DynamicImage::ImageLuma8(canny(&img, lo, hi)?).to_rgb8();
    let (t, used, _) = condition_from_image(&edges, channels, side)?;
    Ok((t, used, resized))
}

/// A condition image for a control model, as `--condition` and its flags give it.
#[derive(Debug, Clone, Default)]
pub struct ConditionFile {
    pub path: PathBuf,
    /// The image is a photo whose Canny edges (low, high thresholds) are the condition.
    pub canny: Option<(f32, f32)>,
    /// Write the condition actually used (resized, edges extracted) here as a PNG.
    pub out: Option<PathBuf>,
    /// Whether guidance acts on the condition (`--control-guidance joint`); by default it
    /// does when the model learned to go without one (trained with condition dropout).
    pub joint_guidance: Option<bool>,
}

/// A loaded condition `[1, C, H, W]` and whether guidance acts on it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub images: Tensor,
    pub guide: bool,
}

impl Loaded {
    /// The sampler's view of it.
    pub fn condition(&self) -> crate::sampler::Condition<'_> {
        crate::sampler::Condition {
            images: &self.images,
            guide: self.guide,
        }
    }
}

impl ConditionFile {
    /// The condition for the model of `mc` ([`load_condition`]), saved to `out` if asked;
    /// says when the image was resized. Errors name the flags.
    pub fn load(&self, mc: &crate::ArpgConfig) -> Result<Loaded> {
        let (images, used, resized) = load_condition(&self.path, mc, self.canny)?;
        if resized {
            let side = used.width();
            eprintln!(
                "--condition {}: resized to the model's {side}x{side} as ADM resizes (box \
                 halvings, bicubic, centre crop)",
                self.path.display()
            );
        }
        if let Some(out) = &self.out {
            crate::tokenizer::image::save_png_atomic(&used, out)
                .with_context(|| format!("--condition-out {}", out.display()))?;
        }
        let guide = self
            .joint_guidance
            .unwrap_or_else(|| mc.control.as_ref().is_some_and(|c| c.dropout > 0.0));
        Ok(Loaded { images, guide })
    }
}

/// The `digits-sketch` condition: a digit's binary stroke mask, pixel value >= 8 of 0..16,
/// 255 = stroke.
pub fn digit_sketch(pixels: &[u8; 64]) -> [u8; 64] {
    pixels.map(|v| if v >= 8 { 255 } else { 0 })
}

/// Intersection over union of two binary masks (255 / 0); 1 when both are empty.
pub fn mask_iou(a: &[u8], b: &[u8]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x > 127, y > 127);
        inter += (x && y) as usize;
        union += (x || y) as usize;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Conditions `[n, 1, 8, 8]` in [0, 1] of digit sketches.
pub fn sketch_tensor(sketches: &[[u8; 64]]) -> Result<Tensor> {
    let data: Vec<f32> = sketches
        .iter()
        .flat_map(|s| s.iter().map(|&v| v as f32 / 255.0))
        .collect();
    Ok(Tensor::from_vec(
        data,
        (sketches.len(), 1, 8, 8),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sketch_marks_the_strokes_and_iou_compares_them() {
        let mut px = [0u8; 64];
        px[3] = 8;
        px[4] = 7;
        px[5] = 16;
        let s = digit_sketch(&px);
        assert_eq!((s[3], s[4], s[5], s[0]), (255, 0, 255, 0));
        let mut t = s;
        t[5] = 0;
        t[6] = 255;
        assert!((mask_iou(&s, &t) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(mask_iou(&s, &s), 1.0);
        assert_eq!(mask_iou(&[0; 64], &[0; 64]), 1.0);
    }

    #[test]
    fn a_condition_file_is_fitted_to_the_model_and_guided_when_it_learned_without() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        RgbImage::from_pixel(16, 16, image::Rgb([255; 3]))
            .save(&path)
            .unwrap();
        let mut mc = crate::zoo::digits_sketch_config();
        let f = ConditionFile {
            path: path.clone(),
            out: Some(dir.path().join("used.png")),
            ..Default::default()
        };
        let c = f.load(&mc).unwrap();
        assert_eq!(c.images.dims(), &[1, 1, 8, 8]);
        assert!(
            c.guide,
            "trained with condition dropout: guidance acts on it"
        );
        assert_eq!(image::open(dir.path().join("used.png")).unwrap().width(), 8);
        let class_only = ConditionFile {
            joint_guidance: Some(false),
            ..f.clone()
        };
        assert!(!class_only.load(&mc).unwrap().guide);
        mc.control.as_mut().unwrap().dropout = 0.0;
        assert!(!f.load(&mc).unwrap().guide);
        let e = f
            .load(&crate::zoo::digits_config())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no control encoder"), "{e}");
    }

    #[test]
    fn canny_finds_the_edge_of_a_square_and_not_its_inside() {
        let img = RgbImage::from_fn(64, 64, |x, y| {
            let inside = (16..48).contains(&x) && (16..48).contains(&y);
            image::Rgb(if inside { [255; 3] } else { [0; 3] })
        });
        let e = canny(&img, CANNY_LOW, CANNY_HIGH).unwrap();
        let on = |x: u32, y: u32| e.get_pixel(x, y)[0] > 0;
        // Somewhere within a pixel of each side of the square, never in its middle or far out.
        assert!((14..19).any(|x| on(x, 32)) && (45..50).any(|x| on(x, 32)));
        assert!(!on(32, 32) && !on(2, 2));
        assert!(canny(&img, 200.0, 100.0).is_err());
    }

    #[test]
    fn conditions_are_resized_as_adm_does_and_reduced_to_luma() {
        let img = RgbImage::from_fn(20, 10, |x, _| image::Rgb([(x * 12) as u8, 0, 0]));
        let (t, used, resized) = condition_from_image(&img, 1, 8).unwrap();
        assert!(resized);
        assert_eq!(t.dims(), &[1, 1, 8, 8]);
        assert_eq!(used.dimensions(), (8, 8));
        let (t3, _, _) = condition_from_image(&used, 3, 8).unwrap();
        assert_eq!(t3.dims(), &[1, 3, 8, 8]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    }
}
