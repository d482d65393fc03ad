//! `arpg eval-digits`: how well a digits model draws the digits it is asked for.

use crate::args::{DeviceArgs, ModelArgs};
use crate::Bar;
use anyhow::Result;
use arpg::eval::digits::{DigitsTask, EvalDigitsJob};
use arpg::sampler::{MaskSchedule, SampleConfig, TokenFilter};
use clap::Args;
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

pub fn run(a: EvalDigitsArgs) -> Result<()> {
    let job = EvalDigitsJob {
        model: a.model.spec(a.seed),
        placement: a.device.placement(),
        data: a.data,
        task: DigitsTask::parse(&a.task, a.per_class)?,
        sampling: SampleConfig {
            steps: a.steps,
            cfg: a.cfg,
            cfg_schedule: a.cfg_schedule.parse()?,
            schedule: MaskSchedule::Arccos,
            filter: TokenFilter {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
            },
        },
        batch_size: a.batch_size,
        seed: a.seed,
        json_out: a.json_out,
    };
    let mut bar = Bar::new("samples", "");
    let r = job.run(&mut |done, n| bar.set(done, n))?;
    bar.finish();
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
