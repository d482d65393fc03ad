//! Where models come from: a preset or config file, plus local weights, the official
//! checkpoints on the hub, or a random initialisation.

use crate::checkpoint::{build_strict, hub, random_var_builder, StateDict, Weights};
use crate::config::{ArpgConfig, VqConfig, PRESETS};
use crate::model::Arpg;
use crate::tokenizer::vq::VqModel;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// How to build the ARPG transformer.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    /// A preset name (`ARPG-L`, `ARPG-XL`, `ARPG-XXL`); ignored when `config` is given.
    pub model: Option<String>,
    pub config: Option<PathBuf>,
    pub weights: Option<PathBuf>,
    /// Random weights (for benchmarks and tests) instead of a checkpoint.
    pub random: bool,
    pub ema: bool,
    pub seed: u64,
}

impl ModelSpec {
    pub fn config(&self) -> Result<ArpgConfig> {
        match (&self.config, &self.model) {
            (Some(path), _) => ArpgConfig::from_json_file(path),
            (None, Some(name)) => ArpgConfig::preset(name),
            (None, None) => ArpgConfig::preset("ARPG-L"),
        }
    }

    pub fn load(&self, dtype: DType, device: &Device) -> Result<Arpg> {
        let cfg = self.config()?;
        if self.random {
            if self.weights.is_some() {
                bail!("--init random and --weights are exclusive");
            }
            return Arpg::new(&cfg, random_var_builder(self.seed, dtype, device));
        }
        let path = match (&self.weights, &self.config) {
            (Some(p), _) => p.clone(),
            (None, Some(c)) => bail!(
                "--config {} needs --weights FILE (or --init random)",
                c.display()
            ),
            (None, None) => {
                let name = self.model.as_deref().unwrap_or("ARPG-L");
                let file = PRESETS
                    .iter()
                    .find(|p| p.0.eq_ignore_ascii_case(name))
                    .map(|p| p.4)
                    .context("unknown preset")?;
                hub::fetch(hub::ARPG_REPO, file, "--weights")?
            }
        };
        let which = if self.ema { Weights::Ema } else { Weights::Model };
        let sd = StateDict::load(&path, which)?;
        build_strict(&sd, dtype, device, |vb| Arpg::new(&cfg, vb))
    }
}

/// How to build the VQ tokenizer.
#[derive(Debug, Clone, Default)]
pub struct VqSpec {
    pub config: Option<PathBuf>,
    pub weights: Option<PathBuf>,
    pub random: bool,
    pub seed: u64,
}

impl VqSpec {
    pub fn config(&self) -> Result<VqConfig> {
        match &self.config {
            Some(p) => VqConfig::from_json_file(p),
            None => Ok(VqConfig::default()),
        }
    }

    pub fn load(&self, dtype: DType, device: &Device) -> Result<VqModel> {
        let cfg = self.config()?;
        let path = match &self.weights {
            Some(p) => p.clone(),
            None if self.random => {
                return VqModel::new(&cfg, random_var_builder(self.seed ^ 0x5151, dtype, device))
            }
            None => hub::fetch(hub::VQ_REPO, hub::VQ_FILE, "--vq-weights")?,
        };
        let sd = StateDict::load(&path, Weights::Model)?;
        build_strict(&sd, dtype, device, |vb| VqModel::new(&cfg, vb))
    }
}
