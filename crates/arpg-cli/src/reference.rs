//! The reference's `train_c2i.py` flags that are not plain aliases of ours: they change what
//! other flags mean (its --lr is absolute, its schedule counts epochs) or only take the value
//! the checkpoints were trained with. Accepted so that GETTING_STARTED.md's command runs as
//! typed; anything that cannot mean what it means there is an error naming the flag.

use crate::train::TrainArgs;
use anyhow::{bail, Result};
use clap::Args;

/// The reference's global batch when it is not given (`--global-batch-size` default).
const REFERENCE_BATCH: usize = 256;
/// The reference's warm-up when it is not given (`--warmup-epochs` default).
const REFERENCE_WARMUP_EPOCHS: usize = 100;

#[derive(Args, Debug, Clone, Default)]
pub struct ReferenceTrainFlags {
    /// The reference's run length in epochs (full batches over --data, the last partial batch
    /// dropped as its DataLoader does): sets --steps and, unless --warmup-epochs is given, a
    /// 100-epoch warm-up, and takes --lr as absolute (the reference's convention).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Warm-up in epochs (the reference's default is 100); needs --epochs.
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// The reference's batch over all processes: sets --batch-size and takes --lr as the
    /// absolute learning rate (the reference does not scale it; 1e-4 per 256 is left to you).
    #[arg(long)]
    pub global_batch_size: Option<usize>,
    #[arg(long, hide = true)]
    pub token_dropout_p: Option<f64>,
    #[arg(long, hide = true)]
    pub drop_path_rate: Option<f64>,
    #[arg(long, hide = true)]
    pub lr_schedule: Option<String>,
    #[arg(long, hide = true)]
    pub beta1: Option<f64>,
    #[arg(long, hide = true)]
    pub beta2: Option<f64>,
    #[arg(long, hide = true)]
    pub gradient_accumulation_steps: Option<usize>,
    #[arg(long, hide = true)]
    pub dataset: Option<String>,
    #[arg(long, hide = true)]
    pub gpt_type: Option<String>,
    #[arg(long, hide = true)]
    pub cloud_save_path: Option<String>,
    #[arg(long, hide = true)]
    pub no_local_save: bool,
    #[arg(long, hide = true)]
    pub image_size: Option<usize>,
    #[arg(long, hide = true)]
    pub downsample_size: Option<usize>,
    #[arg(long, hide = true)]
    pub num_classes: Option<usize>,
    #[arg(long, hide = true)]
    pub vocab_size: Option<usize>,
    #[arg(long, hide = true)]
    pub cls_token_num: Option<usize>,
    /// Data loader workers: packed data is memory-mapped, so no effect.
    #[arg(long, hide = true)]
    pub num_workers: Option<usize>,
    /// The reference compiles unless told not to; nothing to turn off here.
    #[arg(long, hide = true)]
    pub no_compile: bool,
}

/// Map the reference flags onto `a` for a data set of `samples`; says what it did.
pub fn apply(a: &mut TrainArgs, samples: usize) -> Result<()> {
    let r = a.reference.clone();
    check_fixed(&r, a)?;
    if r.epochs.is_none() && r.global_batch_size.is_none() {
        if r.warmup_epochs.is_some() {
            bail!("--warmup-epochs needs --epochs (or give --warmup-steps)");
        }
        return Ok(());
    }
    // The reference's command line: its batch, its absolute learning rate.
    a.batch_size = r.global_batch_size.unwrap_or(REFERENCE_BATCH);
    a.lr_absolute = true;
    if let Some(epochs) = r.epochs {
        let per_epoch = samples / a.batch_size.max(1);
        if per_epoch == 0 {
            bail!(
                "--epochs {epochs}: --data has {samples} samples, fewer than one batch of {}: \
                 no full batch per epoch (the reference drops the partial one)",
                a.batch_size
            );
        }
        let warmup = r.warmup_epochs.unwrap_or(REFERENCE_WARMUP_EPOCHS);
        if warmup > epochs {
            bail!("--warmup-epochs {warmup} is longer than --epochs {epochs}");
        }
        a.steps = epochs * per_epoch;
        a.warmup_steps = warmup * per_epoch;
        // Its lr is lr * epoch / warmup_epochs over fractional epochs: 0 at the first step.
        a.warmup_counting = arpg::train::optim::Warmup::Reference;
    }
    eprintln!(
        "reference flags: batch {}, lr {:e} (absolute), {} steps ({} per epoch), warm-up {} steps",
        a.batch_size,
        a.lr,
        a.steps,
        samples / a.batch_size.max(1),
        a.warmup_steps
    );
    Ok(())
}

/// Flags that only take one value here: the reference's default, or the model's own shape.
fn check_fixed(r: &ReferenceTrainFlags, a: &TrainArgs) -> Result<()> {
    let same = |flag: &str, got: Option<f64>, want: f64, why: &str| -> Result<()> {
        match got {
            Some(v) if v != want => bail!("{flag} {v} is not supported: only {want} ({why})"),
            _ => Ok(()),
        }
    };
    same(
        "--token-dropout-p",
        r.token_dropout_p,
        a.dropout,
        "one --dropout for tokens, residuals and FFN",
    )?;
    same(
        "--drop-path-rate",
        r.drop_path_rate,
        0.0,
        "no stochastic depth",
    )?;
    same("--beta1", r.beta1, 0.9, "the paper's AdamW betas")?;
    same("--beta2", r.beta2, 0.95, "the paper's AdamW betas")?;
    let gas = r.gradient_accumulation_steps.map(|v| v as f64);
    same(
        "--gradient-accumulation-steps",
        gas,
        1.0,
        "the reference parses it and never uses it; see --grad-accum",
    )?;
    for (flag, got, want) in [
        ("--lr-schedule", &r.lr_schedule, "cosine"),
        ("--dataset", &r.dataset, "imagenet_code"),
        ("--gpt-type", &r.gpt_type, "c2i"),
    ] {
        if let Some(v) = got.as_deref().filter(|v| *v != want) {
            bail!("{flag} {v} is not supported: only {want}");
        }
    }
    if r.cloud_save_path.is_some() || r.no_local_save {
        bail!("--cloud-save-path / --no-local-save are not supported: checkpoints go to --out (--results-dir)");
    }
    if r.warmup_epochs.is_some() && a.warmup_steps != 0 {
        bail!("give --warmup-epochs or --warmup-steps, not both");
    }
    // A resumed run's shape comes from its checkpoint.
    let Some(cfg) = arpg::train::setup::given_config(a.config.as_deref(), a.model.as_deref())?
    else {
        return Ok(());
    };
    let patch = r.downsample_size.unwrap_or(16);
    for (flag, got, want) in [
        ("--downsample-size", r.downsample_size, 16),
        ("--image-size", r.image_size, cfg.grid_size() * patch),
        ("--num-classes", r.num_classes, cfg.num_classes),
        ("--vocab-size", r.vocab_size, cfg.vocab_size),
        ("--cls-token-num", r.cls_token_num, cfg.cls_token_num),
    ] {
        if let Some(v) = got.filter(|&v| v != want) {
            bail!("{flag} {v} does not match the model: it has {want} (change --config instead)");
        }
    }
    Ok(())
}
