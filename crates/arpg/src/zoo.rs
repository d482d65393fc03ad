//! Where models come from: a preset or config file, plus local weights, the official
//! checkpoints on the hub, or a random initialisation.

use crate::checkpoint::{build_strict, hub, random_var_builder_dense, StateDict, Weights};
use crate::config::{ArpgConfig, VqConfig, PRESETS};
use crate::model::Arpg;
use crate::sampler::MaskSchedule;
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

/// The name of the small digits model that ships inside the binary.
pub const DIGITS: &str = "digits";

const DIGITS_CONFIG: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/digits/config.json"
));
const DIGITS_WEIGHTS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/digits/model.safetensors"
));

/// The name of the shipped sketch-controlled digits model (the `digits` model fine-tuned with
/// a control encoder that reads each digit's stroke mask).
pub const DIGITS_SKETCH: &str = "digits-sketch";

const DIGITS_SKETCH_CONFIG: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/digits-sketch/config.json"
));
const DIGITS_SKETCH_WEIGHTS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/digits-sketch/model.safetensors"
));

/// The models built into the binary: name, config JSON, safetensors weights.
const BUILT_IN: &[(&str, &str, &[u8])] = &[
    (DIGITS, DIGITS_CONFIG, DIGITS_WEIGHTS),
    (DIGITS_SKETCH, DIGITS_SKETCH_CONFIG, DIGITS_SKETCH_WEIGHTS),
];

/// Configuration of the shipped digits model (8x8 pixel tokens, 17 levels, 10 classes).
pub fn digits_config() -> ArpgConfig {
    serde_json::from_str(DIGITS_CONFIG).expect("models/digits/config.json is valid")
}

/// Configuration of the shipped `digits-sketch` model.
pub fn digits_sketch_config() -> ArpgConfig {
    serde_json::from_str(DIGITS_SKETCH_CONFIG).expect("models/digits-sketch/config.json is valid")
}

/// The guidance scale the paper gives an official preset: the README's model zoo for the
/// cosine schedule (4.5 / 6.0 / 7.5) and GETTING_STARTED.md's arccos commands (5.0 / 6.0 /
/// 7.5). `None` for any other model.
pub fn paper_cfg(preset: &str, schedule: MaskSchedule) -> Option<f32> {
    let cosine = schedule == MaskSchedule::Cosine;
    match preset.to_ascii_uppercase().as_str() {
        "ARPG-L" if cosine => Some(4.5),
        "ARPG-L" => Some(5.0),
        "ARPG-XL" => Some(6.0),
        "ARPG-XXL" => Some(7.5),
        _ => None,
    }
}

/// Whether the official ARPG-L and VQ-16 checkpoints are already in the HF cache.
pub fn official_weights_cached() -> bool {
    let cache = hf_hub::Cache::from_env();
    cache
        .model(hub::ARPG_REPO.to_string())
        .get(PRESETS[0].4)
        .is_some()
        && cache
            .model(hub::VQ_REPO.to_string())
            .get(hub::VQ_FILE)
            .is_some()
}

impl ModelSpec {
    /// The built-in model named (without a --config), if any: (config, weights).
    fn built_in(&self) -> Option<(&'static str, &'static [u8])> {
        let name = self.model.as_deref().filter(|_| self.config.is_none())?;
        BUILT_IN
            .iter()
            .find(|b| b.0.eq_ignore_ascii_case(name))
            .map(|b| (b.1, b.2))
    }

    /// Whether this names a built-in model (`digits`, `digits-sketch`).
    pub fn is_built_in(&self) -> bool {
        self.built_in().is_some()
    }

    pub fn config(&self) -> Result<ArpgConfig> {
        match (&self.config, &self.model) {
            (Some(path), _) => ArpgConfig::from_json_file(path),
            (None, Some(_)) if self.is_built_in() => {
                let (json, _) = self.built_in().expect("checked");
                Ok(serde_json::from_str(json)?)
            }
            (None, Some(name)) => ArpgConfig::preset(name),
            (None, None) => ArpgConfig::preset("ARPG-L"),
        }
    }

    pub fn load(&self, dtype: DType, device: &Device) -> Result<Arpg> {
        let cfg = self.config()?;
        // Weights, plus the RoPE tables (cos and sin, f32, one row per position).
        let bytes = cfg.num_parameters() as u128 * dtype.size_in_bytes() as u128
            + (cfg.block_size as u128 + 1) * cfg.head_dim() as u128 * 8;
        let check_memory = || {
            crate::util::check_memory(
                bytes,
                &format!("a model of {} parameters", cfg.num_parameters()),
            )
        };
        if self.random {
            check_memory()?;
            if self.weights.is_some() {
                bail!("--init random and --weights are exclusive");
            }
            // Dense: the model's plain `get`s would all be zeros (every logit 0, token 0).
            return Arpg::new(&cfg, random_var_builder_dense(self.seed, dtype, device));
        }
        let which = if self.ema {
            Weights::Ema
        } else {
            Weights::Model
        };
        if let Some((_, weights)) = self.built_in().filter(|_| self.weights.is_none()) {
            let tensors = candle_core::safetensors::load_buffer(weights, &Device::Cpu)?;
            let sd = StateDict {
                tensors,
                source: PathBuf::from(format!(
                    "<built-in {} model>",
                    self.model.as_deref().unwrap_or_default()
                )),
            };
            return build_strict(&sd, dtype, device, |vb| Arpg::new(&cfg, vb));
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
        let sd = StateDict::load(&path, which)?;
        // Mismatches first: a wrong config must not be allocated (nor blamed on memory).
        crate::checkpoint::check_shapes(&sd, &cfg.parameter_shapes()?)?;
        check_memory()?;
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
        crate::util::check_memory(
            cfg.approx_parameters().unwrap_or(u128::MAX) * dtype.size_in_bytes() as u128,
            "the VQ tokenizer's weights",
        )?;
        let path = match &self.weights {
            Some(p) => p.clone(),
            None if self.random => {
                return VqModel::new(
                    &cfg,
                    random_var_builder_dense(
                        crate::util::seed_for(self.seed, crate::util::SeedFor::RandomVq),
                        dtype,
                        device,
                    ),
                )
            }
            None => hub::fetch(hub::VQ_REPO, hub::VQ_FILE, "--vq-weights")?,
        };
        let sd = StateDict::load(&path, Weights::Model)?;
        build_strict(&sd, dtype, device, |vb| VqModel::new(&cfg, vb))
    }
}
