//! `arpg train`, `arpg pack` and `arpg plot`.

use crate::args::DeviceArgs;
use crate::{launch, Bar};
use anyhow::Result;
use arpg::data::tokenize::{ControlSource, TokenizeJob};
use arpg::data::PackJob;
use arpg::train::run::RunDir;
use arpg::train::setup::{ModelSource, TrainJob};
use arpg::train::TrainConfig;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Packed training data (from `arpg pack`).
    #[arg(long, visible_alias = "code-path")]
    pub data: PathBuf,
    /// Model config JSON (reference keys), or use --model for a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model preset (ARPG-L, ARPG-XL, ARPG-XXL) when no --config is given.
    #[arg(long, visible_alias = "gpt-model")]
    pub model: Option<String>,
    /// Output folder: checkpoint.safetensors (resumable), model.safetensors (inference
    /// weights, official key layout), train.jsonl (log). Default `results`, the reference's.
    #[arg(long, visible_alias = "results-dir", default_value = "results")]
    pub out: PathBuf,
    /// Continue from this training checkpoint (same model config).
    #[arg(long, visible_alias = "gpt-ckpt")]
    pub resume: Option<PathBuf>,
    /// Start from these inference weights (a `model.safetensors` or official `.pt`) instead
    /// of a fresh initialisation, e.g. a class-conditional model before training a control
    /// encoder on it (the encoder starts fresh: `control.*` may be missing).
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// For a control model (a config with a `control` block): the probability of dropping a
    /// sample's condition to the null condition, so that the model can sample without one and
    /// guidance can act on the condition too (recorded as `control.dropout` in the run's
    /// config.json). 0 trains a model that always needs a condition.
    #[arg(long, default_value_t = 0.1)]
    pub control_dropout: f64,
    /// Train a control encoder with the transformer on data packed with conditions: `add`
    /// (the mask token plus the control embedding) or `replace` (the control embedding in
    /// its place). Adds a `control` block to a config without one, its channels and patch
    /// read from the data's condition shape (`--config`'s own block is used as it is).
    #[arg(long, value_parser = ["add", "replace"])]
    pub control: Option<String>,
    /// With --control: bidirectional transformer blocks of the encoder.
    #[arg(long, default_value_t = 2, requires = "control")]
    pub control_layers: usize,
    /// Start over in an --out that already holds a run: its checkpoints are replaced and its
    /// log emptied (without this, such an --out is refused).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Total optimizer steps of the run (the schedule's length).
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Stop after this step (the schedule still spans --steps); resume later with --resume.
    #[arg(long)]
    pub until: Option<usize>,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Micro-batches per step (gradient accumulation); must divide --batch-size.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate per 256 samples of batch (scaled by batch/256), as in the paper.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Take --lr as the absolute peak learning rate (no batch scaling).
    #[arg(long)]
    pub lr_absolute: bool,
    /// Final learning rate of the cosine decay (default: a tenth of the peak, the paper's
    /// 1e-5 at 1e-4).
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0, visible_alias = "max-grad-norm")]
    pub grad_clip: f64,
    /// Keep an EMA of the weights with this decay (e.g. 0.9999); exported instead of the model.
    /// A bare --ema (the reference's switch) means 0.9999, its decay.
    #[arg(long, num_args = 0..=1, default_missing_value = "0.9999")]
    pub ema: Option<f64>,
    /// Probability of replacing the class by the null class (for guidance).
    #[arg(long, default_value_t = 0.1)]
    pub class_dropout: f64,
    /// Dropout on token embeddings, residuals and FFN outputs.
    #[arg(long, default_value_t = 0.1, visible_alias = "dropout-p")]
    pub dropout: f64,
    #[arg(long, default_value_t = 0, visible_alias = "global-seed")]
    pub seed: u64,
    /// With --gpus N: each process keeps the AdamW moments of 1/N of the tensors (ZeRO stage
    /// 1), updates those and broadcasts them; the same weights, less memory per GPU.
    #[arg(long)]
    pub zero1: bool,
    /// With --gpus N: the gradients travel in buckets of about this many MiB (f32), each
    /// all-reduced as soon as the backward has finished it, while the backward goes on
    /// (PyTorch DDP's bucket_cap_mb).
    #[arg(long, default_value_t = 25.0)]
    pub bucket_mb: f64,
    /// How gradients are computed: `hand` (the hand-written forward and backward, no
    /// autograd graph; class-conditional models), `autograd` (candle's autograd, the CPU's
    /// path and what `hand` is checked against), `auto` (hand on CUDA, else autograd).
    #[arg(long, default_value = "auto", value_parser = ["auto", "autograd", "hand"])]
    pub step: String,
    /// Log every N steps (stdout and train.jsonl).
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Write the checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 500)]
    pub ckpt_every: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Data-parallel over N GPUs of this machine: one process per GPU (cuda:0..N-1), NCCL
    /// all-reduce, --batch-size stays the global batch. Across nodes, start one process per
    /// GPU with a launcher's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT instead.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// train_c2i.py's flags (--epochs, --global-batch-size, ...), with its meaning.
    #[command(flatten)]
    pub reference: crate::reference::ReferenceTrainFlags,
}

pub fn train(a: TrainArgs) -> Result<()> {
    if TrainJob::launches(a.gpus)? {
        return launch::spawn_workers(a.gpus);
    }
    let job = TrainJob {
        data: a.data,
        dir: RunDir {
            out: a.out,
            log_every: a.log_every,
            ckpt_every: a.ckpt_every,
            fresh_log: a.overwrite,
        },
        source: ModelSource {
            config: a.config,
            model: a.model,
            resume: a.resume,
            init_from: a.init_from,
            control: match &a.control {
                Some(q) => Some((q.parse()?, a.control_layers)),
                None => None,
            },
            control_dropout: a.control_dropout,
        },
        recipe: TrainConfig {
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            warmup_steps: a.warmup_steps,
            steps: a.steps,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
            ema_decay: a.ema,
            class_dropout: a.class_dropout,
            dropout: a.dropout,
            seed: a.seed,
            zero1: a.zero1,
            step_kind: a.step.parse()?,
            bucket_mb: a.bucket_mb,
            ..TrainConfig::default()
        },
        lr: a.lr,
        lr_absolute: a.lr_absolute,
        min_lr: a.min_lr,
        until: a.until,
        reference: a.reference.flags(),
        placement: a.device.placement(),
    };
    let mut run = job.prepare()?;
    let Some(dir) = run.dir.clone() else {
        return run.run(&mut |_, _| {});
    };
    let (tr, data) = (&run.trainer, &run.data);
    eprintln!(
        "training {} parameters on {} samples ({} crops), steps {}..{} of {}, batch {} over {} process(es), peak lr {:.3e}, final lr {:.3e}",
        tr.num_parameters(),
        data.len(),
        data.total_crops(),
        tr.step,
        run.until,
        tr.cfg.steps,
        tr.cfg.batch_size,
        tr.rank_and_world().1,
        tr.cfg.lr,
        tr.cfg.min_lr
    );
    let pb = crate::bar(run.until, "steps", " {msg}").with_position(tr.step as u64);
    run.run(&mut |s, line| {
        pb.set_position(s.step as u64);
        pb.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
        if let Some(line) = line {
            if pb.is_hidden() {
                println!("{line}");
            } else {
                pb.println(line.to_string());
            }
        }
    })?;
    pb.finish_and_clear();
    eprintln!(
        "step {}: checkpoint {}, inference weights {}",
        run.trainer.step,
        dir.checkpoint().display(),
        dir.weights().display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct PackArgs {
    /// The paper's layout: ROOT/<class id>/*.npy, each (1, n_aug, L), (n_aug, L) or (L,).
    #[arg(long, conflicts_with_all = ["llamagen", "digits"])]
    pub paper: Option<PathBuf>,
    /// LlamaGen's layout: ROOT/codes/*.npy with ROOT/labels/*.npy of the same names.
    #[arg(long, conflicts_with_all = ["paper", "digits"])]
    pub llamagen: Option<PathBuf>,
    /// The UCI digits CSV (.csv.gz): packs its training split (--split test for the rest).
    #[arg(long, conflicts_with_all = ["paper", "llamagen"])]
    pub digits: Option<PathBuf>,
    /// With --digits: train (4 of 5 digits) or test (every fifth).
    #[arg(long, default_value = "train", value_parser = ["train", "test"])]
    pub split: String,
    /// Store a condition beside each sample's tokens, for training a control model. With
    /// --digits: `sketch` (each digit's stroke mask, pixel >= 8 of 0..16, as an 8x8 image).
    /// With --paper: `stored` (the `<name>.control.npy` that `arpg tokenize --control` wrote
    /// beside each `<name>.npy`).
    #[arg(long, value_parser = ["sketch", "stored"])]
    pub control: Option<String>,
    /// Largest token id + 1 accepted (16384 for VQ-16).
    #[arg(long, default_value_t = 16384)]
    pub vocab_size: usize,
    /// The packed file to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn pack(a: PackArgs) -> Result<()> {
    let with_conditions = a.control.is_some();
    let n = PackJob {
        paper: a.paper,
        llamagen: a.llamagen,
        digits: a.digits,
        test_split: a.split == "test",
        control: a.control,
        vocab_size: a.vocab_size,
        out: a.out.clone(),
    }
    .run()?;
    eprintln!(
        "packed {n} samples{} into {}",
        if with_conditions {
            " with their conditions"
        } else {
            ""
        },
        a.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A training log (train.jsonl written by `arpg train`).
    pub log: PathBuf,
    /// The PNG to write: loss, learning rate and gradient norm against the step.
    #[arg(long, default_value = "loss.png")]
    pub out: PathBuf,
}

pub fn plot(a: PlotArgs) -> Result<()> {
    let curves = arpg::train::plot::read_log(&a.log)?;
    let img = arpg::train::plot::draw(&curves);
    arpg::tokenizer::image::save_png_atomic(&img, &a.out)?;
    eprintln!(
        "{} log lines plotted into {}",
        curves.steps.len(),
        a.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Images in one folder per class: ROOT/<class>/<image>.{png,jpg,jpeg}.
    pub image_root: PathBuf,
    /// Output in the paper's layout: OUT/<class id>/<image stem>.npy, (1, n_aug, L) u16.
    pub out: PathBuf,
    #[command(flatten)]
    pub vq: crate::args::VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Side of the square crops (256 for VQ-16 models).
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// Ten crops (corners and centre of a 1.1x centre crop) and their mirrors, as LlamaGen's
    /// code extraction; without it, the centre crop and its mirror.
    #[arg(long)]
    pub ten_crop: bool,
    /// Also store a control condition beside each image's codes (`<stem>.control.npy`, one
    /// per crop, cropped as the image is), for `arpg pack --paper OUT --control stored`:
    /// `canny` (edges of each crop, thresholds --canny-low / --canny-high) or a folder of
    /// condition images mirroring the image tree (DIR/<class>/<stem>.png, each the size of
    /// its image).
    #[arg(long)]
    pub control: Option<String>,
    /// Channels of the condition images of a --control folder: 1 (luma) or 3 (RGB).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub control_channels: u8,
    #[arg(long, default_value_t = arpg::control::CANNY_LOW)]
    pub canny_low: f32,
    #[arg(long, default_value_t = arpg::control::CANNY_HIGH)]
    pub canny_high: f32,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let control = a.control.as_deref();
    let job = TokenizeJob {
        control: control
            .map(|c| ControlSource::parse(c, a.control_channels, a.canny_low, a.canny_high))
            .transpose()?,
        image_root: a.image_root,
        out: a.out,
        tokenizer: a.vq.spec(false, 0)?,
        placement: a.device.placement(),
        image_size: a.image_size,
        ten_crop: a.ten_crop,
    };
    let plan = job.plan()?;
    let n = plan.images.len();
    eprintln!(
        "{n} images in {} classes; {} already encoded",
        plan.classes(),
        n - plan.todo.len()
    );
    let mut bar = Bar::new("images", "");
    bar.set(0, plan.todo.len());
    plan.run(&mut |done, n| bar.set(done, n))?;
    bar.finish();
    eprintln!(
        "codes in {} (pack them with `arpg pack --paper {}{}`)",
        job.out.display(),
        job.out.display(),
        if job.control.is_some() {
            " --control stored"
        } else {
            ""
        }
    );
    Ok(())
}
