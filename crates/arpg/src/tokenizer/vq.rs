//! The LlamaGen VQ-16 tokenizer (VQGAN-style encoder/decoder with an l2-normalised codebook),
//! as used by ARPG. The struct tree mirrors the reference state-dict key names, so weights load
//! from any `VarBuilder` without a rename table.
//!
//! Numerics: convolutions and matmuls run in the weights' dtype; GroupNorm, the attention
//! softmax and the quantiser's distances run in f32 so bf16/f16 weights stay close to f32.

use crate::config::VqConfig;
use crate::kernels::cudnn::{self, Format};
use crate::kernels::group_norm;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;
/// `F.normalize`'s default eps.
const L2_EPS: f64 = 1e-12;
/// Rows of the quantiser's distance matrix computed at once (bounds memory at large batches).
const QUANT_CHUNK_ELEMS: usize = 1 << 24;

/// The dtype the convs run in: the weights' dtype, except bf16 on CPU, where candle's conv
/// has no bf16 kernel ("unsupported dtype BF16 for op matmul"), so those run in f32.
fn compute_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// The layout the VQ runs in on `device` with weights in `dtype`: NHWC where cuDNN runs
/// tensor-core convolutions (bf16, f16, or f32 with TF32 allowed: those kernels read NHWC
/// directly; in NCHW each pays transposes, and the decoder was 2-3x slower), else NCHW
/// (candle's convolution, and exact f32, whose NHWC kernels are 2.6x slower on the H200).
/// `ARPG_VQ_LAYOUT=nchw` keeps NCHW everywhere (A/B runs).
pub fn default_format(device: &Device, dtype: DType) -> Format {
    let nchw = std::env::var("ARPG_VQ_LAYOUT").is_ok_and(|v| v.eq_ignore_ascii_case("nchw"));
    let tensor_cores = dtype != DType::F32 || cudnn::allow_tf32();
    if cudnn::available(device) && tensor_cores && !nchw {
        Format::Nhwc
    } else {
        Format::Nchw
    }
}

/// `(n, c, h, w)` of an activation in `format`.
fn dims(x: &Tensor, format: Format) -> Result<(usize, usize, usize, usize)> {
    let (a, b, c, d) = x.dims4()?;
    Ok(match format {
        Format::Nchw => (a, b, c, d),
        Format::Nhwc => (a, d, b, c),
    })
}

/// A convolution with bias: cuDNN on CUDA where it is loaded (`kernels::cudnn`), else candle's
/// im2col + GEMM (NCHW; an NHWC activation goes through it between transposes).
struct Conv {
    /// `[cout, cin, k, k]` in NCHW, `[cout, k, k, cin]` in NHWC.
    weight: Tensor,
    bias: Tensor,
    pad: usize,
    stride: usize,
    format: Format,
}

impl Conv {
    fn kernel(&self) -> Result<usize> {
        Ok(self.weight.dim(2)?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None)
    }

    /// `conv(x) + bias + z`: cuDNN adds `z` (a residual) in the convolution's epilogue.
    fn forward_add(&self, x: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        match cudnn::conv2d(x, w, b, z, self.pad, self.stride, self.format) {
            Ok(Some(y)) => return Ok(y),
            Ok(None) => {}
            Err(e) if self.format == Format::Nhwc => {
                static WARN: std::sync::Once = std::sync::Once::new();
                WARN.call_once(|| {
                    tracing::warn!("cuDNN NHWC convolution failed ({e}); transposing to NCHW")
                });
            }
            Err(e) => return Err(e),
        }
        let y = match self.format {
            Format::Nchw => self.nchw(x, w)?,
            Format::Nhwc => {
                let w = w.permute((0, 3, 1, 2))?.contiguous()?;
                let y = self.nchw(&x.permute((0, 3, 1, 2))?.contiguous()?, &w)?;
                y.permute((0, 2, 3, 1))?.contiguous()?
            }
        };
        Ok(match z {
            Some(z) => (y + z)?,
            None => y,
        })
    }

    /// The NCHW convolution with NCHW weights `w`: cuDNN where it runs, else candle's.
    fn nchw(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let b = &self.bias;
        if self.format == Format::Nhwc {
            if let Some(y) = cudnn::conv2d(x, w, b, None, self.pad, self.stride, Format::Nchw)? {
                return Ok(y);
            }
        }
        let conv = |x: &Tensor| -> Result<Tensor> {
            let y = x.conv2d(w, self.pad, self.stride, 1, 1)?;
            Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?)
        };
        // candle's CUDA im2col indexes its buffer with 32-bit integers: past 2^31 elements
        // (a 3x3 conv over 28 images of 256x256x128) it silently writes garbage, so split the
        // batch below that.
        let (n, cin, h, wd) = x.dims4()?;
        let k = w.dim(3)?;
        let (oh, ow) = (
            (h + 2 * self.pad - k) / self.stride + 1,
            (wd + 2 * self.pad - k) / self.stride + 1,
        );
        let per_image = (oh * ow * cin * k * k).max(1);
        let chunk = ((i32::MAX as usize) / per_image).clamp(1, n.max(1));
        if x.device().is_cpu() || chunk >= n {
            return conv(x);
        }
        let parts = (0..n)
            .step_by(chunk)
            .map(|s| conv(&x.narrow(0, s, chunk.min(n - s))?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

fn conv(
    vb: VarBuilder,
    (cin, cout): (usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
    format: Format,
) -> Result<Conv> {
    let dt = compute_dtype(vb.device(), vb.dtype());
    let weight = vb.get((cout, cin, k, k), "weight")?.to_dtype(dt)?;
    let weight = match format {
        Format::Nchw => weight,
        Format::Nhwc => weight.permute((0, 2, 3, 1))?.contiguous()?,
    };
    Ok(Conv {
        weight,
        bias: vb.get(cout, "bias")?.to_dtype(dt)?,
        pad,
        stride,
        format,
    })
}

/// A conv in a profiling span named by its kernel size.
fn conv_t(c: &Conv, x: &Tensor) -> Result<Tensor> {
    conv_add_t(c, x, None)
}

/// [`conv_t`] plus `z`.
fn conv_add_t(c: &Conv, x: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
    let span = if c.kernel()? == 3 {
        tracing::trace_span!("vq.conv3x3")
    } else {
        tracing::trace_span!("vq.conv1x1")
    };
    let _enter = span.enter();
    c.forward_add(x, z)
}

fn conv3(vb: VarBuilder, cin: usize, cout: usize, f: Format) -> Result<Conv> {
    conv(vb, (cin, cout), 3, 1, 1, f)
}

fn conv1(vb: VarBuilder, cin: usize, cout: usize, f: Format) -> Result<Conv> {
    conv(vb, (cin, cout), 1, 1, 0, f)
}

/// GroupNorm(32, eps 1e-6) computed entirely in f32 (statistics and affine), whatever the input dtype.
struct GroupNorm {
    /// f32 `[c]`.
    weight: Tensor,
    bias: Tensor,
    format: Format,
}

impl GroupNorm {
    fn new(vb: VarBuilder, channels: usize, format: Format) -> Result<Self> {
        ensure!(
            channels.is_multiple_of(GROUPS),
            "GroupNorm at {}: {channels} channels are not divisible by {GROUPS} groups",
            vb.prefix()
        );
        let weight = vb.get(channels, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight,
            bias,
            format,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = tracing::trace_span!("vq.group_norm").entered();
        self.norm(x, false)
    }

    /// GroupNorm then SiLU.
    fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = tracing::trace_span!("vq.group_norm_silu").entered();
        self.norm(x, true)
    }

    /// One fused op where it runs; elsewhere tensor ops in f32 (then SiLU in `x`'s dtype).
    fn norm(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        let (fused, slow): (fn(_, _, _, _, _, _) -> _, fn(_, _, _, _, _, _) -> _) =
            match self.format {
                Format::Nchw => (group_norm::fused, group_norm::slow),
                Format::Nhwc => (group_norm::fused_nhwc, group_norm::slow_nhwc),
            };
        if let Some(y) = fused(x, w, b, GROUPS, GN_EPS, silu)? {
            return Ok(y);
        }
        let y = slow(x, w, b, GROUPS, GN_EPS, false)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, f: Format) -> Result<Self> {
        let nin_shortcut = if cin != cout {
            Some(conv1(vb.pp("nin_shortcut"), cin, cout, f)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cin, f)?,
            conv1: conv3(vb.pp("conv1"), cin, cout, f)?,
            norm2: GroupNorm::new(vb.pp("norm2"), cout, f)?,
            conv2: conv3(vb.pp("conv2"), cout, cout, f)?,
            nin_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = conv_t(&self.conv1, &self.norm1.forward_silu(x)?)?;
        let x = match &self.nin_shortcut {
            Some(c) => conv_t(c, x)?,
            None => x.clone(),
        };
        // The residual is added in conv2's epilogue where cuDNN runs it.
        conv_add_t(&self.conv2, &self.norm2.forward_silu(&h)?, Some(&x))
    }
}

/// Single-head self-attention over the h*w positions.
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
    scale: f64,
    format: Format,
}

impl AttnBlock {
    fn new(vb: VarBuilder, c: usize, format: Format) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), c, format)?,
            q: conv1(vb.pp("q"), c, c, format)?,
            k: conv1(vb.pp("k"), c, c, format)?,
            v: conv1(vb.pp("v"), c, c, format)?,
            proj_out: conv1(vb.pp("proj_out"), c, c, format)?,
            scale: 1.0 / (c as f64).sqrt(),
            format,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = tracing::trace_span!("vq.attention_block").entered();
        let (b, c, h, w) = dims(x, self.format)?;
        let hn = self.norm.forward(x)?;
        let (q, k, v) = (
            self.q.forward(&hn)?,
            self.k.forward(&hn)?,
            self.v.forward(&hn)?,
        );
        let out = match self.format {
            Format::Nchw => {
                let q = q.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
                let (k, v) = (k.reshape((b, c, h * w))?, v.reshape((b, c, h * w))?);
                // out[b, c, i] = sum_j v[b, c, j] * att[b, i, j]
                let att = self.softmax(&q.matmul(&k)?, x.dtype())?;
                v.matmul(&att.t()?.contiguous()?)?.reshape((b, c, h, w))?
            }
            Format::Nhwc => {
                // Rows of positions already: [b, hw, c].
                let (q, v) = (q.reshape((b, h * w, c))?, v.reshape((b, h * w, c))?);
                let k = k.reshape((b, h * w, c))?.t()?.contiguous()?;
                let att = self.softmax(&q.matmul(&k)?, x.dtype())?;
                att.matmul(&v)?.reshape((b, h, w, c))?
            }
        };
        self.proj_out.forward_add(&out, Some(x))
    }

    /// Softmax over keys of scores `[b, hw(query), hw(key)]` in f32, so that bf16/f16 weights
    /// do not lose the tail.
    fn softmax(&self, scores: &Tensor, dt: DType) -> Result<Tensor> {
        let att = (scores.to_dtype(DType::F32)? * self.scale)?;
        Ok(candle_nn::ops::softmax_last_dim(&att)?.to_dtype(dt)?)
    }
}

/// Nearest-neighbour 2x upsampling.
fn upsample2(x: &Tensor, format: Format) -> Result<Tensor> {
    let _enter = tracing::trace_span!("vq.upsample").entered();
    Ok(match format {
        Format::Nchw => {
            let (_, _, h, w) = x.dims4()?;
            x.upsample_nearest2d(h * 2, w * 2)?
        }
        Format::Nhwc => match crate::kernels::upsample::fused_nhwc(x)? {
            Some(y) => y,
            None => crate::kernels::upsample::slow_nhwc(x)?,
        },
    })
}

struct Level {
    res: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    /// Downsample (encoder) or upsample (decoder) conv; `None` where the reference has none.
    resample: Option<Conv>,
}

impl Level {
    fn forward(&self, x: &Tensor, upsample: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, res) in self.res.iter().enumerate() {
            h = res.forward(&h)?;
            if let Some(attn) = self.attn.get(i) {
                h = attn.forward(&h)?;
            }
        }
        if let Some(conv) = &self.resample {
            h = if upsample {
                conv_t(conv, &upsample2(&h, conv.format)?)?
            } else {
                // torch convs pad symmetrically only, so the reference pads right/bottom by hand.
                let (hd, wd) = match conv.format {
                    Format::Nchw => (2, 3),
                    Format::Nhwc => (1, 2),
                };
                conv.forward(&h.pad_with_zeros(wd, 0, 1)?.pad_with_zeros(hd, 0, 1)?)?
            };
        }
        Ok(h)
    }
}

struct Mid {
    res0: ResnetBlock,
    attn: AttnBlock,
    res1: ResnetBlock,
}

impl Mid {
    fn new(vb: VarBuilder, c: usize, f: Format) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(vb.pp("0"), c, c, f)?,
            attn: AttnBlock::new(vb.pp("1"), c, f)?,
            res1: ResnetBlock::new(vb.pp("2"), c, c, f)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.res1
            .forward(&self.attn.forward(&self.res0.forward(x)?)?)
    }
}

struct Encoder {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(cfg: &VqConfig, vb: VarBuilder, f: Format) -> Result<Self> {
        let n = cfg.ch_mult.len();
        let conv_in = conv3(vb.pp("conv_in"), 3, cfg.ch, f)?;
        let mut levels = Vec::with_capacity(n);
        let mut block_in = cfg.ch;
        for i in 0..n {
            let vbl = vb.pp("conv_blocks").pp(i);
            let block_out = cfg.ch * cfg.ch_mult[i];
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks {
                res.push(ResnetBlock::new(
                    vbl.pp("res").pp(j),
                    block_in,
                    block_out,
                    f,
                )?);
                block_in = block_out;
                if i == n - 1 {
                    attn.push(AttnBlock::new(vbl.pp("attn").pp(j), block_in, f)?);
                }
            }
            let resample = if i != n - 1 {
                let vbd = vbl.pp("downsample").pp("conv");
                Some(conv(vbd, (block_in, block_in), 3, 2, 0, f)?)
            } else {
                None
            };
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            levels,
            mid: Mid::new(vb.pp("mid"), block_in, f)?,
            norm_out: GroupNorm::new(vb.pp("norm_out"), block_in, f)?,
            conv_out: conv3(vb.pp("conv_out"), block_in, cfg.z_channels, f)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.levels {
            h = level.forward(&h, false)?;
        }
        let h = self.mid.forward(&h)?;
        conv_t(&self.conv_out, &self.norm_out.forward_silu(&h)?)
    }
}

struct Decoder {
    conv_in: Conv,
    mid: Mid,
    /// In execution order: index 0 is the last (lowest-resolution) level, as in the reference.
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    fn new(cfg: &VqConfig, vb: VarBuilder, f: Format) -> Result<Self> {
        let n = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[n - 1];
        let conv_in = conv3(vb.pp("conv_in"), cfg.z_channels, block_in, f)?;
        let mid = Mid::new(vb.pp("mid"), block_in, f)?;
        let mut levels = Vec::with_capacity(n);
        for (i, i_level) in (0..n).rev().enumerate() {
            let vbl = vb.pp("conv_blocks").pp(i);
            let block_out = cfg.ch * cfg.ch_mult[i_level];
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks + 1 {
                res.push(ResnetBlock::new(
                    vbl.pp("res").pp(j),
                    block_in,
                    block_out,
                    f,
                )?);
                block_in = block_out;
                if i_level == n - 1 {
                    attn.push(AttnBlock::new(vbl.pp("attn").pp(j), block_in, f)?);
                }
            }
            let resample = if i_level != 0 {
                Some(conv3(vbl.pp("upsample").pp("conv"), block_in, block_in, f)?)
            } else {
                None
            };
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            levels,
            norm_out: GroupNorm::new(vb.pp("norm_out"), block_in, f)?,
            conv_out: conv3(vb.pp("conv_out"), block_in, 3, f)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&conv_t(&self.conv_in, z)?)?;
        for level in &self.levels {
            h = level.forward(&h, true)?;
        }
        conv_t(&self.conv_out, &self.norm_out.forward_silu(&h)?)
    }
}

/// Row-wise l2 normalisation like `F.normalize(x, dim=-1)`: x / max(|x|, 1e-12).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(L2_EPS)?;
    Ok(x.broadcast_div(&norm)?)
}

/// The LlamaGen VQ tokenizer: images <-> codebook indices on a grid `patch_size` times smaller.
pub struct VqModel {
    cfg: VqConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    /// l2-normalised codebook rows, f32 [codebook_size, embed_dim].
    codebook: Tensor,
    /// Squared norms of `codebook` rows, f32 [1, codebook_size] (kept to mirror the reference's distance).
    codebook_sq: Tensor,
    /// Dtype the network runs in (see `compute_dtype`); inputs are converted to it.
    dtype: DType,
    /// Layout of the activations (see [`default_format`]).
    format: Format,
    device: Device,
}

impl VqModel {
    /// The tokenizer in the layout that is fastest on `vb`'s device ([`default_format`]).
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let format = default_format(vb.device(), compute_dtype(vb.device(), vb.dtype()));
        Self::with_format(cfg, vb, format)
    }

    /// The tokenizer with activations in `format` (NHWC runs anywhere: without cuDNN its
    /// convolutions go through candle's between transposes, which is how the CPU tests check
    /// the layout).
    pub fn with_format(cfg: &VqConfig, vb: VarBuilder, format: Format) -> Result<Self> {
        ensure!(
            !cfg.ch_mult.is_empty(),
            "VQ config: ch_mult must not be empty"
        );
        ensure!(
            cfg.ch > 0 && !cfg.ch_mult.contains(&0),
            "VQ config: ch ({}) and ch_mult ({:?}) must be positive",
            cfg.ch,
            cfg.ch_mult
        );
        ensure!(
            cfg.codebook_size > 0
                && cfg.embed_dim > 0
                && cfg.z_channels > 0
                && cfg.num_res_blocks > 0,
            "VQ config: codebook_size, embed_dim, z_channels and num_res_blocks must be positive"
        );
        ensure!(
            cfg.codebook_size <= u32::MAX as usize,
            "VQ config: codebook_size {} does not fit u32",
            cfg.codebook_size
        );
        let dtype = compute_dtype(vb.device(), vb.dtype());
        let device = vb.device().clone();
        let load = || -> Result<Self> {
            let f = format;
            let encoder = Encoder::new(cfg, vb.pp("encoder"), f)?;
            let decoder = Decoder::new(cfg, vb.pp("decoder"), f)?;
            let quant_conv = conv1(vb.pp("quant_conv"), cfg.z_channels, cfg.embed_dim, f)?;
            let post_quant_conv =
                conv1(vb.pp("post_quant_conv"), cfg.embed_dim, cfg.z_channels, f)?;
            let emb = vb
                .pp("quantize")
                .pp("embedding")
                .get((cfg.codebook_size, cfg.embed_dim), "weight")?;
            let codebook = l2_normalize(&emb.to_dtype(DType::F32)?)?;
            let codebook_sq = codebook.sqr()?.sum(1)?.unsqueeze(0)?;
            Ok(Self {
                cfg: cfg.clone(),
                encoder,
                decoder,
                quant_conv,
                post_quant_conv,
                codebook,
                codebook_sq,
                dtype,
                format,
                device: device.clone(),
            })
        };
        load()
            .context("cannot build the VQ tokenizer from its weights (wrong config or checkpoint?)")
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// The dtype the network computes in: the weights' dtype, or f32 for bf16 weights on CPU.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activations' layout.
    pub fn format(&self) -> Format {
        self.format
    }

    /// A lower bound on the memory an encode or decode of `n` grids of `gh x gw` tokens takes:
    /// a few activations at full resolution and the attention scores at token resolution.
    fn check_activation_memory(&self, n: usize, gh: usize, gw: usize, what: &str) -> Result<()> {
        let p = self.cfg.patch_size() as u128;
        let cells = n as u128 * gh as u128 * gw as u128;
        let full = cells * p * p * self.cfg.ch as u128 * self.dtype.size_in_bytes() as u128 * 3;
        let attn = n as u128 * (gh as u128 * gw as u128).pow(2) * 4;
        crate::util::check_memory(
            full + attn,
            &format!("VQ {what} of {n} grid(s) of {gw}x{gh} tokens"),
        )
    }

    /// images: [N, 3, H, W] in [-1, 1] (any float dtype), H and W multiples of patch_size. Returns u32 indices [N, (H/p)*(W/p)] in raster order.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let p = self.cfg.patch_size();
        let (n, c, h, w) = images.dims4().with_context(|| {
            format!(
                "VQ encode: expected images [N, 3, H, W], got shape {:?}",
                images.dims()
            )
        })?;
        ensure!(
            c == 3,
            "VQ encode: expected 3 image channels, got {c} (shape {:?})",
            images.dims()
        );
        ensure!(n > 0, "VQ encode: empty batch");
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            bail!("VQ encode: image size {h}x{w} (HxW) is not a positive multiple of the patch size {p}");
        }
        ensure!(
            images.dtype().is_float(),
            "VQ encode: images must be a float tensor, got {:?}",
            images.dtype()
        );
        self.check_activation_memory(n, h / p, w / p, "encode")?;
        let x = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        let x = match self.format {
            Format::Nchw => x,
            Format::Nhwc => x.permute((0, 2, 3, 1))?.contiguous()?,
        };
        let z = self.quant_conv.forward(&self.encoder.forward(&x)?)?;
        let (_, d, gh, gw) = dims(&z, self.format)?;
        let z = match self.format {
            Format::Nchw => z.permute((0, 2, 3, 1))?,
            Format::Nhwc => z,
        };
        let z = z.to_dtype(DType::F32)?.reshape((n * gh * gw, d))?;
        let rows = (QUANT_CHUNK_ELEMS / self.cfg.codebook_size).max(1);
        let idx = self.nearest_codes(&l2_normalize(&z)?, rows)?;
        // A NaN latent matches no row and comes out as `codebook_size`: refuse it here rather
        // than hand out an invalid id.
        if idx.max_all()?.to_scalar::<u32>()? as usize >= self.cfg.codebook_size {
            bail!("VQ encode: the latent has NaN values (NaN/inf in the images or the weights?)");
        }
        Ok(idx.reshape((n, gh * gw))?)
    }

    /// Index of the nearest codebook row for each row of `z` ([M, embed_dim] f32, normalised):
    /// argmin of |z|^2 + |e|^2 - 2 z.e as the reference computes it, first index on ties.
    fn nearest_codes(&self, z: &Tensor, rows: usize) -> Result<Tensor> {
        let (m, _) = z.dims2()?;
        let k = self.cfg.codebook_size;
        let cb_t = self.codebook.t()?.contiguous()?;
        let iota = Tensor::arange(0u32, k as u32, &self.device)?.unsqueeze(0)?;
        let none = Tensor::new(&[k as u32], &self.device)?.unsqueeze(0)?;
        let mut out = Vec::with_capacity(m.div_ceil(rows));
        for start in (0..m).step_by(rows) {
            let len = rows.min(m - start);
            let zc = z.narrow(0, start, len)?;
            let zsq = zc.sqr()?.sum_keepdim(1)?;
            let dist = zsq
                .broadcast_add(&self.codebook_sq)?
                .broadcast_sub(&(zc.matmul(&cb_t)? * 2.0)?)?;
            // Explicit first-minimum: the CUDA argmin reduction does not promise torch's tie rule.
            let is_min = dist.broadcast_eq(&dist.min_keepdim(1)?)?;
            let idx =
                is_min.where_cond(&iota.broadcast_as((len, k))?, &none.broadcast_as((len, k))?)?;
            out.push(idx.min(1)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// codes: [N, h*w] u32 (or i64) raster order on a grid of `grid = (h, w)` tokens. Returns the decoder's raw f32 output [N, 3, h*p, w*p] (no clamping).
    pub fn decode(&self, codes: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let out = self.decode_raw(codes, grid)?;
        Ok(match self.format {
            Format::Nchw => out,
            Format::Nhwc => out.permute((0, 3, 1, 2))?.contiguous()?,
        })
    }

    /// [`Self::decode`] as `[N, h*p, w*p, 3]` (what images and `.npz` files store).
    pub fn decode_nhwc(&self, codes: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let out = self.decode_raw(codes, grid)?;
        Ok(match self.format {
            Format::Nchw => out.permute((0, 2, 3, 1))?.contiguous()?,
            Format::Nhwc => out,
        })
    }

    /// The decoder's f32 output in [`Self::format`].
    fn decode_raw(&self, codes: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let (n, l) = codes.dims2().with_context(|| {
            format!(
                "VQ decode: expected codes [N, h*w], got shape {:?}",
                codes.dims()
            )
        })?;
        let (gh, gw) = grid;
        ensure!(
            gh > 0 && gw > 0,
            "VQ decode: grid {gh}x{gw} must be non-empty"
        );
        ensure!(
            gh.checked_mul(gw) == Some(l),
            "VQ decode: {l} codes per image do not fill a {gh}x{gw} grid ({} tokens)",
            gh as u128 * gw as u128
        );
        ensure!(n > 0, "VQ decode: empty batch");
        self.check_activation_memory(n, gh, gw, "decode")?;
        // Codes already on this device as u32 (the sampler's) are range-checked there, so that
        // they need not cross to the host; anything else goes through the precise host check.
        let on_device = codes.dtype() == DType::U32
            && codes.device().same_device(&self.device)
            && (codes.max_all()?.to_scalar::<u32>()? as usize) < self.cfg.codebook_size;
        let ids = match on_device {
            true => codes.flatten_all()?,
            false => Tensor::from_vec(self.checked_ids(codes)?, n * l, &self.device)?,
        };
        let zq = self.codebook.index_select(&ids, 0)?;
        let zq = zq.reshape((n, gh, gw, self.cfg.embed_dim))?;
        let zq = match self.format {
            Format::Nchw => zq.permute((0, 3, 1, 2))?.contiguous()?,
            Format::Nhwc => zq,
        };
        let zq = zq.to_dtype(self.dtype)?;
        let out = self.decoder.forward(&self.post_quant_conv.forward(&zq)?)?;
        Ok(out.to_dtype(DType::F32)?)
    }

    /// Reads the ids on the host and checks them against the codebook size.
    fn checked_ids(&self, codes: &Tensor) -> Result<Vec<u32>> {
        let k = self.cfg.codebook_size;
        let l = codes.dim(1)?;
        let flat = codes.flatten_all()?.to_device(&Device::Cpu)?;
        let vals: Vec<i64> = match codes.dtype() {
            DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
            DType::I64 => flat.to_vec1::<i64>()?,
            DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
            other => bail!("VQ decode: codes must be u32 or i64, got {other:?}"),
        };
        vals.iter()
            .enumerate()
            .map(|(i, &v)| {
                if v < 0 || v as u64 >= k as u64 {
                    bail!(
                        "VQ decode: code id {v} (image {}, token {}) is out of range: the codebook has {k} entries",
                        i / l,
                        i % l
                    );
                }
                Ok(v as u32)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::var_builder::SimpleBackend;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Records every requested (name, shape) and hands out broadcast zeros (no allocation).
    struct Recorder(Mutex<BTreeMap<String, Vec<usize>>>);

    impl SimpleBackend for Recorder {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0
                .lock()
                .unwrap()
                .insert(name.to_string(), s.dims().to_vec());
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("unexpected unchecked get of {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    #[test]
    fn requests_exactly_the_official_vq16_keys_and_shapes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/official_shapes.json"
        );
        let all: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let want: BTreeMap<String, Vec<usize>> = all["VQ-16"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.as_str() != "quantize.codebook_used")
            .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
            .collect();
        let rec = std::sync::Arc::new(Recorder(Mutex::new(BTreeMap::new())));
        struct Shared(std::sync::Arc<Recorder>);
        impl SimpleBackend for Shared {
            fn get(
                &self,
                s: candle_core::Shape,
                n: &str,
                h: candle_nn::Init,
                d: DType,
                dev: &Device,
            ) -> candle_core::Result<Tensor> {
                self.0.get(s, n, h, d, dev)
            }
            fn get_unchecked(
                &self,
                n: &str,
                d: DType,
                dev: &Device,
            ) -> candle_core::Result<Tensor> {
                self.0.get_unchecked(n, d, dev)
            }
            fn contains_tensor(&self, n: &str) -> bool {
                self.0.contains_tensor(n)
            }
        }
        let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, Device::Cpu);
        let vq = VqModel::new(&VqConfig::default(), vb).unwrap();
        assert_eq!(vq.config().patch_size(), 16);
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got, want);
    }

    fn tiny_model(codebook: &[f32], embed_dim: usize) -> VqModel {
        let cfg = VqConfig {
            ch: 32,
            ch_mult: vec![1],
            z_channels: 32,
            codebook_size: codebook.len() / embed_dim,
            embed_dim,
            num_res_blocks: 1,
        };
        let mut map = std::collections::HashMap::new();
        let emb =
            Tensor::from_slice(codebook, (cfg.codebook_size, embed_dim), &Device::Cpu).unwrap();
        map.insert("quantize.embedding.weight".to_string(), emb);
        // Every other weight comes from the zeros fallback of a recording backend.
        struct WithCodebook(std::collections::HashMap<String, Tensor>, Recorder);
        impl SimpleBackend for WithCodebook {
            fn get(
                &self,
                s: candle_core::Shape,
                n: &str,
                h: candle_nn::Init,
                d: DType,
                dev: &Device,
            ) -> candle_core::Result<Tensor> {
                match self.0.get(n) {
                    Some(t) => Ok(t.clone()),
                    None => self.1.get(s, n, h, d, dev),
                }
            }
            fn get_unchecked(
                &self,
                n: &str,
                d: DType,
                dev: &Device,
            ) -> candle_core::Result<Tensor> {
                self.1.get_unchecked(n, d, dev)
            }
            fn contains_tensor(&self, _: &str) -> bool {
                true
            }
        }
        let backend = WithCodebook(map, Recorder(Mutex::new(BTreeMap::new())));
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        VqModel::new(&cfg, vb).unwrap()
    }

    #[test]
    fn quantiser_picks_the_nearest_row_first_on_ties_across_chunks() {
        // Rows 1 and 3 are the same direction (3 is a scaled copy): ties go to the first.
        let cb = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 3.0, 0.6, 0.8];
        let vq = tiny_model(&cb, 2);
        let z = Tensor::new(
            &[
                [0.0f32, 2.0],
                [-5.0, 0.1],
                [0.7, 0.7],
                [0.59, 0.81],
                [1.0, -0.2],
                [0.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let z = l2_normalize(&z).unwrap();
        for rows in [1, 2, 4, 100] {
            let got = vq
                .nearest_codes(&z, rows)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            // The zero vector stays zero after normalising: all rows tie, so index 0.
            assert_eq!(got, vec![1, 2, 4, 4, 0, 0], "rows per chunk {rows}");
        }
    }

    /// A small VQ (two levels, attention, a channel change) with dense random weights.
    fn random_model(format: Format, dtype: DType) -> VqModel {
        let cfg = VqConfig {
            ch: 32,
            ch_mult: vec![1, 2],
            z_channels: 32,
            codebook_size: 64,
            embed_dim: 8,
            num_res_blocks: 1,
        };
        let vb = crate::checkpoint::random_var_builder_dense(7, dtype, &Device::Cpu);
        VqModel::with_format(&cfg, vb, format).unwrap()
    }

    #[test]
    fn nhwc_decodes_and_encodes_as_nchw() {
        let (a, b) = (
            random_model(Format::Nchw, DType::F32),
            random_model(Format::Nhwc, DType::F32),
        );
        let codes: Vec<u32> = (0..2 * 16).map(|i| (i * 37 + 5) % 64).collect();
        let codes = Tensor::from_vec(codes, (2, 16), &Device::Cpu).unwrap();
        let (x, y) = (
            a.decode(&codes, (4, 4)).unwrap(),
            b.decode(&codes, (4, 4)).unwrap(),
        );
        assert_eq!(x.dims(), &[2, 3, 8, 8]);
        assert_eq!(y.dims(), x.dims());
        let rel = crate::kernels::rel_diff(&y, &x).unwrap();
        assert!(rel < 1e-5, "NHWC decode differs from NCHW by {rel}");
        // The NHWC output is the same image, transposed.
        let z = b.decode_nhwc(&codes, (4, 4)).unwrap();
        let rel = crate::kernels::rel_diff(&z.permute((0, 3, 1, 2)).unwrap(), &x).unwrap();
        assert!(rel < 1e-5, "{rel}");
        // Non-trivial output: the random weights do not decode to a constant.
        let spread = (x.max_all().unwrap().to_scalar::<f32>().unwrap()
            - x.min_all().unwrap().to_scalar::<f32>().unwrap())
        .abs();
        assert!(spread > 1e-3, "{spread}");
        let images = x.clamp(-1f32, 1f32).unwrap();
        assert_eq!(
            a.encode(&images).unwrap().to_vec2::<u32>().unwrap(),
            b.encode(&images).unwrap().to_vec2::<u32>().unwrap()
        );
    }

    #[test]
    fn the_cpu_picks_nchw() {
        assert_eq!(default_format(&Device::Cpu, DType::BF16), Format::Nchw);
    }
}
