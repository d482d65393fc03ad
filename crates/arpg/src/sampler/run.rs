//! A sampling run into a folder (what `arpg sample` runs): `per_class` images of each class
//! in batches, each batch's tokens decoded to PNGs as it is made, then a grid of them (and
//! the tokens as JSON when asked). Everything the job asks for is checked before any weights
//! load; the command line only adds its progress bar and summary.

use super::{check_classes, generate, validate_settings, DecodeShape, Orders, Request};
use super::{DecodeGraphs, SampleConfig};
use crate::control::{ConditionFile, Loaded};
use crate::editor::sample_canvases;
use crate::tokenizer::{image as img, tokens_io};
use crate::zoo::{demo_classes, ModelSpec, Placement, TokenizerSpec};
use crate::ArpgConfig;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;

/// What to sample, with what, and where to.
#[derive(Debug, Clone)]
pub struct SampleJob {
    pub model: ModelSpec,
    pub tokenizer: TokenizerSpec,
    pub placement: Placement,
    pub sampling: SampleConfig,
    /// The images' seed (the same seed gives the same images on the same device).
    pub seed: u64,
    /// Class ids; empty: [`demo_classes`] of the model.
    pub classes: Vec<usize>,
    pub per_class: usize,
    pub batch_size: usize,
    /// A JSON file of raster positions: the generation order of every image.
    pub order: Option<PathBuf>,
    /// An independent random order per image (the reference shares one per batch).
    pub order_per_sample: bool,
    /// A token canvas W x H larger than the model's grid, filled by sliding windows.
    pub grid: Option<(usize, usize)>,
    pub condition: Option<ConditionFile>,
    /// One PNG per image and `grid.png`; PNGs of an earlier run not made again are removed.
    pub out: PathBuf,
    /// Also write the tokens here (JSON). Then images are made only when the tokenizer is
    /// named (VQ weights given) or is the pixel tokenizer.
    pub tokens_out: Option<PathBuf>,
    /// Capture the first batch of each shape as a CUDA graph and replay it.
    pub cuda_graph: bool,
}

/// What a [`SampleJob`] made: fewer images than asked when Ctrl-C stopped it.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub images: usize,
    pub secs: f64,
    /// Whether images were decoded and written (not only tokens).
    pub pngs: bool,
}

/// The job's inputs, checked against the model's config.
struct Checked {
    mc: ArpgConfig,
    classes: Vec<usize>,
    orders: Orders,
    condition: Option<Loaded>,
    /// Token rows and columns of the canvas.
    canvas: (usize, usize),
}

impl SampleJob {
    /// Checks the classes, settings, order, condition and canvas against the model's config.
    fn check(&self) -> Result<Checked> {
        let mc = self.model.config()?;
        let classes = match self.classes.is_empty() {
            true => demo_classes(mc.num_classes),
            false => self.classes.clone(),
        };
        if self.per_class == 0 || self.batch_size == 0 {
            bail!("--per-class and --batch-size must be at least 1");
        }
        let orders = match &self.order {
            Some(p) => Orders::Fixed(tokens_io::read_order(p)?),
            None if self.order_per_sample => Orders::PerImage,
            None => Orders::Shared,
        };
        if self.order.is_some() && self.order_per_sample {
            bail!("--order and --order-per-sample are exclusive");
        }
        let (shape, sc) = (DecodeShape::of_config(&mc), &self.sampling);
        validate_settings(shape, sc)?;
        let condition = self.condition.as_ref().map(|c| c.load(&mc)).transpose()?;
        if condition.is_some() && self.grid.is_some() {
            bail!("--condition covers the model's own grid: it does not combine with --grid");
        }
        let cond = || condition.as_ref().map(Loaded::condition);
        check_classes(shape, sc, &classes, None, cond()).context("--classes")?;
        if let (Orders::Fixed(o), Some(p)) = (&orders, &self.order) {
            check_classes(shape, sc, &classes[..1], Some(o), cond())
                .with_context(|| format!("--order {}", p.display()))?;
        }
        let grid = mc.grid_size();
        let canvas = self.grid.map(|(w, h)| (h, w)).unwrap_or((grid, grid));
        if canvas.0 < grid || canvas.1 < grid {
            bail!(
                "--grid {}x{} is smaller than the model's {grid}x{grid} tokens",
                canvas.1,
                canvas.0
            );
        }
        if canvas != (grid, grid) && (self.order.is_some() || self.order_per_sample) {
            bail!("--order / --order-per-sample do not apply to --grid expansion (each window draws its own order)");
        }
        Ok(Checked {
            mc,
            classes,
            orders,
            condition,
            canvas,
        })
    }

    /// Checks the job, loads the model (and the tokenizer when images are made), samples
    /// batch after batch, writing each image as it is decoded; `on_images(made, total)` before
    /// the first batch and after each. Stops between batches on Ctrl-C, keeping what is made.
    pub fn run(&self, on_images: &mut dyn FnMut(usize, usize)) -> Result<Sampled> {
        let Checked {
            mc,
            classes,
            orders,
            condition,
            canvas,
        } = self.check()?;
        let (device, dtype) = self.placement.resolve_seeded(self.seed)?;
        let model = self.model.load(dtype, &device)?;
        let tk = &self.tokenizer;
        let want_images =
            self.tokens_out.is_none() || tk.vq.weights.is_some() || tk.is_pixel(mc.vocab_size);
        let tokenizer = match want_images {
            true => Some(tk.load(mc.vocab_size, dtype, &device)?),
            false => None,
        };
        // Sizes from the flags, bounded before anything is allocated.
        let patch = tokenizer.as_ref().map_or(1, |t| t.patch_size()) as u128;
        let cells_out = canvas.0 as u128 * canvas.1 as u128;
        let n_images = classes.len() as u128 * self.per_class as u128;
        crate::util::check_memory(
            n_images * cells_out * (4 + want_images as u128 * patch * patch * 3),
            &format!("{n_images} images of {}x{} tokens", canvas.1, canvas.0),
        )?;
        if let Some(p) = &self.tokens_out {
            crate::util::check_writable(p, "--tokens-out")?;
        }
        let all: Vec<usize> = classes
            .iter()
            .flat_map(|&c| std::iter::repeat_n(c, self.per_class))
            .collect();
        crate::util::create_out(&self.out)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let positions: Vec<usize> = (0..mc.block_size).collect();
        let own_grid = canvas == (mc.grid_size(), mc.grid_size());
        let (mut tokens, mut written, mut images) = (Vec::new(), Vec::new(), Vec::new());
        let mut done = 0;
        let start = std::time::Instant::now();
        let mut graphs = DecodeGraphs::new(self.cuda_graph);
        on_images(0, all.len());
        for batch in all.chunks(self.batch_size) {
            if crate::util::interrupted() {
                break;
            }
            // Drawn for --grid too, which ignores them: the seed's images stay what they were.
            let orders = orders.draw(batch.len(), &positions, &mut rng);
            // Tokens [batch, cells] on the device, decoded to images without a host round trip.
            let toks = match own_grid {
                true => {
                    let known = vec![vec![]; batch.len()];
                    let req = Request {
                        classes: batch,
                        known: &known,
                        orders: &orders,
                        condition: condition.as_ref().map(Loaded::condition),
                    }
                    .validate(DecodeShape::of(&model), &self.sampling)?;
                    generate(&model, &req, &mut rng, Some(&mut graphs))?
                }
                false => sample_canvases(&model, canvas, batch, &self.sampling, &mut rng)?,
            };
            if let Some(tk) = &tokenizer {
                for (im, &class) in tk.decode_tensor(&toks, canvas)?.into_iter().zip(batch) {
                    let name = img::sample_png_name(written.len(), class);
                    img::save_png_atomic(&im, &self.out.join(&name))?;
                    written.push(name);
                    images.push(im);
                }
            }
            if self.tokens_out.is_some() {
                tokens.extend(toks.to_vec2::<u32>()?);
            }
            done += batch.len();
            on_images(done, all.len());
        }
        let secs = start.elapsed().as_secs_f64();
        if !images.is_empty() {
            let grid = img::sample_grid(&images, self.per_class);
            img::save_png_atomic(&grid, &self.out.join("grid.png"))?;
            written.push("grid.png".into());
        }
        img::remove_stale_samples(&self.out, &written)?;
        if let Some(p) = &self.tokens_out {
            tokens_io::write(p, &tokens)?;
        }
        Ok(Sampled {
            images: done,
            secs,
            pngs: !images.is_empty(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> SampleJob {
        let (model, tokenizer, placement) = crate::zoo::digits_on_cpu();
        SampleJob {
            model,
            tokenizer,
            placement,
            sampling: SampleConfig {
                steps: 4,
                ..Default::default()
            },
            seed: 0,
            classes: vec![],
            per_class: 1,
            batch_size: 4,
            order: None,
            order_per_sample: false,
            grid: None,
            condition: None,
            out: PathBuf::new(),
            tokens_out: None,
            cuda_graph: false,
        }
    }

    fn err(j: SampleJob) -> String {
        j.check().err().expect("refused").to_string()
    }

    #[test]
    fn a_job_is_checked_against_the_models_config_before_weights_load() {
        let c = job().check().unwrap();
        // No classes: every class of a model with fewer than 1000.
        assert_eq!(c.classes, (0..10).collect::<Vec<_>>());
        assert_eq!(c.canvas, (8, 8));
        let c = SampleJob {
            grid: Some((12, 9)),
            ..job()
        }
        .check()
        .unwrap();
        assert_eq!(c.canvas, (9, 12), "rows x cols of a W x H grid");
        let e = err(SampleJob {
            per_class: 0,
            ..job()
        });
        assert!(e.contains("--per-class and --batch-size"), "{e}");
        let e = err(SampleJob {
            classes: vec![10],
            ..job()
        });
        assert!(e.contains("--classes"), "{e}");
        let e = err(SampleJob {
            grid: Some((4, 8)),
            ..job()
        });
        assert!(e.contains("--grid 4x8 is smaller"), "{e}");
        let e = err(SampleJob {
            grid: Some((16, 8)),
            order_per_sample: true,
            ..job()
        });
        assert!(e.contains("do not apply to --grid"), "{e}");
    }

    #[test]
    fn a_run_writes_one_png_per_image_and_the_grid() {
        let dir = tempfile::tempdir().unwrap();
        let j = SampleJob {
            classes: vec![3, 7],
            per_class: 2,
            batch_size: 3,
            out: dir.path().to_path_buf(),
            ..job()
        };
        let mut seen = Vec::new();
        let s = j.run(&mut |done, n| seen.push((done, n))).unwrap();
        assert_eq!((s.images, s.pngs), (4, true));
        assert_eq!(seen, vec![(0, 4), (3, 4), (4, 4)]);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.contains(&"grid.png".to_string()));
    }
}
