//! `arpg sample`: class-conditional sampling.

use crate::args::{ControlArgs, DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use anyhow::{bail, Context, Result};
use arpg::editor::{fill_canvas, Canvas};
use arpg::sampler::{self, random_order, DecodeShape, Request};
use arpg::tokenizer::{image as img, tokens_io};
use candle_core::Tensor;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use std::path::PathBuf;

/// ImageNet classes shown when none are asked for (LlamaGen's demo classes).
const DEMO_CLASSES: &[usize] = &[207, 360, 387, 974, 88, 979, 417, 279];

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
    #[arg(long, value_parser = parse_grid)]
    pub grid: Option<(usize, usize)>,
    /// Also write the tokens (JSON array of per-image arrays, raster order). With this flag
    /// and no --vq-weights, images are not decoded.
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
}

pub fn run(mut a: SampleArgs) -> Result<()> {
    let m = &a.model;
    if m.model.is_none() && m.config.is_none() && m.weights.is_none() && m.init.is_none() {
        // No model named: the official ARPG-L if its weights are cached, else the shipped
        // digits model, so that a fresh offline machine still samples something real.
        if arpg::zoo::official_weights_cached() {
            a.model.model = Some("ARPG-L".into());
        } else {
            eprintln!("no --model given and no official weights in the HF cache: using the built-in digits model");
            a.model.model = Some(arpg::zoo::DIGITS.into());
        }
    }
    let spec = a.model.spec(a.sampling.seed);
    let mcfg = spec.config()?;
    let classes: Vec<usize> = if !a.classes.is_empty() {
        a.classes.clone()
    } else if mcfg.num_classes == 1000 {
        DEMO_CLASSES.to_vec()
    } else {
        (0..mcfg.num_classes).collect()
    };
    if a.per_class == 0 || a.batch_size == 0 {
        bail!("--per-class and --batch-size must be at least 1");
    }
    let sc = a.sampling.config(&spec)?;
    let cells = mcfg.block_size;
    let fixed_order = match &a.order {
        Some(p) => Some(read_order(p)?),
        None => None,
    };
    if fixed_order.is_some() && a.order_per_sample {
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
    let probe = |classes: &[usize], order: &[usize]| {
        let orders = vec![order.to_vec(); classes.len()];
        let known = vec![vec![]; classes.len()];
        let req = Request {
            classes,
            known: &known,
            orders: &orders,
            condition: crate::args::as_condition(&condition),
        };
        req.validate(shape, &sc).map(|_| ())
    };
    let all_cells: Vec<usize> = (0..cells).collect();
    probe(&classes, &all_cells).context("--classes")?;
    if let (Some(o), Some(p)) = (&fixed_order, &a.order) {
        probe(&classes[..1], o).with_context(|| format!("--order {}", p.display()))?;
    }

    let (device, dtype) = a.device.resolve_seeded(a.sampling.seed)?;
    let model = spec.load(dtype, &device)?;
    let pixel = a.vq.tokenizer == "pixel" || (a.vq.tokenizer == "auto" && mcfg.vocab_size == 17);
    let want_images = a.tokens_out.is_none() || a.vq.vq_weights.is_some() || pixel;
    let tokenizer = match want_images {
        true => Some(a.vq.tokenizer(
            mcfg.vocab_size,
            spec.random,
            a.sampling.seed,
            dtype,
            &device,
        )?),
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
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.sampling.seed);
    let positions: Vec<usize> = (0..cells).collect();
    let pb = ProgressBar::new(all.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap(),
    );
    let mut tokens: Vec<Vec<u32>> = Vec::new();
    let mut done = 0;
    let mut images = Vec::new();
    let start = std::time::Instant::now();
    let mut graphs = a.sampling.graphs();
    for batch in all.chunks(a.batch_size) {
        if arpg::util::interrupted() {
            break;
        }
        let orders: Vec<Vec<usize>> = match &fixed_order {
            Some(o) => vec![o.clone(); batch.len()],
            None if a.order_per_sample => batch
                .iter()
                .map(|_| random_order(&positions, &mut rng))
                .collect(),
            None => vec![random_order(&positions, &mut rng); batch.len()],
        };
        // Tokens [batch, cells] on the device, decoded to images without a host round trip.
        let toks = if canvas == (grid, grid) {
            let known = vec![vec![]; batch.len()];
            let req = Request {
                classes: batch,
                known: &known,
                orders: &orders,
                condition: crate::args::as_condition(&condition),
            }
            .validate(DecodeShape::of(&model), &sc)?;
            sampler::generate(&model, &req, &mut rng, Some(&mut graphs))?
        } else {
            let empty = Canvas::unknown(canvas.0, canvas.1);
            let rows = batch
                .iter()
                .map(|&c| {
                    fill_canvas(&model, &empty, c, &sc, &mut rng)?
                        .tokens()
                        .context("unfilled cell")
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::from_vec(rows.concat(), (batch.len(), canvas.0 * canvas.1), &device)?
        };
        if let Some(tk) = &tokenizer {
            for (i, im) in tk.decode_tensor(&toks, canvas)?.into_iter().enumerate() {
                let path = a.out.join(format!("{:06}_class{}.png", done + i, batch[i]));
                img::save_png_atomic(&im, &path)?;
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
        let ncols = if a.per_class > 1 {
            a.per_class
        } else {
            (images.len() as f64).sqrt().ceil() as usize
        };
        let mut g = img::make_grid(&images, ncols, 2);
        // Tiny images (the digits model's 8x8) are enlarged in the grid so they can be seen.
        let side = images[0].width().max(1);
        if side < 64 {
            let k = 64 / side;
            g = image::imageops::resize(
                &g,
                g.width() * k,
                g.height() * k,
                image::imageops::FilterType::Nearest,
            );
        }
        img::save_png_atomic(&g, &a.out.join("grid.png"))?;
    }
    let written: Vec<String> = match images.is_empty() {
        true => vec![],
        false => (all.iter().enumerate().take(done))
            .map(|(i, c)| format!("{i:06}_class{c}.png"))
            .chain(["grid.png".to_string()])
            .collect(),
    };
    remove_stale_outputs(&a.out, &written)?;
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

/// A rerun into the same folder must not leave the earlier run's images beside the new ones:
/// remove this command's own outputs (`NNNNNN_classC.png`, `grid.png`) that this run did not
/// write. Other files are left alone.
fn remove_stale_outputs(dir: &std::path::Path, written: &[String]) -> Result<()> {
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

fn parse_grid(s: &str) -> std::result::Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected WxH, e.g. 32x16"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: expected WxH, e.g. 32x16"))
    };
    Ok((p(w)?, p(h)?))
}

/// The order file's positions; the sampler checks that they are a permutation of the grid.
fn read_order(path: &std::path::Path) -> Result<Vec<usize>> {
    let text = arpg::util::read_small(path, 64 << 20, "--order")?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--order {}: expected a JSON array of raster positions",
            path.display()
        )
    })
}
