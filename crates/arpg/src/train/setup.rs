//! A run's set-up before its first step, from what a command line asks for: the learning
//! rates derived and checked, the trainer built fresh or resumed, the data checked against the
//! model, and the output folder guarded against replacing another run. Errors name the flags
//! of `arpg train`, where they are fixed.

use super::run::{RunDir, RUN_FILES};
use super::{scaled_lr, TrainConfig, Trainer};
use crate::config::{ArpgConfig, ControlConfig, ControlQuery};
use crate::data::Packed;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device};
use std::path::Path;

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
pub struct ModelSource<'a> {
    pub config: Option<&'a Path>,
    pub model: Option<&'a str>,
    /// Continue this training checkpoint (`--config`, if given, must be its config).
    pub resume: Option<&'a Path>,
    /// Start from these inference weights instead of a fresh initialisation.
    pub init_from: Option<&'a Path>,
    /// Add a control encoder with this query and these layers, shaped by the data's conditions.
    pub control: Option<(ControlQuery, usize)>,
    /// The probability of dropping a control model's condition, recorded in its config.
    pub control_dropout: f64,
}

impl ModelSource<'_> {
    pub fn trainer(
        &self,
        tc: &TrainConfig,
        data: &Packed,
        dtype: DType,
        device: &Device,
    ) -> Result<Trainer> {
        let tr = match self.resume {
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
        if let Some(c) = self.config {
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
        let Some(mut cfg) = given_config(self.config, self.model)? else {
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
        if let Some(p) = self.init_from {
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
