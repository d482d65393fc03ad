//! The editing runs (`arpg inpaint`, `arpg outpaint`): an image from a file, fitted to the
//! model as ADM fits images (centre crop, resize), its tokens partly regenerated or extended,
//! the edited versions saved beside the input. The settings, the class and the input files
//! are checked before any weights load.

use super::Canvas;
use super::{fill_canvases, inpaint, is_masked, keep_unmasked, margins_in_tokens, token_mask};
use crate::control::ConditionFile;
use crate::sampler::{check_classes, validate_settings, DecodeShape, SampleConfig};
use crate::tokenizer::{image as img, tokens_io};
use crate::zoo::{Loaded, ModelSpec, Placement, TokenizerSpec};
use crate::ArpgConfig;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;

/// What both edits share: the model, the image, the class and how many versions, where to.
#[derive(Debug, Clone)]
pub struct EditJob {
    pub model: ModelSpec,
    pub tokenizer: TokenizerSpec,
    pub placement: Placement,
    pub sampling: SampleConfig,
    pub seed: u64,
    /// The class to condition on (another than the image's: class-conditional editing).
    pub class: usize,
    /// Edited versions to make.
    pub samples: usize,
    /// The image to edit.
    pub image: PathBuf,
    /// `<stem>_N.png` per version and `grid.png` (the input first).
    pub out: PathBuf,
    /// Also write the edited token grids (JSON).
    pub tokens_out: Option<PathBuf>,
}

/// Inpainting: what to regenerate.
#[derive(Debug, Clone)]
pub struct Inpaint {
    /// A mask image the size of the image: white (>= 128) marks what to regenerate, a token
    /// when any pixel of its patch is.
    pub mask: PathBuf,
    /// Paste the original pixels back outside the mask.
    pub keep_pixels: bool,
    pub condition: Option<ConditionFile>,
}

/// Outpainting: pixels to add on each side, `[left, right, top, bottom]`.
#[derive(Debug, Clone, Copy)]
pub struct Outpaint {
    pub margins: [usize; 4],
}

/// Edited images made, and their size in pixels.
#[derive(Debug, Clone, Copy)]
pub struct Edited {
    pub images: usize,
    pub width: usize,
    pub height: usize,
}

impl EditJob {
    /// The settings, the class and the outputs, checked against the model's config.
    fn check(&self) -> Result<ArpgConfig> {
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        let mc = self.model.config()?;
        let shape = DecodeShape::of_config(&mc);
        validate_settings(shape, &self.sampling)?;
        check_classes(shape, &self.sampling, &[self.class], None, None)
            .with_context(|| format!("--class {}", self.class))?;
        Ok(mc)
    }

    fn rng(&self) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(self.seed)
    }

    fn check_tokens_out(&self) -> Result<()> {
        match &self.tokens_out {
            Some(p) => crate::util::check_writable(p, "--tokens-out"),
            None => Ok(()),
        }
    }

    /// The edited versions saved (and their tokens written, when asked).
    fn save(
        &self,
        stem: &str,
        src: &img::RgbImage,
        images: &[img::RgbImage],
        tokens: &[Vec<u32>],
    ) -> Result<()> {
        img::save_edits(&self.out, stem, src, images)?;
        if let Some(p) = &self.tokens_out {
            tokens_io::write(p, tokens)?;
        }
        Ok(())
    }

    /// Regenerate the masked tokens of the image `samples` times.
    pub fn inpaint(&self, how: &Inpaint) -> Result<Edited> {
        let mc = self.check()?;
        let condition = how.condition.as_ref().map(|c| c.load(&mc)).transpose()?;
        self.check_tokens_out()?;
        let src = img::load_rgb(&self.image)?;
        let mask = img::load_rgb(&how.mask)?;
        if src.dimensions() != mask.dimensions() {
            bail!(
                "--mask {} is {}x{} but --image {} is {}x{}: they must be the same size",
                how.mask.display(),
                mask.width(),
                mask.height(),
                self.image.display(),
                src.width(),
                src.height()
            );
        }
        let Loaded {
            model,
            tokenizer: tk,
            device,
        } = Loaded::load(&self.model, &self.tokenizer, &self.placement)?;
        let (g, p) = (mc.grid_size(), tk.patch_size());
        let size = g * p;
        crate::util::check_memory(
            self.samples as u128 * (g * g) as u128 * (8 + (p * p * 3) as u128),
            &format!("--samples {}", self.samples),
        )?;
        let src = img::center_crop_resize(&src, size);
        let mask = img::center_crop_resize(&mask, size);
        let regen = token_mask(size, size, p, |x, y| is_masked(&mask, x, y));
        if !regen.contains(&true) {
            bail!(
                "--mask {} marks nothing to regenerate (white = regenerate)",
                how.mask.display()
            );
        }
        if !regen.contains(&false) {
            bail!("--mask {} covers the whole image: that is plain sampling, use `arpg sample --classes {}`", how.mask.display(), self.class);
        }
        let tokens = tk.encode(std::slice::from_ref(&src), &device)?.remove(0);
        let canvas = Canvas::from_tokens(g, g, &tokens, &regen)?;
        let cond = condition.as_ref().map(|c| c.condition());
        let (class, n, sc) = (self.class, self.samples, &self.sampling);
        let out = inpaint(&model, &canvas, class, n, sc, cond, &mut self.rng())?;
        let mut images = tk.decode(&out, (g, g), &device)?;
        if how.keep_pixels {
            keep_unmasked(&mut images, &src, &mask);
        }
        self.save("inpaint", &src, &images, &out)?;
        Ok(Edited {
            images: images.len(),
            width: size,
            height: size,
        })
    }

    /// Extend the image beyond its borders `samples` times; `on_window(image, done, total)`
    /// before each window of the sliding fill.
    pub fn outpaint(
        &self,
        how: Outpaint,
        on_window: &mut dyn FnMut(usize, usize, usize),
    ) -> Result<Edited> {
        let mc = self.check()?;
        self.check_tokens_out()?;
        let src = img::load_rgb(&self.image)?;
        let Loaded {
            model,
            tokenizer: tk,
            device,
        } = Loaded::load(&self.model, &self.tokenizer, &self.placement)?;
        let p = tk.patch_size();
        let [left, right, top, bottom] = margins_in_tokens(how.margins, p)?;
        let g = mc.grid_size();
        let src = img::center_crop_resize(&src, g * p);
        let tokens = tk.encode(std::slice::from_ref(&src), &device)?.remove(0);
        let base = Canvas::from_tokens(g, g, &tokens, &vec![false; g * g])?;
        let n = self.samples;
        // Bounded before the canvas is allocated (u128: the margins are the user's).
        let side = |a: usize, b: usize| g as u128 + a as u128 + b as u128;
        let (rows, cols) = (side(top, bottom), side(left, right));
        crate::util::check_memory(
            n as u128 * rows * cols * (8 + (p * p * 3) as u128),
            &format!("{n} outpainted image(s) of {cols}x{rows} tokens"),
        )?;
        let canvas = base.pad(top, bottom, left, right);
        let (class, sc) = (self.class, &self.sampling);
        let all = fill_canvases(&model, &canvas, class, n, sc, &mut self.rng(), on_window)?;
        let images = tk.decode(&all, (canvas.rows, canvas.cols), &device)?;
        self.save("outpaint", &src, &images, &all)?;
        Ok(Edited {
            images: images.len(),
            width: canvas.cols * p,
            height: canvas.rows * p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &std::path::Path) -> EditJob {
        let (model, tokenizer, placement) = crate::zoo::digits_on_cpu();
        EditJob {
            model,
            tokenizer,
            placement,
            sampling: SampleConfig {
                steps: 4,
                ..Default::default()
            },
            seed: 0,
            class: 3,
            samples: 2,
            image: dir.join("in.png"),
            out: dir.join("out"),
            tokens_out: Some(dir.join("t.json")),
        }
    }

    #[test]
    fn inpainting_checks_its_inputs_then_regenerates_the_masked_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let j = job(d);
        img::RgbImage::from_pixel(8, 8, image::Rgb([40, 40, 40]))
            .save(d.join("in.png"))
            .unwrap();
        // White marks the lower half.
        let mask =
            img::RgbImage::from_fn(8, 8, |_, y| image::Rgb([if y >= 4 { 255 } else { 0 }; 3]));
        mask.save(d.join("mask.png")).unwrap();
        let how = |m: &str| Inpaint {
            mask: d.join(m),
            keep_pixels: false,
            condition: None,
        };
        let e = EditJob {
            samples: 0,
            ..j.clone()
        }
        .inpaint(&how("mask.png"))
        .unwrap_err();
        assert!(e.to_string().contains("--samples"), "{e}");
        img::RgbImage::new(8, 8).save(d.join("none.png")).unwrap();
        let e = j.inpaint(&how("none.png")).unwrap_err();
        assert!(e.to_string().contains("marks nothing"), "{e}");
        let done = j.inpaint(&how("mask.png")).unwrap();
        assert_eq!((done.images, done.width, done.height), (2, 8, 8));
        let (grids, _) = tokens_io::read(&d.join("t.json")).unwrap();
        assert_eq!(grids.len(), 2);
        // The unmasked upper half keeps the image's tokens.
        let known = crate::tokenizer::pixel::token_of(40);
        assert!(grids.iter().all(|g| g[..32].iter().all(|&t| t == known)));
    }
}
