//! `arpg inpaint` and `arpg outpaint`: zero-shot editing.

use crate::args::{ControlArgs, DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use anyhow::{bail, Context, Result};
use arpg::editor::{
    fill_canvases, inpaint, is_masked, keep_unmasked, margins_in_tokens, token_mask, Canvas,
};
use arpg::model::Arpg;
use arpg::sampler::{self, DecodeShape, SampleConfig};
use arpg::tokenizer::{image as img, tokens_io, ImageTokenizer};
use candle_core::Device;
use clap::Args;
use rand::SeedableRng;
use std::path::PathBuf;

/// The editing commands' flags: the class, the decoding flags, and how many versions.
#[derive(Args, Debug, Clone)]
pub struct EditSampling {
    /// Class to condition on (another class than the image's = class-conditional editing).
    #[arg(long)]
    pub class: usize,
    #[command(flatten)]
    pub decoding: SamplingArgs,
    /// How many edited versions to make.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
}

impl EditSampling {
    /// The decoding settings for `model` (a default model filled in). The sampler checks them
    /// and the class before any weights load.
    fn config(&self, model: &mut ModelArgs) -> Result<SampleConfig> {
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        model.or_default();
        let spec = model.spec(self.decoding.seed);
        let sc = self.decoding.config(&spec)?;
        let shape = DecodeShape::of_config(&spec.config()?);
        sampler::validate_settings(shape, &sc)?;
        sampler::check_classes(shape, &sc, &[self.class], None, None)
            .with_context(|| format!("--class {}", self.class))?;
        Ok(sc)
    }
}

/// The model, its tokenizer and the device, from the shared flags.
pub fn load(
    model: &mut ModelArgs,
    vq: &VqArgs,
    device: &DeviceArgs,
    seed: u64,
) -> Result<(Arpg, ImageTokenizer, Device)> {
    model.or_default();
    let spec = model.spec(seed);
    let (dev, dtype) = device.resolve_seeded(seed)?;
    let m = spec.load(dtype, &dev)?;
    let tk = vq
        .spec(spec.random, seed)?
        .load(m.config().vocab_size, dtype, &dev)?;
    Ok((m, tk, dev))
}

#[derive(Args, Debug)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: EditSampling,
    #[command(flatten)]
    pub control: ControlArgs,
    /// The image to edit. It is center-cropped and resized to the model's size as ADM does.
    #[arg(long)]
    pub image: PathBuf,
    /// A mask image of the same size: white (>= 128) marks what to regenerate. A token is
    /// regenerated if ANY pixel of its patch (16x16 for VQ-16, 1x1 for digits) is masked.
    #[arg(long)]
    pub mask: PathBuf,
    /// Paste the original pixels back outside the mask.
    #[arg(long)]
    pub keep_pixels: bool,
    /// Output folder: inpaint_N.png and grid.png (input first).
    #[arg(long, default_value = "inpainted")]
    pub out: PathBuf,
    /// Also write the edited token grids (JSON).
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
}

pub fn run_inpaint(mut a: InpaintArgs) -> Result<()> {
    let sc = a.sampling.config(&mut a.model)?;
    let condition = a
        .control
        .load(&a.model.spec(a.sampling.decoding.seed).config()?)?;
    if let Some(p) = &a.tokens_out {
        arpg::util::check_writable(p, "--tokens-out")?;
    }
    let src = img::load_rgb(&a.image)?;
    let mask = img::load_rgb(&a.mask)?;
    if src.dimensions() != mask.dimensions() {
        bail!(
            "--mask {} is {}x{} but --image {} is {}x{}: they must be the same size",
            a.mask.display(),
            mask.width(),
            mask.height(),
            a.image.display(),
            src.width(),
            src.height()
        );
    }
    let (model, tk, dev) = load(&mut a.model, &a.vq, &a.device, a.sampling.decoding.seed)?;
    let g = model.config().grid_size();
    let size = g * tk.patch_size();
    arpg::util::check_memory(
        a.sampling.samples as u128 * (g * g) as u128 * (8 + (tk.patch_size().pow(2) * 3) as u128),
        &format!("--samples {}", a.sampling.samples),
    )?;
    let src = img::center_crop_resize(&src, size);
    let mask = img::center_crop_resize(&mask, size);
    let regen = token_mask(size, size, tk.patch_size(), |x, y| is_masked(&mask, x, y));
    if !regen.contains(&true) {
        bail!(
            "--mask {} marks nothing to regenerate (white = regenerate)",
            a.mask.display()
        );
    }
    if !regen.contains(&false) {
        bail!("--mask {} covers the whole image: that is plain sampling, use `arpg sample --classes {}`", a.mask.display(), a.sampling.class);
    }
    let tokens = tk.encode(std::slice::from_ref(&src), &dev)?.remove(0);
    let canvas = Canvas::from_tokens(g, g, &tokens, &regen)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.sampling.decoding.seed);
    let out = inpaint(
        &model,
        &canvas,
        a.sampling.class,
        a.sampling.samples,
        &sc,
        crate::args::as_condition(&condition),
        &mut rng,
    )?;
    let mut images = tk.decode(&out, (g, g), &dev)?;
    if a.keep_pixels {
        keep_unmasked(&mut images, &src, &mask);
    }
    img::save_edits(&a.out, "inpaint", &src, &images)?;
    if let Some(p) = &a.tokens_out {
        tokens_io::write(p, &out)?;
    }
    eprintln!("{} inpainted images in {}", images.len(), a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct OutpaintArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: EditSampling,
    /// The image to extend; center-cropped and resized to the model's size first.
    #[arg(long)]
    pub image: PathBuf,
    /// Pixels to add on each side (multiples of the patch size: 16 for VQ-16, 1 for digits).
    /// 768 on the right turns a 256x256 image into 1024x256, as in the paper.
    #[arg(long, default_value_t = 0)]
    pub left: usize,
    #[arg(long, default_value_t = 0)]
    pub right: usize,
    #[arg(long, default_value_t = 0)]
    pub top: usize,
    #[arg(long, default_value_t = 0)]
    pub bottom: usize,
    #[arg(long, default_value = "outpainted")]
    pub out: PathBuf,
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
}

pub fn run_outpaint(mut a: OutpaintArgs) -> Result<()> {
    let sc = a.sampling.config(&mut a.model)?;
    if let Some(p) = &a.tokens_out {
        arpg::util::check_writable(p, "--tokens-out")?;
    }
    let src = img::load_rgb(&a.image)?;
    let (model, tk, dev) = load(&mut a.model, &a.vq, &a.device, a.sampling.decoding.seed)?;
    let p = tk.patch_size();
    let [left, right, top, bottom] = margins_in_tokens([a.left, a.right, a.top, a.bottom], p)?;
    let g = model.config().grid_size();
    let src = img::center_crop_resize(&src, g * p);
    let tokens = tk.encode(std::slice::from_ref(&src), &dev)?.remove(0);
    let base = Canvas::from_tokens(g, g, &tokens, &vec![false; g * g])?;
    let n = a.sampling.samples;
    // Bounded before the canvas is allocated (u128: the margins are the user's).
    let side = |a: usize, b: usize| g as u128 + a as u128 + b as u128;
    let (rows, cols) = (side(top, bottom), side(left, right));
    arpg::util::check_memory(
        n as u128 * rows * cols * (8 + (p * p * 3) as u128),
        &format!("{n} outpainted image(s) of {cols}x{rows} tokens"),
    )?;
    let canvas = base.pad(top, bottom, left, right);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.sampling.decoding.seed);
    // A long strip takes minutes a sample: progress per window.
    let pb = indicatif::ProgressBar::new(n as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} windows [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap(),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(250));
    let all = fill_canvases(
        &model,
        &canvas,
        a.sampling.class,
        n,
        &sc,
        &mut rng,
        &mut |i, done, total| {
            pb.set_length((n * total) as u64);
            pb.set_position((i * total + done) as u64);
            pb.set_message(format!("image {}/{n}", i + 1));
        },
    )?;
    pb.finish_and_clear();
    let images = tk.decode(&all, (canvas.rows, canvas.cols), &dev)?;
    img::save_edits(&a.out, "outpaint", &src, &images)?;
    if let Some(p) = &a.tokens_out {
        tokens_io::write(p, &all)?;
    }
    eprintln!(
        "{} outpainted images of {}x{} pixels in {}",
        images.len(),
        canvas.cols * p,
        canvas.rows * p,
        a.out.display()
    );
    Ok(())
}
