//! `arpg eval-digits`: how well a digits model draws the digits it is asked for.

use crate::args::{DeviceArgs, ModelArgs};
use anyhow::{bail, ensure, Context, Result};
use arpg::data::digits;
use arpg::eval::digits::report;
use arpg::sampler::{decode, random_order, Request, SampleConfig, TokenFilter};
use clap::Args;
use indicatif::ProgressBar;
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalDigitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The UCI digits CSV: its training split trains the k-NN judge and is the reference
    /// for copies; its test split measures the judge.
    #[arg(long, default_value = "data/digits/digits.csv.gz")]
    pub data: PathBuf,
    /// Samples per class.
    #[arg(long, default_value_t = 50)]
    pub per_class: usize,
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f32,
    #[arg(long, default_value = "constant")]
    pub cfg_schedule: String,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely pixel levels (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// `sample`: draw --per-class digits of every class. `inpaint`: regenerate the lower half
    /// of every held-out test digit conditioned on its own class.
    #[arg(long, default_value = "sample", value_parser = ["sample", "inpaint"])]
    pub task: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

pub fn run(mut a: EvalDigitsArgs) -> Result<()> {
    if a.model.model.is_none() && a.model.config.is_none() {
        a.model.model = Some(arpg::zoo::DIGITS.into());
    }
    if a.task == "sample" {
        ensure!(a.per_class >= 1, "--per-class must be at least 1");
        // Each sample keeps its class and 64 pixels: refuse what memory cannot hold.
        arpg::util::check_memory(
            a.per_class as u128 * 10 * 96,
            &format!("--per-class {} (x 10 classes)", a.per_class),
        )?;
    }
    ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    if let Some(p) = &a.json_out {
        arpg::util::check_writable(p, "--json-out")?;
    }
    let spec = a.model.spec(a.seed);
    let cfg = spec.config()?;
    if cfg.vocab_size != 17 || cfg.num_classes != 10 || cfg.block_size != 64 {
        bail!("eval-digits needs a digits model (vocab 17, 10 classes, 64 tokens)");
    }
    let (device, dtype) = a.device.resolve_seeded(a.seed)?;
    let model = spec.load(dtype, &device)?;
    let (train, test) = digits::split(&digits::load_csv_gz(&a.data).with_context(|| "--data")?);
    ensure!(
        !train.is_empty() && !test.is_empty(),
        "--data {}: {} digit(s); the judge needs a training and a test split (2 at least)",
        a.data.display(),
        train.len() + test.len()
    );
    let sc = SampleConfig {
        steps: a.steps,
        cfg: a.cfg,
        cfg_schedule: a.cfg_schedule.parse()?,
        schedule: arpg::sampler::MaskSchedule::Arccos,
        filter: TokenFilter {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        },
    };
    let inpainting = a.task == "inpaint";
    // Inpainting: the upper half (positions 0..32) is known, the lower half decoded.
    let (classes, knowns): (Vec<usize>, Vec<Vec<(usize, u32)>>) = if inpainting {
        test.iter()
            .map(|d| {
                (
                    d.label as usize,
                    (0..32).map(|p| (p, d.pixels[p] as u32)).collect(),
                )
            })
            .unzip()
    } else {
        (0..10)
            .flat_map(|c| std::iter::repeat_n((c, vec![]), a.per_class))
            .unzip()
    };
    let sc = SampleConfig {
        steps: if inpainting {
            sc.steps.min(32)
        } else {
            sc.steps
        },
        ..sc
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let positions: Vec<usize> = if inpainting {
        (32..64).collect()
    } else {
        (0..64).collect()
    };
    let pb = ProgressBar::new(classes.len() as u64);
    let mut samples = Vec::new();
    let bs = a.batch_size.max(1);
    for (batch, known) in classes.chunks(bs).zip(knowns.chunks(bs)) {
        let orders: Vec<Vec<usize>> = batch
            .iter()
            .map(|_| random_order(&positions, &mut rng))
            .collect();
        let toks = decode(
            &model,
            &Request {
                classes: batch,
                known,
                orders: &orders,
            },
            &sc,
            &mut rng,
        )?;
        for (c, t) in batch.iter().zip(toks) {
            let mut px = [0u8; 64];
            for (p, v) in px.iter_mut().zip(t) {
                *p = v as u8;
            }
            samples.push((*c as u32, px));
        }
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    let r = report(&samples, &train, &test);
    let text = serde_json::to_string_pretty(&r)?;
    println!("{text}");
    if let Some(p) = &a.json_out {
        arpg::util::write_atomic(p, text.as_bytes())?;
    }
    Ok(())
}
