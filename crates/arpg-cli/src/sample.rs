//! `arpg sample`: class-conditional sampling.

use crate::args::{ControlArgs, DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use anyhow::{bail, Context, Result};
use arpg::editor::sample_canvases;
use arpg::sampler::{self, DecodeShape, Orders, Request};
use arpg::tokenizer::{image as img, tokens_io};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Class ids, comma-separated (default: a few ImageNet demo classes, or every class of a
    /// model with fewer than 1000).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<usize>,
    /// Images per class.
    #[arg(long, default_value_t = 1)]
    pub per_class: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    /// JSON array of raster positions: the generation order for every image.
    #[arg(long)]
    pub order: Option<PathBuf>,
    /// An independent random order per image (the reference shares one order per batch).
    #[arg(long)]
    pub order_per_sample: bool,
    /// Images per forward batch (doubled internally when guidance is on).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Output folder: one PNG per image plus grid.png.
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Token grid WxH larger than the model's (resolution expansion): filled by sliding a
    /// model-sized window, each window conditioned on the tokens it overlaps.
    #[arg(long, value_parser = arpg::util::parse_wxh)]
    pub grid: Option<(usize, usize)>,
    /// Also write the tokens (JSON array of per-image arrays, raster order). With this flag
    /// and no --vq-weights, images are not decoded.
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
}

pub fn run(mut a: SampleArgs) -> Result<()> {
    if a.model.or_default() == Some(arpg::zoo::DIGITS) {
        eprintln!("no --model given and no official weights in the HF cache: using the built-in digits model");
    }
    let seed = a.sampling.seed;
    let spec = a.model.spec(seed);
    let mcfg = spec.config()?;
    let classes = match a.classes.is_empty() {
        true => arpg::zoo::demo_classes(mcfg.num_classes),
        false => a.classes.clone(),
    };
    if a.per_class == 0 || a.batch_size == 0 {
        bail!("--per-class and --batch-size must be at least 1");
    }
    let sc = a.sampling.config(&spec)?;
    let orders = match &a.order {
        Some(p) => Orders::Fixed(tokens_io::read_order(p)?),
        None if a.order_per_sample => Orders::PerImage,
        None => Orders::Shared,
    };
    if a.order.is_some() && a.order_per_sample {
        bail!("--order and --order-per-sample are exclusive");
    }
    // The library checks the flags (classes, settings, the order) before any weights load;
    // each batch's request is then built from them.
    let shape = DecodeShape::of_config(&mcfg);
    sampler::validate_settings(shape, &sc)?;
    let condition = a.control.load(&mcfg)?;
    if condition.is_some() && a.grid.is_some() {
        bail!("--condition covers the model's own grid: it does not combine with --grid");
    }
    let cond = || crate::args::as_condition(&condition);
    sampler::check_classes(shape, &sc, &classes, None, cond()).context("--classes")?;
    if let (Orders::Fixed(o), Some(p)) = (&orders, &a.order) {
        sampler::check_classes(shape, &sc, &classes[..1], Some(o), cond())
            .with_context(|| format!("--order {}", p.display()))?;
    }

    let (device, dtype) = a.device.resolve_seeded(seed)?;
    let model = spec.load(dtype, &device)?;
    let tk_spec = a.vq.spec(spec.random, seed)?;
    let want_images =
        a.tokens_out.is_none() || a.vq.vq_weights.is_some() || tk_spec.is_pixel(mcfg.vocab_size);
    let tokenizer = match want_images {
        true => Some(tk_spec.load(mcfg.vocab_size, dtype, &device)?),
        false => None,
    };
    let grid = mcfg.grid_size();
    let canvas = a.grid.map(|(w, h)| (h, w)).unwrap_or((grid, grid));
    if canvas.0 < grid || canvas.1 < grid {
        bail!(
            "--grid {}x{} is smaller than the model's {grid}x{grid} tokens",
            canvas.1,
            canvas.0
        );
    }
    if canvas != (grid, grid) && (a.order.is_some() || a.order_per_sample) {
        bail!("--order / --order-per-sample do not apply to --grid expansion (each window draws its own order)");
    }

    // Sizes from the flags, bounded before anything is allocated.
    let patch = tokenizer.as_ref().map_or(1, |t| t.patch_size()) as u128;
    let cells_out = canvas.0 as u128 * canvas.1 as u128;
    let n_images = classes.len() as u128 * a.per_class as u128;
    arpg::util::check_memory(
        n_images * cells_out * (4 + want_images as u128 * patch * patch * 3),
        &format!("{n_images} images of {}x{} tokens", canvas.1, canvas.0),
    )?;
    if let Some(p) = &a.tokens_out {
        arpg::util::check_writable(p, "--tokens-out")?;
    }
    let all: Vec<usize> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, a.per_class))
        .collect();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create --out {}", a.out.display()))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let positions: Vec<usize> = (0..mcfg.block_size).collect();
    let pb = ProgressBar::new(all.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap(),
    );
    let mut tokens: Vec<Vec<u32>> = Vec::new();
    let mut written = Vec::new();
    let mut done = 0;
    let mut images = Vec::new();
    let start = std::time::Instant::now();
    let mut graphs = a.sampling.graphs();
    for batch in all.chunks(a.batch_size) {
        if arpg::util::interrupted() {
            break;
        }
        // Drawn for --grid too, which ignores them: the seed's images stay what they were.
        let orders = orders.draw(batch.len(), &positions, &mut rng);
        // Tokens [batch, cells] on the device, decoded to images without a host round trip.
        let toks = if canvas == (grid, grid) {
            let known = vec![vec![]; batch.len()];
            let req = Request {
                classes: batch,
                known: &known,
                orders: &orders,
                condition: cond(),
            }
            .validate(DecodeShape::of(&model), &sc)?;
            sampler::generate(&model, &req, &mut rng, Some(&mut graphs))?
        } else {
            sample_canvases(&model, canvas, batch, &sc, &mut rng)?
        };
        if let Some(tk) = &tokenizer {
            for (im, &class) in tk.decode_tensor(&toks, canvas)?.into_iter().zip(batch) {
                let name = img::sample_png_name(written.len(), class);
                img::save_png_atomic(&im, &a.out.join(&name))?;
                written.push(name);
                images.push(im);
            }
        }
        if a.tokens_out.is_some() {
            tokens.extend(toks.to_vec2::<u32>()?);
        }
        done += batch.len();
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if !images.is_empty() {
        img::save_png_atomic(
            &img::sample_grid(&images, a.per_class),
            &a.out.join("grid.png"),
        )?;
        written.push("grid.png".into());
    }
    img::remove_stale_samples(&a.out, &written)?;
    if let Some(p) = &a.tokens_out {
        tokens_io::write(p, &tokens)?;
    }
    eprintln!(
        "{done} images in {secs:.1}s ({:.2} images/s){}{}",
        done as f64 / secs,
        if images.is_empty() {
            String::new()
        } else {
            format!(", PNGs in {}", a.out.display())
        },
        a.tokens_out
            .as_ref()
            .map(|p| format!(", tokens in {}", p.display()))
            .unwrap_or_default(),
    );
    Ok(())
}
