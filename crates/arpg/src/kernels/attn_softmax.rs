//! Attention probabilities `softmax(scores * scale)` over the last dimension of `[b, h, tq,
//! tk]` scores, optionally causal, in f32, rounded once to the scores' dtype. One kernel each
//! way (`scale * p * (g - sum(p * g))` backward, from the saved probabilities) where the
//! composite is about six forward and a dozen backward over f32 copies.

use super::{at_least_f32, cpu_f32, cpu_store};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor, D};

/// A causal mask over `tq` queries and `tk >= tq` keys, aligned at the end: query i sees keys
/// `0..=i + tk - tq` (training: `tq == tk`; a decoding step: the cache, then its own tokens in
/// order). The only mask attention takes; the kernel applies it by index, the composite adds
/// the `[tq, tk]` tensor.
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
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        let (tk, off) = (self.tk, self.offset());
        let data: Vec<f32> = (0..self.tq)
            .flat_map(|i| (0..tk).map(move |j| if j <= i + off { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Ok(Tensor::from_vec(data, (self.tq, tk), device)?)
    }

    /// The additive mask in `scores`' dtype, checked against their last two dimensions.
    pub fn checked_tensor(&self, scores: &Tensor) -> Result<Tensor> {
        self.ensure_fits(scores)?;
        Ok(self.tensor(scores.device())?.to_dtype(scores.dtype())?)
    }

    fn ensure_fits(&self, scores: &Tensor) -> Result<()> {
        let (tq, tk) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
        ensure!(
            (self.tq, self.tk) == (tq, tk),
            "a {}x{} mask for {:?} scores",
            self.tq,
            self.tk,
            scores.shape()
        );
        Ok(())
    }
}

/// The fused op, or `None` where it does not apply (see the module list in `kernels`).
pub fn fused(scores: &Tensor, scale: f64, causal: Option<CausalMask>) -> Result<Option<Tensor>> {
    if !(matches!(scores.dtype(), DType::F32 | DType::BF16)
        && scores.rank() == 4
        && super::on(scores.device()))
    {
        return Ok(None);
    }
    if let Some(m) = causal {
        m.ensure_fits(scores)?;
    }
    let op = AttnSoftmax::new(scale, causal);
    Ok(Some(scores.contiguous()?.apply_op1(op)?))
}

/// The composite: scale and mask in f32 (f64 for f64 scores), a differentiable softmax, the
/// scores' dtype.
pub fn slow(scores: &Tensor, scale: f64, causal: Option<CausalMask>) -> Result<Tensor> {
    let dtype = scores.dtype();
    let s = (scores.to_dtype(at_least_f32(dtype))? * scale)?;
    let s = match causal {
        Some(m) => s.broadcast_add(&m.checked_tensor(&s)?)?,
        None => s,
    };
    Ok(softmax_with_grad(&s)?.to_dtype(dtype)?)
}

/// The training attention's probabilities of `scores [b, h, tq, tk]` (f32 or bf16) under
/// `causal`, with no autograd graph: the fused op's own forward on the CPU and CUDA alike.
pub fn probs(scores: &Tensor, scale: f64, causal: Option<CausalMask>) -> Result<Tensor> {
    if let Some(m) = causal {
        m.ensure_fits(scores)?;
    }
    let fast = super::enabled() && (scores.device().is_cpu() || super::on(scores.device()));
    if !(matches!(scores.dtype(), DType::F32 | DType::BF16) && scores.rank() == 4 && fast) {
        return Ok(slow(scores, scale, causal)?.detach());
    }
    Ok(scores
        .contiguous()?
        .apply_op1_no_bwd(&AttnSoftmax::new(scale, causal))?)
}

/// [`probs`]' backward: the scores' gradient from the probabilities `p` and their gradient.
pub fn probs_backward(p: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    let grad = grad.to_dtype(p.dtype())?.contiguous()?;
    if matches!(p.dtype(), DType::F32 | DType::BF16) {
        return Ok(p
            .contiguous()?
            .apply_op2_no_bwd(&grad, &AttnSoftmaxBwd(scale as f32))?);
    }
    // f64 (gradient checks): scale * p * (g - sum(p * g)).
    let dot = (p * &grad)?.sum_keepdim(D::Minus1)?;
    Ok(((p * grad.broadcast_sub(&dot)?)? * scale)?)
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

#[derive(Clone, Copy)]
struct AttnSoftmax {
    scale: f32,
    causal: bool,
    /// Keys visible to every query before its own position (a decoding step's cache).
    offset: u32,
}

impl AttnSoftmax {
    fn new(scale: f64, causal: Option<CausalMask>) -> Self {
        Self {
            scale: scale as f32,
            causal: causal.is_some(),
            offset: causal.map_or(0, |m| m.offset()) as u32,
        }
    }
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "arpg-attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, tq, tk) = l.shape().dims4()?;
        let mut v = cpu_f32(s, l, "attention softmax")?;
        for (r, row) in v.chunks_mut(tk).enumerate() {
            let lim = if self.causal {
                (r % tq + 1 + self.offset as usize).min(tk)
            } else {
                tk
            };
            let m = row[..lim]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &x| m.max(x * self.scale));
            let sum: f32 = row[..lim].iter().map(|&x| (x * self.scale - m).exp()).sum();
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j < lim {
                    (*x * self.scale - m).exp() / sum
                } else {
                    0.0
                };
            }
        }
        Ok((cpu_store(v, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view, warp_rows};
        use candle_core::CudaStorage;
        let (b, h, tq, tk) = l.shape().dims4()?;
        let dev = s.device().clone();
        let rows = (b * h * tq) as u32;
        let (tq_u, tk_u, causal) = (tq as u32, tk as u32, self.causal as i32);
        let n = l.shape().elem_count();
        let suffix = match s.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            dt => candle_core::bail!("fused attention softmax: {dt:?}"),
        };
        let name = kernel("attn_softmax", tk, suffix);
        macro_rules! run {
            ($t:ty) => {{
                let src = view::<$t>(s, l, "fused attention softmax")?;
                // Safety: the kernel writes every element.
                let mut dst = unsafe { dev.alloc::<$t>(n) }?;
                launch!(dev, &name, warp_rows(rows as usize);
                    &src, &mut dst, &rows, &tq_u, &tk_u, &self.scale, &causal, &self.offset);
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.to_dtype(res.dtype())?.contiguous()?;
        Ok(Some(
            res.apply_op2_no_bwd(&grad, &AttnSoftmaxBwd(self.scale))?,
        ))
    }
}

/// `scale * p * (g - sum(p * g))` per row, from probabilities `p` and their gradient `g`.
struct AttnSoftmaxBwd(f32);

impl CustomOp2 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "arpg-attn-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if pl.shape() != gl.shape() {
            candle_core::bail!("softmax backward: {:?} vs {:?}", pl.shape(), gl.shape());
        }
        let tk = *pl.dims().last().unwrap_or(&1);
        let (ps, gs) = (
            cpu_f32(p, pl, "softmax backward")?,
            cpu_f32(g, gl, "softmax backward")?,
        );
        let mut out = Vec::with_capacity(ps.len());
        for (pr, gr) in ps.chunks(tk).zip(gs.chunks(tk)) {
            let dot: f32 = pr.iter().zip(gr).map(|(p, g)| p * g).sum();
            out.extend(pr.iter().zip(gr).map(|(p, g)| self.0 * p * (g - dot)));
        }
        Ok((cpu_store(out, p.dtype())?, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view, warp_rows};
        use candle_core::CudaStorage;
        if pl.shape() != gl.shape() {
            candle_core::bail!("softmax backward: {:?} vs {:?}", pl.shape(), gl.shape());
        }
        let tk = *pl.dims().last().unwrap_or(&1);
        let n = pl.shape().elem_count();
        let dev = p.device().clone();
        let rows = (n / tk.max(1)) as u32;
        let tk_u = tk as u32;
        let suffix = match p.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            dt => candle_core::bail!("softmax backward: {dt:?}"),
        };
        let name = kernel("attn_softmax_bwd", tk, suffix);
        macro_rules! run {
            ($t:ty) => {{
                let ps = view::<$t>(p, pl, "softmax backward")?;
                let gs = view::<$t>(g, gl, "softmax backward")?;
                // Safety: the kernel writes every element.
                let mut dst = unsafe { dev.alloc::<$t>(n) }?;
                launch!(dev, &name, warp_rows(rows as usize);
                    &ps, &gs, &mut dst, &rows, &tk_u, &self.0);
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match p.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
        Ok((out, pl.shape().clone()))
    }
}

/// The kernel for rows of `tk`: the row held in registers (`_r{K}`: up to 32 K values a
/// warp) where it fits, else the one that reads it again per pass.
#[cfg(feature = "cuda")]
fn kernel(stem: &str, tk: usize, suffix: &str) -> String {
    match [4usize, 9, 16].into_iter().find(|k| tk <= 32 * k) {
        Some(k) => format!("{stem}_r{k}_{suffix}"),
        None => format!("{stem}_{suffix}"),
    }
}

struct SoftmaxCpu;

impl CustomOp1 for SoftmaxCpu {
    fn name(&self) -> &'static str {
        "arpg-softmax-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
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

/// Masks as a training step (square) and a decoding step (7 queries over 19 keys) use them.
fn check_masks() -> [CausalMask; 2] {
    [CausalMask::new(19, 19), CausalMask::new(7, 19)]
}

/// Max relative differences `[f32 forward, f32 backward, bf16 forward, bf16 backward]` of `op`
/// against the composite, on random scores under a random linear loss.
fn compare(
    device: &Device,
    op: impl Fn(&Tensor, f64, CausalMask) -> Result<Option<Tensor>>,
) -> Result<Option<[f64; 4]>> {
    let scale = 0.125;
    let rel = super::rel_diff;
    let mut out = [0f64; 4];
    for mask in check_masks() {
        let shape = (2, 3, mask.tq, mask.tk);
        let base = (Tensor::randn(0f32, 1.0, shape, device)? * 8.0)?;
        let w = Tensor::randn(0f32, 1.0, shape, device)?;
        for (k, dt) in [DType::F32, DType::BF16].into_iter().enumerate() {
            let s = candle_core::Var::from_tensor(&base.to_dtype(dt)?)?;
            let Some(fast) = op(s.as_tensor(), scale, mask)? else {
                return Ok(None);
            };
            let composite = slow(s.as_tensor(), scale, Some(mask))?;
            let grad = |p: &Tensor| -> Result<Tensor> {
                let loss = (p.to_dtype(DType::F32)? * &w)?.sum_all()?;
                Ok(loss.backward()?.get(&s).cloned().expect("a gradient"))
            };
            out[2 * k] = out[2 * k].max(rel(&fast, &composite)?);
            out[2 * k + 1] = out[2 * k + 1].max(rel(&grad(&fast)?, &grad(&composite)?)?);
        }
    }
    Ok(Some(out))
}

/// On CUDA: the fused attention softmax against the composite (see [`compare`]). `None` off
/// CUDA or with fused kernels off.
pub fn check(device: &Device) -> Result<Option<[f64; 4]>> {
    compare(device, |s, scale, m| fused(s, scale, Some(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_op_and_its_backward_match_the_composite() {
        let op = |s: &Tensor, scale, m| Ok(Some(s.apply_op1(AttnSoftmax::new(scale, Some(m)))?));
        let [f32_fwd, f32_bwd, bf16_fwd, bf16_bwd] = compare(&Device::Cpu, op).unwrap().unwrap();
        assert!(f32_fwd < 1e-6 && f32_bwd < 1e-5, "{f32_fwd} {f32_bwd}");
        assert!(bf16_fwd < 1e-2 && bf16_bwd < 2e-2, "{bf16_fwd} {bf16_bwd}");
    }

    #[test]
    fn a_causal_mask_hides_the_keys_after_each_query() {
        let m = CausalMask::new(2, 4).tensor(&Device::Cpu).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, 0.0]]
        );
    }
}
