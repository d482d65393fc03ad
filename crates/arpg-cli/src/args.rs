//! Argument groups shared by several commands.

use anyhow::Result;
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
}

impl VqArgs {
    pub fn spec(&self, random: bool, seed: u64) -> VqSpec {
        VqSpec { config: self.vq_config.clone(), weights: self.vq_weights.clone(), random, seed }
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
        Ok((arpg::device::parse_device(&self.device)?, arpg::device::parse_dtype(&self.dtype)?))
    }
}
