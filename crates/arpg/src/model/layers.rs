//! The transformer's building blocks, each mirroring the reference's state-dict names.
//!
//! Two sets of ops: inference takes candle's fused kernels (which have no backward), training
//! the backward-capable ones with the reference's roundings. A pass picks its set once
//! ([`Ops::for_mode`]); the blocks call it without knowing which.

use anyhow::Result;
use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

pub use crate::kernels::at_least_f32;
pub use crate::kernels::attn_softmax::CausalMask;

/// A dropout applied to activations (it owns its random generator).
pub type Dropout<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// How a forward pass runs: inference may use fused kernels; training needs a backward
/// through every op (candle's fused RMSNorm / softmax / RoPE have none) and applies dropout.
pub struct Mode<'a> {
    pub differentiable: bool,
    pub dropout: Option<&'a mut Dropout<'a>>,
}

impl Mode<'_> {
    pub fn inference() -> Mode<'static> {
        Mode {
            differentiable: false,
            dropout: None,
        }
    }
    pub fn drop(&mut self, x: Tensor) -> Result<Tensor> {
        match self.dropout.as_mut() {
            Some(f) => f(&x),
            None => Ok(x),
        }
    }
}

/// The ops whose fast kernels have no backward, as one set per mode.
#[derive(Clone, Copy)]
pub struct Ops {
    pub norm: fn(&RmsNorm, &Tensor) -> Result<Tensor>,
    /// RoPE of `x [b, h, t, d]` by `cos`/`sin [b, t, d/2]`.
    pub rope: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    pub attention: fn(&Tensor, &Tensor, &Tensor, Option<CausalMask>) -> Result<Tensor>,
}

impl Ops {
    pub const INFERENCE: Ops = Ops {
        norm: RmsNorm::forward_inference,
        rope: super::rope::apply,
        attention,
    };
    pub const TRAINING: Ops = Ops {
        norm: RmsNorm::forward_train,
        rope: super::rope::apply_train,
        attention: attention_train,
    };

    pub fn for_mode(mode: &Mode) -> Ops {
        if mode.differentiable {
            Self::TRAINING
        } else {
            Self::INFERENCE
        }
    }
}

/// A bias-free linear layer that folds leading dimensions into one GEMM (candle's `Linear`
/// broadcasts the weight per batch instead, which is slower and has a costlier backward).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let last = dims[dims.len() - 1];
        let rows = x.elem_count() / last;
        let y = x.reshape((rows, last))?.matmul(&self.weight.t()?)?;
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}

impl Linear {
    /// One linear layer for several that read the same input: their weights stacked, each
    /// left as a view of its rows (no second copy is kept).
    pub fn merge(parts: &mut [&mut Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let mut at = 0;
        for p in parts.iter_mut() {
            let n = p.weight.dim(0)?;
            p.weight = weight.narrow(0, at, n)?;
            at += n;
        }
        Ok(Linear { weight })
    }
}

pub fn linear(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(Linear {
        weight: vb.pp(name).get((out_dim, in_dim), "weight")?,
    })
}

/// RMSNorm computed in float32 then cast back, then scaled, as the reference does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    /// The weight in float32 for the fused inference kernel (cast once, not every call).
    weight32: Tensor,
    pub(crate) eps: f64,
    span: tracing::Span,
}

impl RmsNorm {
    pub fn new(vb: &VarBuilder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb
            .pp(name)
            .get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let weight32 = weight.to_dtype(at_least_f32(weight.dtype()))?.detach();
        Ok(Self {
            weight,
            weight32,
            eps,
            span: tracing::trace_span!("model.rms_norm"),
        })
    }

    /// Inference: candle's fused kernel (no backward).
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let dtype = x.dtype();
        if x.device().is_cuda() && dtype == self.weight.dtype() {
            // candle's CUDA kernel reads half precision, accumulates and scales in float32 and
            // rounds once: the same arithmetic as below in one kernel instead of three.
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        // Fused kernel in float32; the weight is applied before rounding back, which is at
        // least as accurate as the reference's round-then-scale.
        let x32 = x.to_dtype(at_least_f32(dtype))?;
        let w = self.weight32.to_dtype(x32.dtype())?;
        Ok(candle_nn::ops::rms_norm(&x32.contiguous()?, &w, self.eps as f32)?.to_dtype(dtype)?)
    }

    /// Training: the reference's roundings, with a backward (one fused kernel each way on
    /// CUDA in bf16).
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        match crate::kernels::rms_norm::fused(x, &self.weight, self.eps)? {
            Some(y) => Ok(y),
            None => crate::kernels::rms_norm::slow(x, &self.weight, self.eps),
        }
    }
}

/// SwiGLU: w2(silu(w1 x) * w3 x).
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub(crate) w1: Linear,
    pub(crate) w2: Linear,
    pub(crate) w3: Linear,
    span: tracing::Span,
}

impl FeedForward {
    pub fn new(vb: &VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            w1: linear(vb, "w1", dim, hidden)?,
            w2: linear(vb, "w2", hidden, dim)?,
            w3: linear(vb, "w3", dim, hidden)?,
            span: tracing::trace_span!("model.ffn"),
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let h = (candle_nn::ops::silu(&self.w1.forward(x)?)? * self.w3.forward(x)?)?;
        self.w2.forward(&h)
    }
}

/// `[b, t, h*d]` -> `[b, h, t, d]`, contiguous.
pub fn split_heads(x: &Tensor, n_head: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    Ok(x.reshape((b, t, n_head, c / n_head))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[b, h, t, d]` -> `[b, t, h*d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// Inference attention: scaled dot products, softmax accumulated in float32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<CausalMask>) -> Result<Tensor> {
    let _enter = tracing::trace_span!("model.attention").entered();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let Some(m) = mask else {
        // Scale the (short) queries, and let the fused softmax kernel, which accumulates in
        // float32, read half-precision scores directly: two casts fewer per layer and step.
        let probs = candle_nn::ops::softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)?;
        return Ok(probs.matmul(v)?);
    };
    let scores = q.matmul(&k.t()?)?;
    if let Some(p) = crate::kernels::attn_softmax::fused(&scores, scale, Some(m))? {
        return Ok(p.matmul(v)?);
    }
    let s = (scores.to_dtype(at_least_f32(q.dtype()))? * scale)?;
    let s = s.broadcast_add(&m.checked_tensor(&s)?)?;
    let probs = candle_nn::ops::softmax_last_dim(&s)?;
    Ok(probs.to_dtype(q.dtype())?.matmul(v)?)
}

/// Training attention: the same with a backward (one fused kernel each way on CUDA).
pub fn attention_train(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<CausalMask>,
) -> Result<Tensor> {
    let _enter = tracing::trace_span!("model.attention").entered();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = q.matmul(&k.t()?)?;
    let probs = match crate::kernels::attn_softmax::fused(&scores, scale, mask)? {
        Some(p) => p,
        None => crate::kernels::attn_softmax::slow(&scores, scale, mask)?,
    };
    Ok(probs.matmul(v)?)
}

/// The square causal mask of a training sequence of `t` tokens.
pub fn causal_mask(t: usize) -> CausalMask {
    CausalMask::new(t, t)
}
