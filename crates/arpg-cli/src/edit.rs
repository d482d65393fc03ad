//! `arpg inpaint` and `arpg outpaint`: zero-shot editing.

use crate::args::{ControlArgs, DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use anyhow::{bail, Context, Result};
use arpg::editor::{fill_canvas_progress, inpaint, token_mask, Canvas};
use arpg::model::Arpg;
use arpg::sampler::{self, DecodeShape, Request, SampleConfig};
use arpg::tokenizer::{image as img, tokens_io, ImageTokenizer};
use candle_core::Device;
use clap::Args;
use image::RgbImage;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

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
        default_model(model);
        let spec = model.spec(self.decoding.seed);
        let sc = self.decoding.config(&spec)?;
        let shape = DecodeShape::of_config(&spec.config()?);
        sampler::validate_settings(shape, &sc)?;
        let all: Vec<usize> = (0..shape.cells).collect();
        Request {
            classes: &[self.class],
            known: &[vec![]],
            orders: &[all],
            condition: None,
        }
        .validate(shape, &sc)
        .with_context(|| format!("--class {}", self.class))?;
        Ok(sc)
    }
}

/// No model named: the official ARPG-L if its weights are cached, else the shipped digits.
fn default_model(model: &mut ModelArgs) {
    if model.model.is_none()
        && model.config.is_none()
        && model.weights.is_none()
        && model.init.is_none()
    {
        model.model = Some(if arpg::zoo::official_weights_cached() {
            "ARPG-L".into()
        } else {
            arpg::zoo::DIGITS.into()
        });
    }
}

/// The model, its tokenizer and the device, from the shared flags.
pub fn load(
    model: &mut ModelArgs,
    vq: &VqArgs,
    device: &DeviceArgs,
    seed: u64,
) -> Result<(Arpg, ImageTokenizer, Device)> {
    default_model(model);
    let spec = model.spec(seed);
    let (dev, dtype) = device.resolve_seeded(seed)?;
    let m = spec.load(dtype, &dev)?;
    let tk = vq.tokenizer(m.config().vocab_size, spec.random, seed, dtype, &dev)?;
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
    let masked = |x: usize, y: usize| {
        let p = mask.get_pixel(x as u32, y as u32).0;
        (p[0] as u32 + p[1] as u32 + p[2] as u32) >= 3 * 128
    };
    let regen = token_mask(size, size, tk.patch_size(), masked);
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
        for im in images.iter_mut() {
            for (x, y, p) in im.enumerate_pixels_mut() {
                if !masked(x as usize, y as usize) {
                    *p = *src.get_pixel(x, y);
                }
            }
        }
    }
    write_outputs(&a.out, "inpaint", &src, &images)?;
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
    for (flag, v) in [
        ("--left", a.left),
        ("--right", a.right),
        ("--top", a.top),
        ("--bottom", a.bottom),
    ] {
        if v % p != 0 {
            bail!("{flag} {v} is not a multiple of the {p}-pixel patch");
        }
    }
    if [a.left, a.right, a.top, a.bottom].iter().all(|&v| v == 0) {
        bail!("give at least one of --left, --right, --top, --bottom (pixels to add)");
    }
    let g = model.config().grid_size();
    let src = img::center_crop_resize(&src, g * p);
    let tokens = tk.encode(std::slice::from_ref(&src), &dev)?.remove(0);
    let base = Canvas::from_tokens(g, g, &tokens, &vec![false; g * g])?;
    let (rows, cols) = (
        g as u128 + (a.top / p) as u128 + (a.bottom / p) as u128,
        g as u128 + (a.left / p) as u128 + (a.right / p) as u128,
    );
    arpg::util::check_memory(
        a.sampling.samples as u128 * rows * cols * (8 + (p * p * 3) as u128),
        &format!(
            "{} outpainted image(s) of {}x{} tokens",
            a.sampling.samples, cols, rows
        ),
    )?;
    let canvas = base.pad(a.top / p, a.bottom / p, a.left / p, a.right / p);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.sampling.decoding.seed);
    let mut all = Vec::new();
    // A long strip takes minutes a sample: progress per window.
    let pb = indicatif::ProgressBar::new(a.sampling.samples as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} windows [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap(),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(250));
    let n = a.sampling.samples;
    for i in 0..n {
        let mut on_window = |done: usize, total: usize| {
            pb.set_length((n * total) as u64);
            pb.set_position((i * total + done) as u64);
            pb.set_message(format!("image {}/{n}", i + 1));
        };
        let filled = fill_canvas_progress(
            &model,
            &canvas,
            a.sampling.class,
            &sc,
            &mut rng,
            &mut on_window,
        )?;
        all.push(
            filled
                .tokens()
                .context("window filling left a cell unknown")?,
        );
    }
    pb.finish_and_clear();
    let images = tk.decode(&all, (canvas.rows, canvas.cols), &dev)?;
    write_outputs(&a.out, "outpaint", &src, &images)?;
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

fn write_outputs(dir: &Path, stem: &str, src: &RgbImage, images: &[RgbImage]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --out {}", dir.display()))?;
    for (i, im) in images.iter().enumerate() {
        img::save_png_atomic(im, &dir.join(format!("{stem}_{i}.png")))?;
    }
    img::save_png_atomic(src, &dir.join("input.png"))?;
    Ok(())
}
