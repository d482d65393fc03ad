//! A run's set-up before its first step, from what a command line asks for: the learning
//! rates derived and checked, the trainer built fresh or resumed, the data checked against the
//! model, and the output folder guarded against replacing another run. Errors name the flags
//! of `arpg train`, where they are fixed. [`TrainJob`] is the whole set-up, in that order.

use super::dist::DistEnv;
use super::run::{RunDir, RUN_FILES};
use super::{scaled_lr, TrainConfig, Trainer};
use crate::config::{ArpgConfig, ControlConfig, ControlQuery};
use crate::data::Packed;
use crate::reference::TrainFlags;
use crate::zoo::Placement;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// The peak and final learning rates: `lr` per 256 samples of `batch` (the paper's rule) or
/// as given when `absolute`; the final one defaults to a tenth of the peak.
pub fn learning_rates(
    lr: f64,
    absolute: bool,
    batch: usize,
    min_lr: Option<f64>,
) -> Result<(f64, f64)> {
    let peak = if absolute { lr } else { scaled_lr(lr, batch) };
    if let Some(m) = min_lr {
        ensure!(
            m.is_finite() && m >= 0.0 && m <= peak,
            "--min-lr {m} must be in [0, the peak learning rate {peak:.3e}]{}",
            match absolute {
                true => String::new(),
                false => format!(" (--lr {lr} scaled by batch {batch}/256)"),
            }
        );
    }
    Ok((peak, min_lr.unwrap_or(peak / 10.0)))
}

/// The model config that `--config` (a file) or `--model` (a preset) name, if either does.
pub fn given_config(config: Option<&Path>, model: Option<&str>) -> Result<Option<ArpgConfig>> {
    match (config, model) {
        (Some(c), _) => ArpgConfig::from_json_file(c).map(Some),
        (None, Some(m)) => ArpgConfig::preset(m).map(Some),
        (None, None) => Ok(None),
    }
}

/// Where a run's model comes from.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    pub config: Option<PathBuf>,
    pub model: Option<String>,
    /// Continue this training checkpoint (`--config`, if given, must be its config).
    pub resume: Option<PathBuf>,
    /// Start from these inference weights instead of a fresh initialisation.
    pub init_from: Option<PathBuf>,
    /// Add a control encoder with this query and these layers, shaped by the data's conditions.
    pub control: Option<(ControlQuery, usize)>,
    /// The probability of dropping a control model's condition, recorded in its config.
    pub control_dropout: f64,
}

impl ModelSource {
    pub fn trainer(
        &self,
        tc: &TrainConfig,
        data: &Packed,
        dtype: DType,
        device: &Device,
    ) -> Result<Trainer> {
        let tr = match &self.resume {
            Some(p) => self.resumed(p, tc, dtype, device)?,
            None => self.fresh(tc, data, dtype, device)?,
        };
        check_data(data, &tr.model_cfg)?;
        Ok(tr)
    }

    fn resumed(
        &self,
        p: &Path,
        tc: &TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Trainer> {
        let tr = Trainer::resume(p, Some(tc), dtype, device)?;
        if let Some(c) = &self.config {
            let mut given = ArpgConfig::from_json_file(c)?;
            // The run records its condition dropout in the config it writes.
            if let (Some(g), Some(t)) = (given.control.as_mut(), tr.model_cfg.control.as_ref()) {
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
        Ok(tr)
    }

    fn fresh(
        &self,
        tc: &TrainConfig,
        data: &Packed,
        dtype: DType,
        device: &Device,
    ) -> Result<Trainer> {
        let Some(mut cfg) = given_config(self.config.as_deref(), self.model.as_deref())? else {
            bail!("give --config FILE.json or --model PRESET");
        };
        if let Some((query, layers)) = self.control {
            cfg.control = Some(control_block(&cfg, data, query, layers)?);
        }
        if let Some(c) = cfg.control.as_mut() {
            ensure!(
                (0.0..1.0).contains(&self.control_dropout),
                "--control-dropout {} must be in [0, 1)",
                self.control_dropout
            );
            c.dropout = self.control_dropout;
        }
        let mut tr = Trainer::new(&cfg, tc, dtype, device)?;
        if let Some(p) = &self.init_from {
            let fresh = tr.init_from(p)?;
            eprintln!(
                "--init-from {}: {} tensors loaded, {} new ({})",
                p.display(),
                tr.parameters().count() - fresh.len(),
                fresh.len(),
                if fresh.is_empty() {
                    "none"
                } else {
                    "control.*"
                }
            );
        }
        Ok(tr)
    }
}

/// The `control` block `--control` adds: channels and patch from the data's conditions; a
/// config's own block is kept as it is (if its query agrees).
fn control_block(
    cfg: &ArpgConfig,
    data: &Packed,
    query: ControlQuery,
    layers: usize,
) -> Result<ControlConfig> {
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
        None => Ok(ControlConfig {
            channels: c,
            patch: h / g,
            layers,
            query,
            dropout: 0.0,
        }),
    }
}

/// The data's samples must be the model's length, their labels and tokens in its range.
fn check_data(data: &Packed, mc: &ArpgConfig) -> Result<()> {
    if data.seq_len != mc.block_size {
        bail!(
            "--data {}: samples have {} tokens, the model's block_size is {}",
            data.path.display(),
            data.seq_len,
            mc.block_size
        );
    }
    if data.max_label() as usize >= mc.num_classes || data.max_token() as usize >= mc.vocab_size {
        bail!(
            "--data {}: labels up to {} / tokens up to {} do not fit num_classes {} / vocab_size {}",
            data.path.display(),
            data.max_label(),
            data.max_token(),
            mc.num_classes,
            mc.vocab_size
        );
    }
    Ok(())
}

impl RunDir {
    /// Refuse an `out` holding another run unless it is resumed from there (`resume`) or
    /// started over (`fresh_log`, `--overwrite`).
    pub fn check_available(&self, resume: Option<&Path>) -> Result<()> {
        let found: Vec<&str> = RUN_FILES
            .iter()
            .copied()
            .filter(|f| self.out.join(f).exists())
            .collect();
        if found.is_empty() || self.fresh_log {
            return Ok(());
        }
        let ckpt = self.checkpoint();
        let Some(r) = resume else {
            bail!(
                "--out {} already holds a training run ({}): continue it with --resume {}, or pass \
                 --overwrite to start over (its checkpoints are replaced, its log emptied)",
                self.out.display(),
                found.join(", "),
                ckpt.display()
            );
        };
        let same = match (std::fs::canonicalize(r), std::fs::canonicalize(&ckpt)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        };
        ensure!(
            same,
            "--out {} holds another training run ({}) than --resume {}: resuming would replace \
             it; give another --out, or --resume {}",
            self.out.display(),
            found.join(", "),
            r.display(),
            ckpt.display()
        );
        Ok(())
    }
}

/// What `arpg train` asks for: the data, the run's folder, where the model comes from, the
/// recipe, the reference's flags and the device. [`TrainJob::prepare`] sets the run up.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub data: PathBuf,
    pub dir: RunDir,
    pub source: ModelSource,
    /// The recipe. Its `lr` and `min_lr` are derived from the fields below by
    /// [`learning_rates`]; the reference's flags may set its batch, steps and warm-up.
    pub recipe: TrainConfig,
    /// Peak learning rate per 256 samples of batch, or as given with `lr_absolute`.
    pub lr: f64,
    pub lr_absolute: bool,
    /// Final learning rate (default: a tenth of the peak).
    pub min_lr: Option<f64>,
    /// Stop after this step (the schedule still spans `recipe.steps`).
    pub until: Option<usize>,
    pub reference: TrainFlags,
    /// The device of a single process; a worker of several takes `cuda:LOCAL_RANK`.
    pub placement: Placement,
}

/// A run set up on this process: the trainer at its first step, the data, the step it stops
/// after, and the folder it writes (rank 0's; other ranks write nothing).
pub struct Prepared {
    pub trainer: Trainer,
    pub data: Packed,
    pub until: usize,
    pub dir: Option<RunDir>,
    /// Steps between checkpoints, on every rank (all take part in one under ZeRO-1).
    pub ckpt_every: usize,
}

impl Prepared {
    /// [`super::run::run`]: train until `until`, writing `dir` on rank 0.
    pub fn run(
        &mut self,
        on_step: &mut dyn FnMut(&super::StepStats, Option<&serde_json::Value>),
    ) -> Result<()> {
        let dir = self.dir.as_ref();
        let every = self.ckpt_every;
        super::run::run(
            &mut self.trainer,
            &self.data,
            self.until,
            dir,
            every,
            on_step,
        )
    }
}

impl TrainJob {
    /// Whether `--gpus n` makes this process launch one worker per GPU
    /// ([`super::dist::spawn_workers`]) instead of training itself.
    pub fn launches(gpus: usize) -> Result<bool> {
        if gpus > 1 && !cfg!(feature = "nccl") {
            bail!("--gpus {gpus} needs a build with NCCL: scripts/build-cuda.sh --nccl");
        }
        super::dist::should_spawn(gpus)
    }

    /// This process's device and dtype, and its place among several (from the launcher's
    /// variables), if it is one.
    fn placement(&self) -> Result<(Device, DType, Option<DistEnv>)> {
        let Some(d) = DistEnv::of_run()? else {
            let (device, dtype) = self.placement.resolve()?;
            return Ok((device, dtype, None));
        };
        if !cfg!(feature = "nccl") {
            bail!(
                "multi-process training (WORLD_SIZE={}) needs a build with NCCL: \
                 scripts/build-cuda.sh --nccl",
                d.world_size
            );
        }
        let worker = Placement {
            device: d.worker_device(),
            dtype: self.placement.dtype.clone(),
        };
        let (device, dtype) = worker.resolve()?;
        Ok((device, dtype, Some(d)))
    }

    /// The flags checked, the reference's flags applied, the learning rates derived, the
    /// output folder guarded (rank 0), the trainer built or resumed and joined to its ranks.
    pub fn prepare(mut self) -> Result<Prepared> {
        let (device, dtype, dist) = self.placement()?;
        let main_rank = dist.as_ref().is_none_or(|d| d.rank == 0);
        ensure!(self.dir.log_every >= 1, "--log-every must be at least 1");
        ensure!(self.dir.ckpt_every >= 1, "--ckpt-every must be at least 1");
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr {} must be a positive number",
            self.lr
        );
        // The reference's flags set the batch and make --lr absolute: before the peak is derived.
        let data = Packed::open(&self.data)?;
        self.reference.clone().apply(&mut self, data.len())?;
        let batch = self.recipe.batch_size;
        let (lr, min_lr) = learning_rates(self.lr, self.lr_absolute, batch, self.min_lr)?;
        if main_rank {
            self.dir.check_available(self.source.resume.as_deref())?;
        }
        let tc = TrainConfig {
            lr,
            min_lr,
            ..self.recipe
        };
        tc.validate()?;
        #[allow(unused_mut)]
        let mut tr = self.source.trainer(&tc, &data, dtype, &device)?;
        #[cfg(feature = "nccl")]
        if let Some(d) = &dist {
            let group = super::dist::NcclGroup::connect(d, &device)?;
            tr.set_group(Box::new(group))?;
        }
        let until = self.until.unwrap_or(tc.steps).min(tc.steps);
        if tr.step >= until {
            bail!(
                "nothing to do: the checkpoint is at step {}, --until/--steps is {until}",
                tr.step
            );
        }
        Ok(Prepared {
            trainer: tr,
            data,
            until,
            ckpt_every: self.dir.ckpt_every,
            dir: main_rank.then_some(self.dir),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> TrainJob {
        TrainJob {
            data: "missing.pack".into(),
            dir: RunDir {
                out: "results".into(),
                log_every: 10,
                ckpt_every: 500,
                fresh_log: false,
            },
            source: ModelSource::default(),
            recipe: TrainConfig::default(),
            lr: 1e-4,
            lr_absolute: false,
            min_lr: None,
            until: None,
            reference: TrainFlags::default(),
            placement: Placement {
                device: "cpu".into(),
                dtype: "f32".into(),
            },
        }
    }

    fn err(j: TrainJob) -> String {
        format!("{:#}", j.prepare().err().expect("refused"))
    }

    #[test]
    fn a_train_job_checks_its_flags_before_it_opens_the_data() {
        let mut j = job();
        j.dir.log_every = 0;
        assert!(err(j).contains("--log-every"));
        let mut j = job();
        j.lr = f64::NAN;
        assert!(err(j).contains("--lr NaN must be a positive number"));
        let e = err(job());
        assert!(e.contains("missing.pack"), "then the data: {e}");
        assert!(!TrainJob::launches(1).unwrap());
        assert!(TrainJob::launches(0).is_err());
    }

    #[test]
    fn learning_rates_scale_by_batch_unless_absolute() {
        let (peak, min) = learning_rates(1e-4, false, 512, None).unwrap();
        assert!((peak - 2e-4).abs() < 1e-12 && (min - 2e-5).abs() < 1e-12);
        assert_eq!(
            learning_rates(1e-4, true, 512, Some(0.0)).unwrap(),
            (1e-4, 0.0)
        );
        assert!(learning_rates(1e-4, true, 512, Some(1.0)).is_err());
    }
}
