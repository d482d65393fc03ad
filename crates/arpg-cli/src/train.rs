//! `arpg train`, `arpg pack` and `arpg plot`.

use crate::args::DeviceArgs;
use crate::launch;
use anyhow::{bail, ensure, Context, Result};
use arpg::data::{self, layouts, PackWriter, Packed, Sample};
use arpg::train::{scaled_lr, TrainConfig, Trainer};
use arpg::ArpgConfig;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
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
    /// Set by the reference's flags (--epochs): warm up as train_c2i.py does.
    #[arg(skip)]
    pub warmup_counting: arpg::train::optim::Warmup,
    /// train_c2i.py's flags (--epochs, --global-batch-size, ...), with its meaning.
    #[command(flatten)]
    pub reference: crate::reference::ReferenceTrainFlags,
}

pub fn train(mut a: TrainArgs) -> Result<()> {
    if a.gpus > 1 && !cfg!(feature = "nccl") {
        bail!(
            "--gpus {} needs a build with NCCL: scripts/build-cuda.sh --nccl",
            a.gpus
        );
    }
    if launch::should_spawn(a.gpus)? {
        return launch::spawn_workers(a.gpus);
    }
    let dist = launch::from_env()?.filter(|d| d.world_size > 1);
    let (device, dtype) = match &dist {
        Some(d) => {
            if !cfg!(feature = "nccl") {
                bail!(
                    "multi-process training (WORLD_SIZE={}) needs a build with NCCL: \
                     scripts/build-cuda.sh --nccl",
                    d.world_size
                );
            }
            (
                arpg::device::parse_device(&launch::worker_device(d))?,
                arpg::device::parse_dtype(&a.device.dtype)?,
            )
        }
        None => a.device.resolve()?,
    };
    let main_rank = dist.as_ref().is_none_or(|d| d.rank == 0);
    ensure!(a.log_every >= 1, "--log-every must be at least 1");
    ensure!(a.ckpt_every >= 1, "--ckpt-every must be at least 1");
    ensure!(
        a.lr > 0.0 && a.lr.is_finite(),
        "--lr {} must be a positive number",
        a.lr
    );
    // The reference's flags set the batch and make --lr absolute: before the peak is derived.
    let data = Packed::open(&a.data)?;
    crate::reference::apply(&mut a, data.len())?;
    let lr = if a.lr_absolute {
        a.lr
    } else {
        scaled_lr(a.lr, a.batch_size)
    };
    if let Some(m) = a.min_lr {
        ensure!(
            m.is_finite() && m >= 0.0 && m <= lr,
            "--min-lr {m} must be in [0, the peak learning rate {lr:.3e}]{}",
            if a.lr_absolute {
                String::new()
            } else {
                format!(" (--lr {} scaled by batch {}/256)", a.lr, a.batch_size)
            }
        );
    }
    if main_rank {
        check_out(&a)?;
    }
    let tc = TrainConfig {
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr,
        min_lr: a.min_lr.unwrap_or(lr / 10.0),
        warmup_steps: a.warmup_steps,
        steps: a.steps,
        weight_decay: a.weight_decay,
        beta1: 0.9,
        beta2: 0.95,
        grad_clip: a.grad_clip,
        ema_decay: a.ema,
        class_dropout: a.class_dropout,
        dropout: a.dropout,
        seed: a.seed,
        warmup: a.warmup_counting,
    };
    tc.validate()?;
    let mut tr = match &a.resume {
        Some(p) => {
            let tr = Trainer::resume(p, Some(&tc), dtype, &device)?;
            if let Some(c) = &a.config {
                let mut given = ArpgConfig::from_json_file(c)?;
                // The run records its condition dropout in the config it writes.
                if let (Some(g), Some(t)) = (given.control.as_mut(), tr.model_cfg.control.as_ref())
                {
                    g.dropout = t.dropout;
                }
                if given != tr.model_cfg {
                    bail!(
                        "--config {} differs from the model config in --resume {}",
                        c.display(),
                        p.display()
                    );
                }
            }
            tr
        }
        None => {
            let mut cfg = match (&a.config, &a.model) {
                (Some(c), _) => ArpgConfig::from_json_file(c)?,
                (None, Some(m)) => ArpgConfig::preset(m)?,
                (None, None) => bail!("give --config FILE.json or --model PRESET"),
            };
            if let Some(q) = &a.control {
                cfg.control = Some(control_block(&cfg, &data, q, a.control_layers)?);
            }
            if let Some(c) = cfg.control.as_mut() {
                ensure!(
                    (0.0..1.0).contains(&a.control_dropout),
                    "--control-dropout {} must be in [0, 1)",
                    a.control_dropout
                );
                c.dropout = a.control_dropout;
            }
            let mut tr = Trainer::new(&cfg, &tc, dtype, &device)?;
            if let Some(p) = &a.init_from {
                let fresh = tr.init_from(p)?;
                eprintln!(
                    "--init-from {}: {} tensors loaded, {} new ({})",
                    p.display(),
                    tr.parameters().count() - fresh.len(),
                    fresh.len(),
                    if fresh.is_empty() {
                        "none".into()
                    } else {
                        "control.*".to_string()
                    }
                );
            }
            tr
        }
    };
    #[cfg(feature = "nccl")]
    if let Some(d) = &dist {
        let group = arpg::train::dist::NcclGroup::connect(d, &device)?;
        tr.set_group(Box::new(group))?;
    }
    let mc = tr.model_cfg.clone();
    if data.seq_len != mc.block_size {
        bail!(
            "--data {}: samples have {} tokens, the model's block_size is {}",
            a.data.display(),
            data.seq_len,
            mc.block_size
        );
    }
    if data.max_label() as usize >= mc.num_classes || data.max_token() as usize >= mc.vocab_size {
        bail!(
            "--data {}: labels up to {} / tokens up to {} do not fit num_classes {} / vocab_size {}",
            a.data.display(),
            data.max_label(),
            data.max_token(),
            mc.num_classes,
            mc.vocab_size
        );
    }
    let until = a.until.unwrap_or(a.steps).min(a.steps);
    if tr.step >= until {
        bail!(
            "nothing to do: the checkpoint is at step {}, --until/--steps is {until}",
            tr.step
        );
    }
    let world = tr.rank_and_world().1;
    if !main_rank {
        return arpg::train::run::run(&mut tr, &data, until, None, &mut |_, _| {});
    }
    let dir = arpg::train::run::RunDir {
        out: a.out.clone(),
        log_every: a.log_every,
        ckpt_every: a.ckpt_every,
        fresh_log: a.overwrite,
    };
    eprintln!(
        "training {} parameters on {} samples ({} crops), steps {}..{until} of {}, batch {} over {world} process(es), peak lr {:.3e}, final lr {:.3e}",
        tr.num_parameters(),
        data.len(),
        data.total_crops(),
        tr.step,
        a.steps,
        a.batch_size,
        tr.cfg.lr,
        tr.cfg.min_lr
    );
    let pb = ProgressBar::new(until as u64)
        .with_position(tr.step as u64)
        .with_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap(),
        );
    arpg::train::run::run(&mut tr, &data, until, Some(&dir), &mut |s, line| {
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
        tr.step,
        dir.checkpoint().display(),
        dir.weights().display()
    );
    Ok(())
}

/// The `control` block `--control` adds: channels and patch from the data's conditions.
fn control_block(
    cfg: &ArpgConfig,
    data: &Packed,
    query: &str,
    layers: usize,
) -> Result<arpg::config::ControlConfig> {
    let query = match query {
        "replace" => arpg::config::ControlQuery::Replace,
        _ => arpg::config::ControlQuery::Add,
    };
    let Some((c, h, w)) = data.condition_shape() else {
        bail!(
            "--control: --data {} holds no conditions (pack it with --control)",
            data.path.display()
        );
    };
    let g = cfg.grid_size();
    ensure!(
        h == w && h.is_multiple_of(g) && h >= g,
        "--control: the data's {h}x{w} conditions do not tile the model's {g}x{g} grid"
    );
    match &cfg.control {
        Some(given) if given.query != query => bail!(
            "--control {query:?} differs from the config's control.query {:?}",
            given.query
        ),
        Some(given) => Ok(given.clone()),
        None => Ok(arpg::config::ControlConfig {
            channels: c,
            patch: h / g,
            layers,
            query,
            dropout: 0.0,
        }),
    }
}

use arpg::train::run::RUN_FILES;

/// Refuse an --out holding another run unless it is resumed from there or --overwrite is given.
fn check_out(a: &TrainArgs) -> Result<()> {
    let found: Vec<&str> = RUN_FILES
        .iter()
        .copied()
        .filter(|f| a.out.join(f).exists())
        .collect();
    if found.is_empty() || a.overwrite {
        return Ok(());
    }
    let ckpt = a.out.join("checkpoint.safetensors");
    match &a.resume {
        None => bail!(
            "--out {} already holds a training run ({}): continue it with --resume {}, or pass \
             --overwrite to start over (its checkpoints are replaced, its log emptied)",
            a.out.display(),
            found.join(", "),
            ckpt.display()
        ),
        Some(r) => {
            let same = match (std::fs::canonicalize(r), std::fs::canonicalize(&ckpt)) {
                (Ok(x), Ok(y)) => x == y,
                _ => false,
            };
            if !same {
                bail!(
                    "--out {} holds another training run ({}) than --resume {}: resuming would \
                     replace it; give another --out, or --resume {}",
                    a.out.display(),
                    found.join(", "),
                    r.display(),
                    ckpt.display()
                );
            }
            Ok(())
        }
    }
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
    match (a.control.as_deref(), &a.digits, &a.paper) {
        (Some("sketch"), None, _) => bail!("--control sketch is for --digits"),
        (Some("stored"), _, None) => bail!("--control stored is for --paper"),
        _ => {}
    }
    let with_conditions = a.control.is_some();
    // Each sample, and its conditions when --control asks for them.
    let samples: Vec<(Sample, Option<layouts::Conditions>)> = if let Some(r) = &a.paper {
        if with_conditions {
            layouts::read_paper_layout_with_conditions(r, a.vocab_size)?
                .into_iter()
                .map(|(s, c)| (s, Some(c)))
                .collect()
        } else {
            plain(layouts::read_paper_layout(r, a.vocab_size)?)
        }
    } else if let Some(r) = &a.llamagen {
        plain(layouts::read_llamagen_layout(r, a.vocab_size)?)
    } else if let Some(p) = &a.digits {
        let (train, test) = data::digits::split(&data::digits::load_csv_gz(p)?);
        let part = if a.split == "train" { train } else { test };
        part.iter()
            .map(|d| {
                let s = Sample {
                    label: d.label,
                    crops: vec![d.pixels.iter().map(|&v| v as u16).collect()],
                };
                let sketch = arpg::control::digit_sketch(&d.pixels).to_vec();
                (s, with_conditions.then(|| ((1, 8, 8), vec![sketch])))
            })
            .collect()
    } else {
        bail!("give one of --paper ROOT, --llamagen ROOT or --digits FILE.csv.gz");
    };
    let mut w = PackWriter::new();
    for (s, c) in &samples {
        match c {
            Some((shape, conds)) => w.push_with_conditions(s, *shape, conds)?,
            None => w.push(s)?,
        }
    }
    w.write(&a.out)?;
    eprintln!(
        "packed {} samples{} into {}",
        w.len(),
        if with_conditions {
            " with their conditions"
        } else {
            ""
        },
        a.out.display()
    );
    Ok(())
}

fn plain(samples: Vec<Sample>) -> Vec<(Sample, Option<layouts::Conditions>)> {
    samples.into_iter().map(|s| (s, None)).collect()
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
    use arpg::data::tokenize::{
        augmentations, conditions, load, plan, write_codes, write_conditions, ControlSource,
    };
    let control = match a.control.as_deref() {
        None => None,
        Some("canny") => Some(ControlSource::Canny(a.canny_low, a.canny_high)),
        Some(dir) => {
            let dir = PathBuf::from(dir);
            ensure!(
                dir.is_dir(),
                "--control {}: neither `canny` nor a folder of condition images",
                dir.display()
            );
            ensure!(a.control_channels != 2, "--control-channels must be 1 or 3");
            Some(ControlSource::Folder(dir, a.control_channels as usize))
        }
    };
    if let Some(ControlSource::Canny(lo, hi)) = control {
        ensure!(
            lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi,
            "--canny-low {lo} / --canny-high {hi}: need 0 <= low <= high"
        );
    }
    let (device, dtype) = a.device.resolve()?;
    crate::tokens::check_image_size(a.image_size)?;
    let tk = crate::tokens::standalone_tokenizer(&a.vq, dtype, &device)?;
    let p = tk.patch_size();
    if !a.image_size.is_multiple_of(p) {
        bail!(
            "--image-size {} is not a multiple of the {p}-pixel patch",
            a.image_size
        );
    }
    let jobs = plan(&a.image_root, &a.out)?;
    // The conditions are written before the codes: existing codes mean a finished image.
    let todo: Vec<_> = jobs
        .iter()
        .filter(|j| !j.2.exists() || (control.is_some() && !layouts::control_path(&j.2).exists()))
        .collect();
    eprintln!(
        "{} images in {} classes; {} already encoded",
        jobs.len(),
        jobs.last().map(|j| j.0 + 1).unwrap_or(0),
        jobs.len() - todo.len()
    );
    let pb = ProgressBar::new(todo.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap(),
    );
    for (_, src, dst) in todo {
        if arpg::util::interrupted() {
            break;
        }
        let crops = augmentations(&load(src)?, a.image_size, a.ten_crop);
        if let Some(c) = &control {
            let (shape, conds) =
                conditions(c, &a.image_root, src, &crops, a.image_size, a.ten_crop)?;
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_conditions(&layouts::control_path(dst), shape, &conds)?;
        }
        let codes = tk.encode(&crops, &device)?;
        write_codes(dst, &codes)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    eprintln!(
        "codes in {} (pack them with `arpg pack --paper {}{}`)",
        a.out.display(),
        a.out.display(),
        if control.is_some() {
            " --control stored"
        } else {
            ""
        }
    );
    Ok(())
}
