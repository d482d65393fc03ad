//! Argument groups shared by several commands.

use anyhow::{Context, Result};
use arpg::sampler::{SampleConfig, TokenFilter};
use arpg::tokenizer::ImageTokenizer;
use arpg::zoo::{ModelSpec, VqSpec};
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset: ARPG-L, ARPG-XL or ARPG-XXL. Without --weights the official checkpoint
    /// is fetched from the Hugging Face hub (hp-l33/ARPG) into the HF cache.
    #[arg(long)]
    pub model: Option<String>,
    /// Model config JSON with the reference's keys (dim, n_layer, n_head, vocab_size,
    /// num_classes, block_size; optional multiple_of, norm_eps, rope_base, ffn_dim_multiplier,
    /// cls_token_num). Overrides --model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint: PyTorch .pt (state dict at the top level or under model / state_dict /
    /// module) or .safetensors.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Take the checkpoint's EMA weights (`ema`).
    #[arg(long)]
    pub ema: bool,
    /// `random`: a randomly initialised model (and VQ tokenizer, unless --vq-weights), for
    /// benchmarks and tests.
    #[arg(long, value_parser = ["random"])]
    pub init: Option<String>,
}

impl ModelArgs {
    pub fn spec(&self, seed: u64) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            config: self.config.clone(),
            weights: self.weights.clone(),
            random: self.init.is_some(),
            ema: self.ema,
            seed,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct VqArgs {
    /// VQ tokenizer config JSON (ch, ch_mult, z_channels, codebook_size, embed_dim,
    /// num_res_blocks). Default: the official VQ-16.
    #[arg(long)]
    pub vq_config: Option<PathBuf>,
    /// VQ tokenizer checkpoint (.pt or .safetensors). Default: vq_ds16_c2i.pt from
    /// FoundationVision/LlamaGen on the hub.
    #[arg(long)]
    pub vq_weights: Option<PathBuf>,
    /// Image tokenizer: vq, pixel (one token per grayscale pixel, 17 levels: the digits
    /// model's), or auto (pixel for models with a 17-token vocabulary, else vq).
    #[arg(long, default_value = "auto", value_parser = ["auto", "vq", "pixel"])]
    pub tokenizer: String,
}

impl VqArgs {
    /// The tokenizer for a model with `vocab_size` image tokens.
    pub fn tokenizer(
        &self,
        vocab_size: usize,
        random: bool,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<ImageTokenizer> {
        let pixel = match self.tokenizer.as_str() {
            "pixel" => true,
            "vq" => false,
            _ => vocab_size == arpg::tokenizer::pixel::LEVELS as usize,
        };
        if pixel {
            if vocab_size != arpg::tokenizer::pixel::LEVELS as usize {
                anyhow::bail!("--tokenizer pixel needs a model with 17 image tokens, this one has {vocab_size}");
            }
            return Ok(ImageTokenizer::Pixel);
        }
        let vq = self.spec(random, seed).load(dtype, device)?;
        if vq.config().codebook_size != vocab_size {
            anyhow::bail!(
                "the VQ codebook has {} entries but the model {vocab_size} image tokens",
                vq.config().codebook_size
            );
        }
        Ok(ImageTokenizer::Vq(Box::new(vq)))
    }

    pub fn spec(&self, random: bool, seed: u64) -> VqSpec {
        VqSpec {
            config: self.vq_config.clone(),
            weights: self.vq_weights.clone(),
            random,
            seed,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, bf16 or f16 (logits and sampling are always f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DeviceArgs {
    pub fn resolve(&self) -> Result<(Device, DType)> {
        Ok((
            arpg::device::parse_device(&self.device)?,
            arpg::device::parse_dtype(&self.dtype)?,
        ))
    }

    /// The device with its generator seeded, for sampling.
    pub fn resolve_seeded(&self, seed: u64) -> Result<(Device, DType)> {
        let (d, t) = self.resolve()?;
        arpg::device::seed(&d, seed)?;
        Ok((d, t))
    }
}

/// The decoding flags shared by `sample`, `inpaint` and `outpaint`; defaults are the paper's.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Decoding steps (1..=tokens per image). Each step predicts many tokens in parallel.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Classifier-free guidance scale: 0 = unconditional, 1 = conditional only (no guidance).
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f32,
    /// Guidance over the steps: constant, or linear from 1 to --cfg as tokens are decoded.
    #[arg(long, default_value = "linear")]
    pub cfg_schedule: String,
    /// Masking schedule: arccos (paper default) or cosine.
    #[arg(long, default_value = "arccos")]
    pub schedule: String,
    /// Softmax temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed: the same seed gives the same images on the same device.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// On CUDA, decode every batch eagerly instead of capturing the first batch of each shape
    /// as a CUDA graph and replaying it (same tokens, slower; for debugging).
    #[arg(long)]
    pub no_cuda_graph: bool,
}

impl SamplingArgs {
    /// The graph cache that a sampling run keeps across its batches.
    pub fn graphs(&self) -> arpg::sampler::DecodeGraphs {
        arpg::sampler::DecodeGraphs::new(!self.no_cuda_graph)
    }

    /// The sampler's settings, validated.
    pub fn config(&self) -> Result<SampleConfig> {
        let sc = SampleConfig {
            steps: self.steps,
            cfg: self.cfg,
            cfg_schedule: self.cfg_schedule.parse().context("--cfg-schedule")?,
            schedule: self.schedule.parse().context("--schedule")?,
            filter: TokenFilter {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
            },
        };
        sc.filter.validate()?;
        if !(self.cfg >= 0.0 && self.cfg.is_finite()) {
            anyhow::bail!("--cfg {} must be >= 0", self.cfg);
        }
        Ok(sc)
    }
}
