//! `arpg bench`: sampling (and optionally VQ decoding and training) throughput.

use crate::args::{DeviceArgs, ModelArgs};
use anyhow::{bail, Result};
use arpg::bench::Bench;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Guidance scale (not 0 or 1: both halves run, as in the paper's timing).
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f32,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also time the VQ-16 decode of one batch (random weights unless --vq-weights).
    #[arg(long)]
    pub vq: bool,
    /// Precision of the VQ decoder (as `sample`'s --vq-dtype; auto: tf32 on a GPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tf32", "f32", "bf16", "f16"])]
    pub vq_dtype: String,
    /// Also time images out, end to end: N batches of tokens -> VQ decode -> uint8 on the
    /// host, overlapped (the VQ on a second stream) and sequential.
    #[arg(long, value_name = "N")]
    pub e2e: Option<usize>,
    /// Also time training steps (batch --batch-size, synthetic tokens).
    #[arg(long)]
    pub train: bool,
    /// With --train: the training step to time (auto: the hand-written one on CUDA, autograd
    /// on the CPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "autograd", "hand"])]
    pub train_step: String,
    /// With --train: time training steps only (no sampling).
    #[arg(long, requires = "train")]
    pub train_only: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Decode eagerly on CUDA instead of replaying a captured CUDA graph.
    #[arg(long)]
    pub no_cuda_graph: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let spec = a.model.spec(0);
    let cfg = spec.config()?;
    let (dev, dtype) = a.device.placement().resolve_seeded(0)?;
    arpg::bench::check_memory(&cfg, a.batch_size, dtype)?;
    let mut out = serde_json::json!({
        "model": a.model.model.clone().unwrap_or_else(|| "config".into()),
        "batch_size": a.batch_size, "steps": a.steps, "cfg": a.cfg,
        "device": a.device.device, "dtype": a.device.dtype,
    });
    let bench = Bench {
        batch_size: a.batch_size,
        steps: a.steps,
        cfg: a.cfg,
        warmup: a.warmup,
        repeats: a.repeats,
        vq: a.vq,
        vq_dtype: a.vq_dtype.clone(),
        e2e: a.e2e,
        train: a.train,
        train_step: a.train_step.parse()?,
        train_only: a.train_only,
        cuda_graph: !a.no_cuda_graph,
    };
    arpg::bench::run(&spec, dtype, &dev, &bench, &mut out)?;
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
