//! The transformer's building blocks, each mirroring the reference's state-dict names.

use anyhow::{ensure, Result};
use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

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

pub fn linear(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(Linear {
        weight: vb.pp(name).get((out_dim, in_dim), "weight")?,
    })
}

/// The precision of the parts the reference runs in float32 (norms, RoPE, softmax): float32,
/// or float64 when the whole model runs in float64 (gradient checks).
pub fn at_least_f32(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm computed in float32 then cast back, then scaled, as the reference does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    /// The weight in float32 for the fused inference kernel (cast once, not every call).
    weight32: Tensor,
    eps: f64,
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
        })
    }

    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        crate::util::timed("model.rms_norm", x.device(), || {
            self.forward_inner(x, differentiable)
        })
    }

    fn forward_inner(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        if !differentiable && x.device().is_cuda() && dtype == self.weight.dtype() {
            // candle's CUDA kernel reads half precision, accumulates and scales in float32 and
            // rounds once: the same arithmetic as below in one kernel instead of three.
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        if differentiable {
            if let Some(y) = super::fused::rms_norm_train(x, &self.weight, self.eps)? {
                return Ok(y);
            }
        }
        let x32 = x.to_dtype(at_least_f32(dtype))?;
        if !differentiable {
            // Fused kernel in float32; the weight is applied before rounding back, which is
            // at least as accurate as the reference's round-then-scale.
            let w = self.weight32.to_dtype(x32.dtype())?;
            return Ok(
                candle_nn::ops::rms_norm(&x32.contiguous()?, &w, self.eps as f32)?
                    .to_dtype(dtype)?,
            );
        }
        rms_norm_generic(&x32, &self.weight, self.eps, dtype)
    }
}

/// The differentiable RMSNorm as tensor ops: normalise `x32` in f32, round to `dtype`, scale.
fn rms_norm_generic(x32: &Tensor, weight: &Tensor, eps: f64, dtype: DType) -> Result<Tensor> {
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// On CUDA: the fused training RMSNorm (bf16) against the generic ops, max relative
/// differences `[output, input gradient, weight gradient]` under a random linear loss. `None`
/// off CUDA or with fused kernels off.
pub fn fused_rms_norm_check(device: &candle_core::Device) -> Result<Option<[f64; 3]>> {
    let (rows, d) = (300, 96);
    let x = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (3, rows / 3, d), device)? * 2.0)?.to_dtype(DType::BF16)?,
    )?;
    let w = candle_core::Var::from_tensor(
        &Tensor::randn(1f32, 0.3, d, device)?.to_dtype(DType::BF16)?,
    )?;
    let loss_w = Tensor::randn(0f32, 1.0, (3, rows / 3, d), device)?;
    let Some(fused) = super::fused::rms_norm_train(x.as_tensor(), w.as_tensor(), 1e-5)? else {
        return Ok(None);
    };
    let generic = rms_norm_generic(
        &x.as_tensor().to_dtype(DType::F32)?,
        w.as_tensor(),
        1e-5,
        DType::BF16,
    )?;
    let grads = |y: &Tensor| -> Result<(Tensor, Tensor)> {
        let g = (y.to_dtype(DType::F32)? * &loss_w)?.sum_all()?.backward()?;
        Ok((
            g.get(&x).cloned().expect("x grad"),
            g.get(&w).cloned().expect("w grad"),
        ))
    };
    let rel = super::fused::rel_diff;
    let ((fx, fw), (gx, gw)) = (grads(&fused)?, grads(&generic)?);
    Ok(Some([
        rel(&fused, &generic)?,
        rel(&fx, &gx)?,
        rel(&fw, &gw)?,
    ]))
}

/// SwiGLU: w2(silu(w1 x) * w3 x).
#[derive(Debug, Clone)]
pub struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    pub fn new(vb: &VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            w1: linear(vb, "w1", dim, hidden)?,
            w2: linear(vb, "w2", hidden, dim)?,
            w3: linear(vb, "w3", dim, hidden)?,
        })
    }
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let dev = x.device();
        let h = crate::util::timed("model.ffn", dev, || {
            Ok((candle_nn::ops::silu(&self.w1.forward(x)?)? * self.w3.forward(x)?)?)
        })?;
        let out = crate::util::timed("model.ffn", dev, || Ok(self.w2.forward(&h)?))?;
        mode.drop(out)
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

/// Scaled dot-product attention; softmax accumulated in float32. `mask`: causal (training).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&CausalMask>,
    differentiable: bool,
) -> Result<Tensor> {
    crate::util::timed("model.attention", q.device(), || {
        attention_inner(q, k, v, mask, differentiable)
    })
}

fn attention_inner(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&CausalMask>,
    differentiable: bool,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    if !differentiable && mask.is_none() {
        // Inference: scale the (short) queries, and let the fused softmax kernel, which
        // accumulates in float32, read half-precision scores directly: two casts fewer per
        // layer and step.
        let probs = candle_nn::ops::softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)?;
        return Ok(probs.matmul(v)?);
    }
    if differentiable || mask.is_some() {
        // One fused kernel each way on CUDA.
        if let Some(p) = super::fused::attn_softmax(&q.matmul(&k.t()?)?, scale, mask.copied())? {
            return Ok(p.matmul(v)?);
        }
    }
    let scores = (q.matmul(&k.t()?)?.to_dtype(at_least_f32(dtype))? * scale)?;
    let scores = match mask {
        Some(m) => {
            ensure!(
                (m.tq, m.tk) == (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?),
                "a {}x{} mask for {:?} scores",
                m.tq,
                m.tk,
                scores.shape()
            );
            scores.broadcast_add(&m.tensor(scores.device())?.to_dtype(scores.dtype())?)?
        }
        None => scores,
    };
    let probs = if differentiable {
        softmax_with_grad(&scores)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    Ok(probs.to_dtype(dtype)?.matmul(v)?)
}

/// On CUDA: the fused attention softmax against the generic ops (causal masks, square as in
/// training and 7 queries over 19 keys as in a decoding step; random scores; a random linear
/// loss), as max relative differences `[f32 forward, f32 backward, bf16 forward, bf16
/// backward]`. `None` off CUDA or with fused kernels off.
pub fn fused_attn_softmax_check(device: &candle_core::Device) -> Result<Option<[f64; 4]>> {
    let scale = 0.125;
    let rel = super::fused::rel_diff;
    let mut out = [0f64; 4];
    for mask in [causal_mask(19), CausalMask::new(7, 19)] {
        let shape = (2, 3, mask.tq, mask.tk);
        let base = (Tensor::randn(0f32, 1.0, shape, device)? * 8.0)?;
        let w = Tensor::randn(0f32, 1.0, shape, device)?;
        for (k, dt) in [DType::F32, DType::BF16].into_iter().enumerate() {
            let s = candle_core::Var::from_tensor(&base.to_dtype(dt)?)?;
            let Some(fused) = super::fused::attn_softmax(s.as_tensor(), scale, Some(mask))? else {
                return Ok(None);
            };
            let generic = {
                let x = (s.as_tensor().to_dtype(DType::F32)? * scale)?
                    .broadcast_add(&mask.tensor(device)?)?;
                candle_nn::ops::softmax(&x, D::Minus1)?.to_dtype(dt)?
            };
            let grad = |p: &Tensor| -> Result<Tensor> {
                let loss = (p.to_dtype(DType::F32)? * &w)?.sum_all()?;
                Ok(loss.backward()?.get(&s).cloned().expect("a gradient"))
            };
            out[2 * k] = out[2 * k].max(rel(&fused, &generic)?);
            out[2 * k + 1] = out[2 * k + 1].max(rel(&grad(&fused)?, &grad(&generic)?)?);
        }
    }
    Ok(Some(out))
}

/// A causal mask over `tq` queries and `tk >= tq` keys, aligned at the end: query i sees keys
/// `0..=i + tk - tq` (training: `tq == tk`; a decoding step: the cache, then its own tokens in
/// order). The only mask attention takes; fused kernels apply it by index, the generic path
/// builds the additive `[tq, tk]` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CausalMask {
    pub tq: usize,
    pub tk: usize,
}

impl CausalMask {
    pub fn new(tq: usize, tk: usize) -> Self {
        Self { tq, tk }
    }

    /// Keys before the first query's own position, all visible.
    pub fn offset(&self) -> usize {
        self.tk.saturating_sub(self.tq)
    }

    /// The additive mask `[tq, tk]`: 0 where visible, -inf elsewhere.
    pub fn tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let (tk, off) = (self.tk, self.offset());
        let data: Vec<f32> = (0..self.tq)
            .flat_map(|i| (0..tk).map(move |j| if j <= i + off { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Ok(Tensor::from_vec(data, (self.tq, tk), device)?)
    }
}

/// The square causal mask of a training sequence of `t` tokens.
pub fn causal_mask(t: usize) -> CausalMask {
    CausalMask::new(t, t)
}

/// Softmax over the last dimension with a backward. On the CPU (f32/f64) it is one pass
/// forward and `y * (g - sum(g * y))` backward, instead of candle's five-op composite and its
/// gradients (the training step's attention is dominated by these `[b, h, t, t]` passes).
pub fn softmax_with_grad(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        Ok(x.contiguous()?.apply_op1(SoftmaxCpu)?)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

struct SoftmaxCpu;

impl candle_core::CustomOp1 for SoftmaxCpu {
    fn name(&self) -> &'static str {
        "arpg-softmax-cpu"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        fn rows<T: num_traits::Float>(x: &[T], n: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(n) {
                let m = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                let start = out.len();
                let mut sum = T::zero();
                for &v in row {
                    let e = (v - m).exp();
                    sum = sum + e;
                    out.push(e);
                }
                for e in &mut out[start..] {
                    *e = *e / sum;
                }
            }
            out
        }
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: strided input".into()))?;
        let n = *l.dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(rows(&v[a..b], n)),
            CpuStorage::F64(v) => CpuStorage::F64(rows(&v[a..b], n)),
            _ => candle_core::bail!("softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&dot)? * res)?))
    }
}
