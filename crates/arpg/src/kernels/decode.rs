//! The fused decoding step's kernels (bf16 on CUDA): a residual add with the next RMSNorm,
//! SwiGLU's `silu(a) * b` over one merged w1|w3 GEMM, new keys rotated into the KV cache, and
//! unmasked attention of a step's queries over the cache (RoPE on the queries, heads merged
//! on the way out). Together they take a decoding layer from ~24 kernels to 8-9.
//!
//! Each op has its CPU version (the kernel's arithmetic, with its bf16 roundings, in Rust) and
//! its composite of tensor ops (`*_slow`); the model's fast path
//! ([`crate::model::Arpg::fuse_for_decoding`]) runs them, the tests compare the two on the CPU
//! and `arpg check-parity` on the GPU. Caches are `[2, b, heads, capacity, 64]` (keys, then
//! values); cos/sin tables are packed as `[2, b, m, 32]`.

use super::{cpu_f32, cpu_store, round_to};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp3, Layout, Shape,
};
use candle_core::{Tensor, D};

/// The head size the attention kernel is written for (every ARPG model's).
pub const HEAD_DIM: usize = 64;

/// Whether the fused ops take the step on `dev` in `dtype`: bf16 on CUDA with the PTX loaded
/// and neither `ARPG_NO_FUSED` nor `ARPG_NO_FUSED_DECODE` set.
pub fn applies(dev: &Device, dtype: DType) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var_os("ARPG_NO_FUSED_DECODE").is_none());
    on && dtype == DType::BF16 && super::on(dev)
}

fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: strided input")))
}

// ---------------------------------------------------------------------------------------------
// add + RMSNorm

/// `x' = x + y` rounded to the dtype, and `rms(x') * w` in f32 rounded once: `[2, .., d]`
/// (`x'` then the normalised rows).
#[derive(Clone, Copy)]
struct AddRmsNorm {
    eps: f32,
}

/// `(x + y, rms_norm(x + y) * weight)` in one kernel.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    ensure!(
        x.dims() == y.dims(),
        "add_rms_norm: {:?} + {:?}",
        x.dims(),
        y.dims()
    );
    let d = x.dim(D::Minus1)?;
    if x.device().is_cuda() && !(d % 8 == 0 && d <= 4096) {
        // The kernel reads 8 values a thread, at most 4 passes of 128 threads.
        return add_rms_norm_slow(x, y, weight, eps);
    }
    let op = AddRmsNorm { eps: eps as f32 };
    let out =
        super::aligned(x)?.apply_op3_no_bwd(&super::aligned(y)?, &super::aligned(weight)?, &op)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// The composite: candle's add, then the inference RMSNorm arithmetic in f32.
pub fn add_rms_norm_slow(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let s = (x + y)?;
    let s32 = s.to_dtype(DType::F32)?;
    let den = (s32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let n = s32
        .broadcast_div(&den)?
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?;
    Ok((s.clone(), n.to_dtype(s.dtype())?))
}

fn rows_of(xl: &Layout, yl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize)> {
    let d = *xl.dims().last().unwrap_or(&1);
    if xl.shape() != yl.shape() || wl.shape().elem_count() != d {
        candle_core::bail!(
            "add_rms_norm: {:?} + {:?}, weight {:?}",
            xl.dims(),
            yl.dims(),
            wl.dims()
        );
    }
    Ok((xl.shape().elem_count() / d.max(1), d))
}

fn stacked(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "arpg-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = rows_of(xl, yl, wl)?;
        let dt = x.dtype();
        let (xs, ys) = (
            cpu_f32(x, xl, "add_rms_norm")?,
            cpu_f32(y, yl, "add_rms_norm")?,
        );
        let ws = cpu_f32(w, wl, "add_rms_norm")?;
        let n = rows * d;
        let mut out = vec![0f32; 2 * n];
        for r in 0..rows {
            let row = r * d..(r + 1) * d;
            let mut ss = 0f32;
            for j in row.clone() {
                let s = round_to(dt, xs[j] + ys[j]);
                out[j] = s;
                ss += s * s;
            }
            let inv = 1.0 / (ss / d as f32 + self.eps).sqrt();
            for j in row {
                out[n + j] = out[j] * inv * ws[j % d];
            }
        }
        Ok((cpu_store(out, dt)?, stacked(xl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (rows, d) = rows_of(xl, yl, wl)?;
        let dev = x.device().clone();
        let xs = view::<half::bf16>(x, xl, "add_rms_norm")?;
        let ys = view::<half::bf16>(y, yl, "add_rms_norm")?;
        let ws = view::<half::bf16>(w, wl, "add_rms_norm")?;
        // Safety: the kernel writes every element of both halves.
        let mut dst = unsafe { dev.alloc::<half::bf16>(2 * rows * d) }?;
        let (ru, du) = (rows as u32, d as u32);
        let cfg = LaunchConfig {
            grid_dim: (ru, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "add_rms_norm_bf16", cfg; &xs, &ys, &ws, &mut dst, &ru, &du, &self.eps);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            stacked(xl),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's product

#[derive(Clone, Copy)]
struct SiluMul;

/// `h [.., 2 * hid]` holding `w1 x | w3 x`: `silu(w1 x) * w3 x`, `[.., hid]`.
pub fn silu_mul(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cuda() && h.dim(D::Minus1)? % 16 != 0 {
        // The kernel writes 8 values a thread.
        return silu_mul_slow(h);
    }
    Ok(super::aligned(h)?.apply_op1_no_bwd(&SiluMul)?)
}

/// The composite: candle's silu and product.
pub fn silu_mul_slow(h: &Tensor) -> Result<Tensor> {
    let hid = h.dim(D::Minus1)? / 2;
    let (a, b) = (h.narrow(D::Minus1, 0, hid)?, h.narrow(D::Minus1, hid, hid)?);
    Ok((candle_nn::ops::silu(&a)? * b)?)
}

/// [`silu_mul`]'s backward: from `h [.., 2 * hid]` (w1 x | w3 x) and the output's gradient
/// `g [.., hid]`, the gradient of `h`: `g b silu'(a) | g silu(a)`, in f32, rounded once. One
/// kernel on CUDA (bf16, hid % 8 == 0), elsewhere the CPU op or the composite.
pub fn silu_mul_backward(h: &Tensor, g: &Tensor) -> Result<Tensor> {
    let hid = g.dim(D::Minus1)?;
    ensure!(
        h.dim(D::Minus1)? == 2 * hid && h.elem_count() == 2 * g.elem_count(),
        "silu_mul backward: h {:?}, g {:?}",
        h.dims(),
        g.dims()
    );
    if h.device().is_cuda() && !(applies(h.device(), h.dtype()) && hid % 8 == 0) {
        return silu_mul_backward_slow(h, g);
    }
    Ok(super::aligned(h)?.apply_op2_no_bwd(&super::aligned(g)?, &SiluMulBwd)?)
}

/// The composite of [`silu_mul_backward`], in f32.
pub fn silu_mul_backward_slow(h: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dt = h.dtype();
    let hid = g.dim(D::Minus1)?;
    let h32 = h.to_dtype(DType::F32)?;
    let (a, b) = (
        h32.narrow(D::Minus1, 0, hid)?,
        h32.narrow(D::Minus1, hid, hid)?,
    );
    let g = g.to_dtype(DType::F32)?;
    let s = candle_nn::ops::sigmoid(&a)?;
    let ds = ((&a * (1.0 - &s)?)? + 1.0)?;
    let da = (((&g * &b)? * &s)? * ds)?;
    let db = ((&g * &a)? * &s)?;
    Ok(Tensor::cat(&[&da, &db], D::Minus1)?.to_dtype(dt)?)
}

struct SiluMulBwd;

impl CustomOp2 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "arpg-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let hid = *gl.dims().last().unwrap_or(&1);
        let dt = h.dtype();
        let (hv, gv) = (
            cpu_f32(h, hl, "silu_mul bwd")?,
            cpu_f32(g, gl, "silu_mul bwd")?,
        );
        let mut out = Vec::with_capacity(hv.len());
        for (row, gr) in hv.chunks_exact(2 * hid).zip(gv.chunks_exact(hid)) {
            let (a, b) = row.split_at(hid);
            for j in 0..hid {
                let s = 1.0 / (1.0 + (-a[j]).exp());
                out.push(round_to(dt, gr[j] * b[j] * s * (1.0 + a[j] * (1.0 - s))));
            }
            for j in 0..hid {
                let s = 1.0 / (1.0 + (-a[j]).exp());
                out.push(round_to(dt, gr[j] * a[j] * s));
            }
        }
        Ok((cpu_store(out, dt)?, hl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let dev = h.device().clone();
        let hs = view::<half::bf16>(h, hl, "silu_mul bwd")?;
        let gs = view::<half::bf16>(g, gl, "silu_mul bwd")?;
        let n = hl.shape().elem_count();
        let hid = *gl.dims().last().unwrap_or(&1);
        // Safety: the kernel writes every element.
        let mut dst = unsafe { dev.alloc::<half::bf16>(n) }?;
        let (rows, hid) = ((n / 2 / hid) as u32, hid as u32);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32 / 16).div_ceil(256).min(65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "silu_mul_bwd_bf16", cfg; &hs, &gs, &mut dst, &rows, &hid);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            hl.shape().clone(),
        ))
    }
}

fn halved(s: &Shape) -> candle_core::Result<(Shape, usize)> {
    let mut dims = s.dims().to_vec();
    let last = dims
        .last_mut()
        .ok_or_else(|| candle_core::Error::Msg("silu_mul: scalar".into()))?;
    if *last % 2 != 0 {
        candle_core::bail!("silu_mul: odd last dimension {last}");
    }
    *last /= 2;
    let hid = *last;
    Ok((Shape::from(dims), hid))
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "arpg-silu-mul"
    }

    fn cpu_fwd(&self, h: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (shape, hid) = halved(l.shape())?;
        let dt = h.dtype();
        let v = cpu_f32(h, l, "silu_mul")?;
        let mut out = Vec::with_capacity(v.len() / 2);
        for row in v.chunks_exact(2 * hid) {
            for j in 0..hid {
                let a = row[j];
                out.push(round_to(dt, a / (1.0 + (-a).exp())) * row[hid + j]);
            }
        }
        Ok((cpu_store(out, dt)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (shape, hid) = halved(l.shape())?;
        let dev = h.device().clone();
        let hs = view::<half::bf16>(h, l, "silu_mul")?;
        let n = shape.elem_count();
        // Safety: the kernel writes every element.
        let mut dst = unsafe { dev.alloc::<half::bf16>(n) }?;
        let (rows, hid) = ((n / hid) as u32, hid as u32);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32 / 8).div_ceil(256).min(65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "silu_mul_bf16", cfg; &hs, &mut dst, &rows, &hid);
        Ok((candle_core::CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }
}

// ---------------------------------------------------------------------------------------------
// KV cache writes and attention over the cache

/// Shapes shared by the cache ops: `src [b, m, stride]`, `cs [2, b, m, 32]`, cache
/// `[2, b, nh, cap, 64]`.
struct CacheShape {
    b: usize,
    m: usize,
    stride: usize,
    nh: usize,
    cap: usize,
}

fn cache_shape(src: &Layout, cs: &Layout, cache: &Layout) -> candle_core::Result<CacheShape> {
    let (b, m, stride) = src.shape().dims3()?;
    let (two, cb, nh, cap, hd) = cache.shape().dims5()?;
    if two != 2 || cb != b || hd != HEAD_DIM || cs.shape().dims4()? != (2, b, m, HEAD_DIM / 2) {
        candle_core::bail!(
            "fused decode: src {:?}, cos/sin {:?}, cache {:?}",
            src.shape(),
            cs.shape(),
            cache.shape()
        );
    }
    Ok(CacheShape {
        b,
        m,
        stride,
        nh,
        cap,
    })
}

/// Rotate pair `p` of a head's row `x` by the angle at `cs` index `ci` (f32, rounded).
fn rotate(dt: DType, x: &[f32], cs: &[f32], half: usize, ci: usize, p: usize) -> (f32, f32) {
    let (c, s) = (cs[ci], cs[half + ci]);
    let (x0, x1) = (x[2 * p], x[2 * p + 1]);
    (round_to(dt, x0 * c - x1 * s), round_to(dt, x0 * s + x1 * c))
}

/// Keys of `src` at column `kcol` (rotated) and values at `vcol` into the cache at token `at`.
struct KvToCache {
    kcol: usize,
    vcol: usize,
    at: usize,
}

/// Write the `m` new tokens' keys (columns `kcol..kcol + nh * 64` of `src [b, m, stride]`,
/// rotated by `cs`) and values (`vcol..`) into `cache` at token `at`.
pub fn kv_to_cache(
    cache: &Tensor,
    src: &Tensor,
    cs: &Tensor,
    kcol: usize,
    vcol: usize,
    at: usize,
) -> Result<()> {
    let (m, cap) = (src.dim(1)?, cache.dim(3)?);
    ensure!(
        at + m <= cap,
        "KV cache overflow: {at} + {m} tokens > capacity {cap}"
    );
    let op = KvToCache { kcol, vcol, at };
    Ok(cache.inplace_op3(&src.contiguous()?, &cs.contiguous()?, &op)?)
}

impl KvToCache {
    fn check(&self, sh: &CacheShape) -> candle_core::Result<()> {
        let w = sh.nh * HEAD_DIM;
        if self.kcol + w > sh.stride || self.vcol + w > sh.stride || self.at + sh.m > sh.cap {
            candle_core::bail!(
                "kv_to_cache: columns {}/{} + {w} of {}, tokens {} + {} of {}",
                self.kcol,
                self.vcol,
                sh.stride,
                self.at,
                sh.m,
                sh.cap
            );
        }
        Ok(())
    }
}

impl InplaceOp3 for KvToCache {
    fn name(&self) -> &'static str {
        "arpg-kv-to-cache"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
        cs: &CpuStorage,
        csl: &Layout,
    ) -> candle_core::Result<()> {
        let sh = cache_shape(sl, csl, cl)?;
        self.check(&sh)?;
        let (off, _) = contiguous(cl, "kv_to_cache")?;
        let dt = cache.dtype();
        let (x, cs) = (
            cpu_f32(src, sl, "kv_to_cache")?,
            cpu_f32(cs, csl, "kv_to_cache")?,
        );
        let (h2, half) = (HEAD_DIM / 2, sh.b * sh.m * HEAD_DIM / 2);
        let vals_at = sh.b * sh.nh * sh.cap * HEAD_DIM;
        let mut writes = Vec::with_capacity(2 * sh.b * sh.m * sh.nh * HEAD_DIM);
        for bb in 0..sh.b {
            for i in 0..sh.m {
                let row = bb * sh.m + i;
                for hh in 0..sh.nh {
                    let k = &x[row * sh.stride + self.kcol + hh * HEAD_DIM..][..HEAD_DIM];
                    let v = &x[row * sh.stride + self.vcol + hh * HEAD_DIM..][..HEAD_DIM];
                    let dst = ((bb * sh.nh + hh) * sh.cap + self.at + i) * HEAD_DIM;
                    for p in 0..h2 {
                        let (k0, k1) = rotate(dt, k, &cs, half, row * h2 + p, p);
                        writes.push((dst + 2 * p, k0));
                        writes.push((dst + 2 * p + 1, k1));
                    }
                    for (c, &v) in v.iter().enumerate() {
                        writes.push((vals_at + dst + c, v));
                    }
                }
            }
        }
        match cache {
            CpuStorage::F32(c) => writes.into_iter().for_each(|(i, v)| c[off + i] = v),
            CpuStorage::BF16(c) => writes
                .into_iter()
                .for_each(|(i, v)| c[off + i] = half::bf16::from_f32(v)),
            CpuStorage::F16(c) => writes
                .into_iter()
                .for_each(|(i, v)| c[off + i] = half::f16::from_f32(v)),
            s => candle_core::bail!("kv_to_cache: {:?} cache", s.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
        cs: &candle_core::CudaStorage,
        csl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let sh = cache_shape(sl, csl, cl)?;
        self.check(&sh)?;
        let dev = src.device().clone();
        let s = view::<half::bf16>(src, sl, "kv_to_cache")?;
        let c = view::<f32>(cs, csl, "kv_to_cache")?;
        let mut dst = super::cuda::view_mut::<half::bf16>(cache, cl, "kv_to_cache")?;
        let n = (sh.b * sh.m * sh.nh * HEAD_DIM / 2) as u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let u = |v: usize| v as u32;
        let (stride, kcol, vcol) = (u(sh.stride), u(self.kcol), u(self.vcol));
        let (bu, mu, nh, cap, at) = (u(sh.b), u(sh.m), u(sh.nh), u(sh.cap), u(self.at));
        launch!(dev, "kv_to_cache_bf16", cfg; &s, &stride, &kcol, &vcol, &c, &mut dst,
            &bu, &mu, &nh, &cap, &at);
        Ok(())
    }
}

/// Queries of `src` at column `qcol` against the first `len` cached tokens.
struct CacheAttention {
    qcol: usize,
    len: usize,
}

impl CacheAttention {
    fn check(&self, sh: &CacheShape) -> candle_core::Result<()> {
        if self.qcol + sh.nh * HEAD_DIM > sh.stride || self.len > sh.cap {
            candle_core::bail!(
                "cache_attention: column {} / {} tokens",
                self.qcol,
                self.len
            );
        }
        Ok(())
    }
}

/// Unmasked attention of the queries in columns `qcol..qcol + nh * 64` of `src [b, m, stride]`
/// (rotated by `cs`) over the first `len` tokens of `cache`: `[b, m, nh * 64]`, heads merged.
pub fn cache_attention(
    src: &Tensor,
    cache: &Tensor,
    cs: &Tensor,
    qcol: usize,
    len: usize,
) -> Result<Tensor> {
    ensure!(
        len >= 1 && len <= cache.dim(3)?,
        "cache_attention over {len} tokens"
    );
    let op = CacheAttention { qcol, len };
    Ok(src
        .contiguous()?
        .apply_op3_no_bwd(&cache.contiguous()?, &cs.contiguous()?, &op)?)
}

/// The composite: split heads, candle's RoPE, [`crate::model::layers::attention`], merge.
pub fn cache_attention_slow(
    src: &Tensor,
    cache: &Tensor,
    cs: &Tensor,
    qcol: usize,
    len: usize,
) -> Result<Tensor> {
    let nh = cache.dim(2)?;
    let q = src.narrow(D::Minus1, qcol, nh * HEAD_DIM)?;
    let q = crate::model::layers::split_heads(&q, nh)?;
    let q = crate::model::rope::apply(&q, &cs.get(0)?, &cs.get(1)?)?;
    let (k, v) = (cache.get(0)?, cache.get(1)?);
    let (k, v) = (k.narrow(2, 0, len)?, v.narrow(2, 0, len)?);
    let a = crate::model::layers::attention(&q, &k, &v, None)?;
    crate::model::layers::merge_heads(&a)
}

impl CustomOp3 for CacheAttention {
    fn name(&self) -> &'static str {
        "arpg-cache-attention"
    }

    fn cpu_fwd(
        &self,
        src: &CpuStorage,
        sl: &Layout,
        cache: &CpuStorage,
        cl: &Layout,
        cs: &CpuStorage,
        csl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sh = cache_shape(sl, csl, cl)?;
        self.check(&sh)?;
        let dt = src.dtype();
        let x = cpu_f32(src, sl, "cache_attention")?;
        let kv = cpu_f32(cache, cl, "cache_attention")?;
        let cs = cpu_f32(cs, csl, "cache_attention")?;
        let (h2, half) = (HEAD_DIM / 2, sh.b * sh.m * HEAD_DIM / 2);
        let vals_at = sh.b * sh.nh * sh.cap * HEAD_DIM;
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let width = sh.nh * HEAD_DIM;
        let mut out = vec![0f32; sh.b * sh.m * width];
        let mut q = [0f32; HEAD_DIM];
        let mut p = vec![0f32; self.len];
        for bb in 0..sh.b {
            for i in 0..sh.m {
                let row = bb * sh.m + i;
                for hh in 0..sh.nh {
                    let qr = &x[row * sh.stride + self.qcol + hh * HEAD_DIM..][..HEAD_DIM];
                    for pp in 0..h2 {
                        (q[2 * pp], q[2 * pp + 1]) = rotate(dt, qr, &cs, half, row * h2 + pp, pp);
                    }
                    let base = (bb * sh.nh + hh) * sh.cap * HEAD_DIM;
                    for (j, pj) in p.iter_mut().enumerate() {
                        let k = &kv[base + j * HEAD_DIM..][..HEAD_DIM];
                        *pj = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    }
                    let mx = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    p.iter_mut().for_each(|v| *v = (*v - mx).exp());
                    let sum: f32 = p.iter().sum();
                    let o = &mut out[row * width + hh * HEAD_DIM..][..HEAD_DIM];
                    for (j, pj) in p.iter().enumerate() {
                        let v = &kv[vals_at + base + j * HEAD_DIM..][..HEAD_DIM];
                        o.iter_mut().zip(v).for_each(|(o, v)| *o += pj * v);
                    }
                    o.iter_mut().for_each(|o| *o /= sum);
                }
            }
        }
        Ok((cpu_store(out, dt)?, Shape::from((sh.b, sh.m, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        src: &candle_core::CudaStorage,
        sl: &Layout,
        cache: &candle_core::CudaStorage,
        cl: &Layout,
        cs: &candle_core::CudaStorage,
        csl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let sh = cache_shape(sl, csl, cl)?;
        self.check(&sh)?;
        let dev = src.device().clone();
        let s = view::<half::bf16>(src, sl, "cache_attention")?;
        let kv = view::<half::bf16>(cache, cl, "cache_attention")?;
        let c = view::<f32>(cs, csl, "cache_attention")?;
        let width = sh.nh * HEAD_DIM;
        // Safety: the kernel writes every element (each block its head of its rows).
        let mut dst = unsafe { dev.alloc::<half::bf16>(sh.b * sh.m * width) }?;
        let cfg = LaunchConfig {
            grid_dim: (sh.nh as u32, sh.b as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let u = |v: usize| v as u32;
        let (stride, qcol, m, nh, cap, len) = (
            u(sh.stride),
            u(self.qcol),
            u(sh.m),
            u(sh.nh),
            u(sh.cap),
            u(self.len),
        );
        let scale = 1.0f32 / (HEAD_DIM as f32).sqrt();
        launch!(dev, "cache_attention_bf16", cfg; &s, &stride, &qcol, &c, &kv, &m, &nh, &cap,
            &len, &scale, &mut dst);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            Shape::from((sh.b, sh.m, width)),
        ))
    }
}

/// On CUDA in bf16: each fused op against its composite on decoding-step shapes, max relative
/// difference per op. `None` where the fused ops do not apply.
pub fn check(device: &Device) -> Result<Option<Vec<(&'static str, f64)>>> {
    if !applies(device, DType::BF16) {
        return Ok(None);
    }
    Ok(Some(compare(device, DType::BF16)?))
}

/// The fused ops against their composites on `device` in `dtype`, on random decoding-step
/// shapes (4 sequences, 3 heads, 5 new tokens of 7 queries into a cache of 20 holding 9).
pub fn compare(device: &Device, dtype: DType) -> Result<Vec<(&'static str, f64)>> {
    let (b, nh, m, cap, at) = (4, 3, 7, 20, 9);
    let d = nh * HEAD_DIM;
    let r = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
    };
    let mut out = Vec::new();
    let (x, y, w) = (r(&[b, m, d])?, r(&[b, m, d])?, r(&[d])?);
    let (fx, fnorm) = add_rms_norm(&x, &y, &w, 1e-5)?;
    let (sx, snorm) = add_rms_norm_slow(&x, &y, &w, 1e-5)?;
    out.push(("add", super::rel_diff(&fx, &sx)?));
    out.push(("add_rms_norm", super::rel_diff(&fnorm, &snorm)?));
    let h = r(&[b, m, 2 * d])?;
    out.push((
        "silu_mul",
        super::rel_diff(&silu_mul(&h)?, &silu_mul_slow(&h)?)?,
    ));
    let g = r(&[b, m, d])?;
    out.push((
        "silu_mul_backward",
        super::rel_diff(
            &silu_mul_backward(&h, &g)?,
            &silu_mul_backward_slow(&h, &g)?,
        )?,
    ));
    // Keys and values into a cache already holding `at` tokens, then attention over all.
    let src = r(&[b, m, 3 * d])?;
    let ang = Tensor::randn(0f32, 2.0, (b, m, HEAD_DIM / 2), device)?;
    let cs = Tensor::stack(&[ang.cos()?, ang.sin()?], 0)?;
    let fast = r(&[2, b, nh, cap, HEAD_DIM])?;
    let slow = fast.copy()?;
    kv_to_cache(&fast, &src, &cs, d, 2 * d, at)?;
    let k = crate::model::layers::split_heads(&src.narrow(D::Minus1, d, d)?, nh)?;
    let k = crate::model::rope::apply(&k, &cs.get(0)?, &cs.get(1)?)?;
    let v = crate::model::layers::split_heads(&src.narrow(D::Minus1, 2 * d, d)?, nh)?;
    slow.get(0)?.slice_set(&k, 2, at)?;
    slow.get(1)?.slice_set(&v, 2, at)?;
    out.push(("kv_to_cache", super::rel_diff(&fast, &slow)?));
    let fa = cache_attention(&src, &fast, &cs, 0, at + m)?;
    let sa = cache_attention_slow(&src, &slow, &cs, 0, at + m)?;
    out.push(("cache_attention", super::rel_diff(&fa, &sa)?));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_ops_match_their_composites() {
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (op, rel) in compare(&Device::Cpu, dt).unwrap() {
                assert!(rel < tol, "{op} in {dt:?}: {rel}");
            }
        }
    }

    #[test]
    fn silu_muls_backward_is_autograds() {
        let dev = Device::Cpu;
        let h = candle_core::Var::randn(0f32, 2.0, (3, 5, 32), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let auto = (silu_mul_slow(&h).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = auto.get(&h).unwrap();
        for got in [
            silu_mul_backward(&h, &g).unwrap(),
            silu_mul_backward_slow(&h, &g).unwrap(),
        ] {
            assert!(super::super::rel_diff(&got, want).unwrap() < 1e-6);
        }
    }

    #[test]
    fn a_cache_write_lands_at_its_token_and_nowhere_else() {
        let dev = Device::Cpu;
        let (b, nh, m, cap) = (2, 2, 3, 8);
        let d = nh * HEAD_DIM;
        let cache = Tensor::zeros((2, b, nh, cap, HEAD_DIM), DType::F32, &dev).unwrap();
        let src = Tensor::ones((b, m, 2 * d), DType::F32, &dev).unwrap();
        // Angle 0: keys pass unrotated.
        let cs = Tensor::stack(
            &[
                Tensor::ones((b, m, HEAD_DIM / 2), DType::F32, &dev).unwrap(),
                Tensor::zeros((b, m, HEAD_DIM / 2), DType::F32, &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        kv_to_cache(&cache, &src, &cs, 0, d, 4).unwrap();
        let per_token = cache.sum((0, 1, 2, 4)).unwrap().to_vec1::<f32>().unwrap();
        let full = (2 * b * nh * HEAD_DIM) as f32;
        assert_eq!(per_token, [0., 0., 0., 0., full, full, full, 0.]);
        assert!(kv_to_cache(&cache, &src, &cs, 0, d, 6).is_err(), "overflow");
    }
}
