//! `arpg eval-digits`: how well a digits model draws the digits it is asked for.

use crate::args::{DeviceArgs, ModelArgs};
use anyhow::{bail, ensure, Result};
use arpg::eval::digits::{load_splits, run_task, DigitsTask};
use arpg::sampler::{SampleConfig, TokenFilter};
use clap::Args;
use indicatif::ProgressBar;
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
    /// of every held-out test digit conditioned on its own class. `sketch`: draw every
    /// held-out digit's class given its stroke mask as the condition (a sketch model such as
    /// `digits-sketch`; a class-only model samples without it, as the baseline), and report
    /// the IoU of each sample's strokes with the sketch.
    #[arg(long, default_value = "sample", value_parser = ["sample", "inpaint", "sketch"])]
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
    let (train, test) = load_splits(&a.data)?;
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
    let task = DigitsTask::parse(&a.task, a.per_class)?;
    let pb = ProgressBar::new(task.samples(test.len()) as u64);
    let r = run_task(
        &model,
        task,
        &train,
        &test,
        &sc,
        a.batch_size,
        a.seed,
        &mut |done| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    let text = serde_json::to_string_pretty(&r)?;
    println!("{text}");
    if let Some(p) = &a.json_out {
        arpg::util::write_atomic(p, text.as_bytes())?;
    }
    Ok(())
}
