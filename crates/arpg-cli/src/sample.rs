//! `arpg sample`: class-conditional sampling.

use crate::args::{ControlArgs, DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use crate::Bar;
use anyhow::Result;
use arpg::sampler::run::SampleJob;
use clap::Args;
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

pub fn run(a: SampleArgs) -> Result<()> {
    let seed = a.sampling.seed;
    let mut model = a.model.spec(seed);
    if model.or_default() == Some(arpg::zoo::DIGITS) {
        eprintln!("no --model given and no official weights in the HF cache: using the built-in digits model");
    }
    let job = SampleJob {
        sampling: a.sampling.config(&model)?,
        tokenizer: a.vq.spec(model.random, seed)?,
        model,
        placement: a.device.placement(),
        seed,
        classes: a.classes,
        per_class: a.per_class,
        batch_size: a.batch_size,
        order: a.order,
        order_per_sample: a.order_per_sample,
        grid: a.grid,
        condition: a.control.file(),
        out: a.out,
        tokens_out: a.tokens_out,
        cuda_graph: !a.sampling.no_cuda_graph,
    };
    let mut bar = Bar::new("images", " {msg}");
    let s = job.run(&mut |done, n| bar.set(done, n))?;
    bar.finish();
    eprintln!(
        "{} images in {:.1}s ({:.2} images/s){}{}",
        s.images,
        s.secs,
        s.images as f64 / s.secs,
        match s.pngs {
            true => format!(", PNGs in {}", job.out.display()),
            false => String::new(),
        },
        job.tokens_out
            .as_ref()
            .map(|p| format!(", tokens in {}", p.display()))
            .unwrap_or_default(),
    );
    Ok(())
}
