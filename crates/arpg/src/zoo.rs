//! Where models come from: a preset or config file, plus local weights, the official
//! checkpoints on the hub, or a random initialisation.

use crate::checkpoint::{build_strict, hub, random_var_builder_dense, StateDict, Weights};
use crate::config::{ArpgConfig, VqConfig, PRESETS};
use crate::model::Arpg;
use crate::sampler::MaskSchedule;
use crate::tokenizer::vq::VqModel;
use crate::tokenizer::ImageTokenizer;
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

/// ImageNet classes shown when none are asked for (LlamaGen's demo classes).
const DEMO_CLASSES: &[usize] = &[207, 360, 387, 974, 88, 979, 417, 279];

/// The classes to sample when none are given: a few ImageNet demo classes for a 1000-class
/// model, else every class.
pub fn demo_classes(num_classes: usize) -> Vec<usize> {
    match num_classes {
        1000 => DEMO_CLASSES.to_vec(),
        n => (0..n).collect(),
    }
}

/// The model a command uses when none is named: the official ARPG-L if its weights are
/// cached, else the shipped digits model, so that a fresh offline machine still runs a real
/// model.
pub fn default_model() -> &'static str {
    match official_weights_cached() {
        true => "ARPG-L",
        false => DIGITS,
    }
}

/// Guidance scale when none is given and the model is no official preset.
pub const DEFAULT_CFG: f32 = 4.0;

impl ModelSpec {
    /// The guidance scale: `given`, else the paper's for an official preset named without a
    /// config file ([`paper_cfg`]), else [`DEFAULT_CFG`].
    pub fn guidance_scale(&self, given: Option<f32>, schedule: MaskSchedule) -> f32 {
        let preset = self.model.as_deref().filter(|_| self.config.is_none());
        given
            .or_else(|| preset.and_then(|p| paper_cfg(p, schedule)))
            .unwrap_or(DEFAULT_CFG)
    }

    /// Whether nothing names a model (no preset, config, weights nor random init).
    pub fn names_nothing(&self) -> bool {
        self.model.is_none() && self.config.is_none() && self.weights.is_none() && !self.random
    }

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

    /// The model for inference: decoding steps take the fused kernels where they apply
    /// ([`Arpg::fuse_for_decoding`]).
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Arpg> {
        let mut model = self.load_unfused(dtype, device)?;
        model.fuse_for_decoding(false)?;
        Ok(model)
    }

    /// The model with every step on the generic ops (what the fused step is checked against).
    pub fn load_unfused(&self, dtype: DType, device: &Device) -> Result<Arpg> {
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

/// Which image tokenizer a model gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerKind {
    /// `pixel` for a model with the pixel tokenizer's 17-token vocabulary, else `vq`.
    #[default]
    Auto,
    Vq,
    Pixel,
}

impl std::str::FromStr for TokenizerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "vq" => Ok(Self::Vq),
            "pixel" => Ok(Self::Pixel),
            _ => bail!("unknown tokenizer {s:?} (expected auto, vq or pixel)"),
        }
    }
}

/// How to build the image tokenizer: its kind, the VQ model, and the VQ decoder's precision
/// (`auto`, `tf32`, `f32`, `bf16`, `f16`: see [`resolve_vq_dtype`]).
#[derive(Debug, Clone)]
pub struct TokenizerSpec {
    pub kind: TokenizerKind,
    pub vq: VqSpec,
    pub vq_dtype: String,
}

impl TokenizerSpec {
    /// Whether a model with `vocab_size` image tokens gets the pixel tokenizer.
    pub fn is_pixel(&self, vocab_size: usize) -> bool {
        match self.kind {
            TokenizerKind::Pixel => true,
            TokenizerKind::Vq => false,
            TokenizerKind::Auto => vocab_size == crate::tokenizer::pixel::LEVELS as usize,
        }
    }

    /// Pixels per token side for a model with `vocab_size` tokens, without loading weights.
    pub fn patch_size(&self, vocab_size: usize) -> Result<usize> {
        match self.is_pixel(vocab_size) {
            true => Ok(1),
            false => Ok(self.vq.config()?.patch_size()),
        }
    }

    /// The tokenizer for a model with `vocab_size` image tokens computing in `dtype`.
    pub fn load(&self, vocab_size: usize, dtype: DType, device: &Device) -> Result<ImageTokenizer> {
        if self.is_pixel(vocab_size) {
            if vocab_size != crate::tokenizer::pixel::LEVELS as usize {
                bail!("--tokenizer pixel needs a model with 17 image tokens, this one has {vocab_size}");
            }
            return Ok(ImageTokenizer::Pixel);
        }
        let vq = self
            .vq
            .load(resolve_vq_dtype(&self.vq_dtype, dtype, device)?, device)?;
        if vq.config().codebook_size != vocab_size {
            bail!(
                "the VQ codebook has {} entries but the model {vocab_size} image tokens",
                vq.config().codebook_size
            );
        }
        Ok(ImageTokenizer::Vq(Box::new(vq)))
    }

    /// The tokenizer of a command without a model (`encode`, `decode`, `tokenize`): pixel
    /// when asked for, else the VQ tokenizer in `dtype`.
    pub fn load_standalone(&self, dtype: DType, device: &Device) -> Result<ImageTokenizer> {
        Ok(match self.kind {
            TokenizerKind::Pixel => ImageTokenizer::Pixel,
            _ => ImageTokenizer::Vq(Box::new(self.vq.load(dtype, device)?)),
        })
    }
}

/// The dtype the VQ decoder loads in for a model computing in `model_dtype`: `tf32` (and
/// `auto` on a GPU) is f32 whose convolutions may use TF32 tensor cores (set here, for the
/// process); `auto` on the CPU is the model's dtype.
pub fn resolve_vq_dtype(s: &str, model_dtype: DType, device: &Device) -> Result<DType> {
    let tf32 = s == "tf32" || (s == "auto" && device.is_cuda());
    crate::kernels::cudnn::set_allow_tf32(tf32);
    match s {
        _ if tf32 => Ok(DType::F32),
        "auto" => Ok(model_dtype),
        other => crate::device::parse_dtype(other),
    }
}

/// Where a command computes: a device (`cpu`, `cuda`, `cuda:N`) and a precision (`f32`,
/// `bf16`, `f16`, or the reference's names), as given; parsed when the work starts, so that a
/// command's other checks come first.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: String,
    pub dtype: String,
}

impl Placement {
    pub fn resolve(&self) -> Result<(Device, DType)> {
        Ok((
            crate::device::parse_device(&self.device)?,
            crate::device::parse_dtype(&self.dtype)?,
        ))
    }

    /// [`Placement::resolve`] with the device's generator seeded, for sampling.
    pub fn resolve_seeded(&self, seed: u64) -> Result<(Device, DType)> {
        let (d, t) = self.resolve()?;
        crate::device::seed(&d, seed)?;
        Ok((d, t))
    }
}

/// A model, the image tokenizer it gets and their device: what the sampling, editing and
/// serving commands load.
pub struct Loaded {
    pub model: Arpg,
    pub tokenizer: ImageTokenizer,
    pub device: Device,
}

impl Loaded {
    /// The model of `spec` and the tokenizer of `tokenizer` (random VQ weights with a random
    /// model) on the device of `placement`, seeded with `spec.seed`.
    pub fn load(
        spec: &ModelSpec,
        tokenizer: &TokenizerSpec,
        placement: &Placement,
    ) -> Result<Self> {
        let (device, dtype) = placement.resolve_seeded(spec.seed)?;
        let model = spec.load(dtype, &device)?;
        let tokenizer = tokenizer.load(model.config().vocab_size, dtype, &device)?;
        Ok(Self {
            model,
            tokenizer,
            device,
        })
    }
}

impl ModelSpec {
    /// No model named: the spec of [`default_model`], whose name is returned.
    pub fn or_default(&mut self) -> Option<&'static str> {
        let m = self.names_nothing().then(default_model)?;
        self.model = Some(m.into());
        Some(m)
    }

    /// The name a server reports for this model: the preset, else the config file, else
    /// `random` for a random model, else the default model's (before [`ModelSpec::or_default`]).
    pub fn display_name(&self) -> String {
        self.model
            .clone()
            .or_else(|| self.config.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_else(|| match self.random {
                true => "random".into(),
                false => default_model().into(),
            })
    }
}

/// The built-in digits model with its tokenizer, on the CPU in f32: what the jobs' unit tests
/// run.
#[cfg(test)]
pub(crate) fn digits_on_cpu() -> (ModelSpec, TokenizerSpec, Placement) {
    (
        ModelSpec {
            model: Some(DIGITS.into()),
            ..Default::default()
        },
        TokenizerSpec {
            kind: TokenizerKind::Auto,
            vq: VqSpec::default(),
            vq_dtype: "auto".into(),
        },
        Placement {
            device: "cpu".into(),
            dtype: "f32".into(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_parses_when_resolved_and_loaded_pairs_model_and_tokenizer() {
        let p = |d: &str, t: &str| Placement {
            device: d.into(),
            dtype: t.into(),
        };
        assert!(p("tpu", "f32").resolve().is_err());
        assert!(p("cpu", "f64").resolve().is_err());
        let spec = ModelSpec {
            model: Some(DIGITS.into()),
            ..Default::default()
        };
        let tk = TokenizerSpec {
            kind: TokenizerKind::Auto,
            vq: VqSpec::default(),
            vq_dtype: "auto".into(),
        };
        let l = Loaded::load(&spec, &tk, &p("cpu", "f32")).unwrap();
        assert_eq!(l.model.config().vocab_size, 17);
        assert!(matches!(l.tokenizer, ImageTokenizer::Pixel));
    }

    #[test]
    fn the_name_a_server_reports() {
        let named = ModelSpec {
            model: Some("ARPG-XL".into()),
            ..Default::default()
        };
        assert_eq!(named.display_name(), "ARPG-XL");
        let config = ModelSpec {
            config: Some("m/config.json".into()),
            ..Default::default()
        };
        assert_eq!(config.display_name(), "m/config.json");
        let random = ModelSpec {
            random: true,
            ..Default::default()
        };
        assert_eq!(random.display_name(), "random");
        let mut nothing = ModelSpec::default();
        assert_eq!(nothing.display_name(), default_model());
        assert_eq!(nothing.or_default(), Some(default_model()));
        assert_eq!(nothing.model.as_deref(), Some(default_model()));
        assert_eq!(named.clone().or_default(), None, "a named model is kept");
    }
}
