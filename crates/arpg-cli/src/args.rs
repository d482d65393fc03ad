//! Argument groups shared by several commands.

use anyhow::{Context, Result};
use arpg::control::ConditionFile;
use arpg::reference::SampleFlags;
use arpg::sampler::{SampleConfig, TokenFilter};
use arpg::zoo::{ModelSpec, Placement, TokenizerSpec, VqSpec};
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset: ARPG-L, ARPG-XL or ARPG-XXL. Without --weights the official checkpoint
    /// is fetched from the Hugging Face hub (hp-l33/ARPG) into the HF cache.
    #[arg(long, visible_alias = "gpt-model")]
    pub model: Option<String>,
    /// Model config JSON with the reference's keys (dim, n_layer, n_head, vocab_size,
    /// num_classes, block_size; optional multiple_of, norm_eps, rope_base, ffn_dim_multiplier,
    /// cls_token_num). Overrides --model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint: PyTorch .pt (state dict at the top level or under model / state_dict /
    /// module) or .safetensors.
    #[arg(long, visible_alias = "gpt-ckpt")]
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
    #[arg(long, visible_alias = "vq-ckpt")]
    pub vq_weights: Option<PathBuf>,
    /// Image tokenizer: vq, pixel (one token per grayscale pixel, 17 levels: the digits
    /// model's), or auto (pixel for models with a 17-token vocabulary, else vq).
    #[arg(long, default_value = "auto", value_parser = ["auto", "vq", "pixel"])]
    pub tokenizer: String,
    /// Precision of the VQ decoder: tf32 (f32 weights, TF32 tensor-core convolutions on a
    /// GPU: what the paper's sample_c2i_ddp.py runs), f32 (exact), bf16 (the fastest on a GPU,
    /// ~1.6x tf32 on an H200, uint8 pixels ~1.4 levels off f32 on average), f16, or auto
    /// (tf32 on a GPU; on the CPU the model's --dtype, f32 for bf16).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tf32", "f32", "bf16", "f16"])]
    pub vq_dtype: String,
}

impl VqArgs {
    /// The tokenizer of these flags (`random`: random VQ weights unless --vq-weights).
    pub fn spec(&self, random: bool, seed: u64) -> Result<TokenizerSpec> {
        Ok(TokenizerSpec {
            kind: self.tokenizer.parse()?,
            vq: VqSpec {
                config: self.vq_config.clone(),
                weights: self.vq_weights.clone(),
                random,
                seed,
            },
            vq_dtype: self.vq_dtype.clone(),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, bf16 or f16 (logits and sampling are always f32). The
    /// reference's --precision / --mixed-precision names (none = f32, bf16, fp16) are accepted;
    /// its default is bf16, ours f32.
    #[arg(long, default_value = "f32", visible_aliases = ["precision", "mixed-precision"])]
    pub dtype: String,
}

impl DeviceArgs {
    pub fn placement(&self) -> Placement {
        Placement {
            device: self.device.clone(),
            dtype: self.dtype.clone(),
        }
    }

    pub fn resolve(&self) -> Result<(Device, DType)> {
        self.placement().resolve()
    }
}

/// The decoding flags shared by `sample`, `inpaint` and `outpaint`; defaults are the paper's.
/// The reference's names (`sample_c2i_ddp.py`) are aliases with the same meaning.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Decoding steps (1..=tokens per image). Each step predicts many tokens in parallel.
    #[arg(long, default_value_t = 64, visible_alias = "step")]
    pub steps: usize,
    /// Classifier-free guidance scale: 0 = unconditional, 1 = conditional only (no guidance).
    /// Default: the paper's scale for an official preset (ARPG-L 5.0 with arccos / 4.5 with
    /// cosine, ARPG-XL 6.0, ARPG-XXL 7.5: the README model zoo and GETTING_STARTED.md), else
    /// 4.0.
    #[arg(long, visible_alias = "cfg-scale")]
    pub cfg: Option<f32>,
    /// Guidance over the steps: constant, or linear from 1 to --cfg as tokens are decoded.
    #[arg(long, default_value = "linear")]
    pub cfg_schedule: String,
    /// Masking schedule: arccos (paper default) or cosine.
    #[arg(long, default_value = "arccos", visible_alias = "sample-schedule")]
    pub schedule: String,
    /// Softmax temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off). Unlike the reference's script, which
    /// parses --top-k / --top-p and never uses them, these take effect.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed: the same seed gives the same images on the same device (not the same
    /// images as the reference's PyTorch generator).
    #[arg(long, default_value_t = 0, visible_alias = "global-seed")]
    pub seed: u64,
    /// On CUDA, decode every batch eagerly instead of capturing the first batch of each shape
    /// as a CUDA graph and replaying it (same tokens, slower; for debugging).
    #[arg(long)]
    pub no_cuda_graph: bool,
    #[command(flatten)]
    pub reference: ReferenceSampleFlags,
}

/// The condition of a control model (controllable generation), shared by `sample` and
/// `inpaint`.
#[derive(Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// A condition image for a control model (edges, a depth map, a segmentation, a sketch;
    /// single-channel or RGB), applied to every image of the call. One that is not the
    /// model's size is resized as ADM resizes (box halvings, bicubic, centre crop).
    #[arg(long)]
    pub condition: Option<PathBuf>,
    /// The --condition is a photo: its Canny edges (after the resize) are the condition.
    #[arg(long, requires = "condition")]
    pub canny: bool,
    /// Canny's low hysteresis threshold (ControlNet's default 100).
    #[arg(long, default_value_t = arpg::control::CANNY_LOW, requires = "canny")]
    pub canny_low: f32,
    /// Canny's high hysteresis threshold (ControlNet's default 200).
    #[arg(long, default_value_t = arpg::control::CANNY_HIGH, requires = "canny")]
    pub canny_high: f32,
    /// Write the condition actually used (resized, edges extracted) to this PNG.
    #[arg(long, requires = "condition")]
    pub condition_out: Option<PathBuf>,
    /// What guidance acts on: `joint` (the unconditional half drops the class and the
    /// condition: CFG over both; the default for a model trained with condition dropout) or
    /// `class` (both halves keep the condition; the default, and the only choice, for a model
    /// trained without).
    #[arg(long, value_parser = ["joint", "class"], requires = "condition")]
    pub control_guidance: Option<String>,
}

impl ControlArgs {
    /// The condition asked for, if any (loaded by [`ConditionFile::load`]).
    pub fn file(&self) -> Option<ConditionFile> {
        Some(ConditionFile {
            path: self.condition.clone()?,
            canny: self.canny.then_some((self.canny_low, self.canny_high)),
            out: self.condition_out.clone(),
            joint_guidance: self.control_guidance.as_deref().map(|g| g == "joint"),
        })
    }
}

impl SamplingArgs {
    /// The sampler's settings for the model of `spec`, as the flags give them; the library
    /// checks them when the request is built.
    pub fn config(&self, spec: &ModelSpec) -> Result<SampleConfig> {
        let schedule = self.schedule.parse().context("--schedule")?;
        let mcfg = spec.config()?;
        self.reference.flags().check(&mcfg)?;
        Ok(SampleConfig {
            steps: self.steps,
            cfg: spec.guidance_scale(self.cfg, schedule),
            cfg_schedule: self.cfg_schedule.parse().context("--cfg-schedule")?,
            schedule,
            filter: TokenFilter {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
            },
        })
    }
}

/// Flags of the reference's `sample_c2i_ddp.py` that this tool has no choice for: accepted so
/// that its commands run as typed, when they ask for what the loaded model is; any other value
/// is an error naming the flag.
#[derive(Args, Debug, Clone, Default)]
pub struct ReferenceSampleFlags {
    #[arg(long, hide = true)]
    pub vq_model: Option<String>,
    #[arg(long, hide = true)]
    pub gpt_type: Option<String>,
    #[arg(long, hide = true)]
    pub image_size: Option<usize>,
    #[arg(long, hide = true)]
    pub image_size_eval: Option<usize>,
    #[arg(long, hide = true)]
    pub downsample_size: Option<usize>,
    #[arg(long, hide = true)]
    pub codebook_size: Option<usize>,
    #[arg(long, hide = true)]
    pub codebook_embed_dim: Option<usize>,
    #[arg(long, hide = true)]
    pub num_classes: Option<usize>,
    #[arg(long, hide = true)]
    pub cls_token_num: Option<usize>,
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub cfg_interval: Option<f32>,
    /// The reference's FSDP checkpoint layout (state dict at the top level): detected anyway.
    #[arg(long, hide = true)]
    pub from_fsdp: bool,
    /// The reference compiles by default; CUDA graphs are our default (see --no-cuda-graph).
    #[arg(long, hide = true)]
    pub compile: bool,
}

impl ReferenceSampleFlags {
    /// The library's view: the rules are [`SampleFlags::check`]'s.
    pub fn flags(&self) -> SampleFlags {
        SampleFlags {
            vq_model: self.vq_model.clone(),
            gpt_type: self.gpt_type.clone(),
            image_size: self.image_size,
            image_size_eval: self.image_size_eval,
            downsample_size: self.downsample_size,
            codebook_size: self.codebook_size,
            codebook_embed_dim: self.codebook_embed_dim,
            num_classes: self.num_classes,
            cls_token_num: self.cls_token_num,
            cfg_interval: self.cfg_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arpg::zoo::DEFAULT_CFG;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        vq: VqArgs,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    }

    fn parse(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("arpg").chain(args.iter().copied()))
    }

    fn cfg(args: &[&str]) -> f32 {
        let f = parse(args);
        f.sampling.config(&f.model.spec(0)).unwrap().cfg
    }

    #[test]
    fn presets_get_the_papers_guidance_scale_unless_cfg_is_given() {
        assert_eq!(cfg(&["--model", "ARPG-L"]), 5.0);
        assert_eq!(
            cfg(&["--gpt-model", "ARPG-L", "--sample-schedule", "cosine"]),
            4.5
        );
        assert_eq!(cfg(&["--model", "arpg-xl"]), 6.0);
        assert_eq!(cfg(&["--model", "ARPG-XXL", "--schedule", "cosine"]), 7.5);
        assert_eq!(cfg(&["--model", "ARPG-XXL", "--cfg-scale", "2"]), 2.0);
        assert_eq!(cfg(&["--model", "digits"]), DEFAULT_CFG);
    }

    #[test]
    fn the_references_flag_names_set_our_fields() {
        let f = parse(&[
            "--gpt-model",
            "ARPG-XL",
            "--gpt-ckpt",
            "arpg_700m.pt",
            "--vq-ckpt",
            "vq_ds16_c2i.pt",
            "--step",
            "32",
            "--global-seed",
            "7",
            "--precision",
            "none",
        ]);
        assert_eq!(f.model.model.as_deref(), Some("ARPG-XL"));
        assert_eq!(f.model.weights, Some(PathBuf::from("arpg_700m.pt")));
        assert_eq!(f.vq.vq_weights, Some(PathBuf::from("vq_ds16_c2i.pt")));
        assert_eq!((f.sampling.steps, f.sampling.seed), (32, 7));
        assert_eq!(f.device.resolve().unwrap().1, DType::F32);
        let f = parse(&["--mixed-precision", "fp16"]);
        assert_eq!(f.device.resolve().unwrap().1, DType::F16);
    }
}
