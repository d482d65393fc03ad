//! Fused CUDA kernels for the bf16 decoding step, where candle has none. Sampling is
//! launch-bound (hundreds of small kernels per step), so each kernel saved is time saved.

use anyhow::Result;
use candle_core::Tensor;

/// Interleaved RoPE of bf16 `x [b, h, t, d]` by f32 `cos`/`sin [b, t, d/2]` in one kernel
/// (the generic path is three: cast to f32, rotate, cast back; same arithmetic), differentiable
/// in `x`: the backward rotates the gradient by the opposite angles, one kernel too. `None` when
/// it does not apply (not CUDA, not bf16, or a build without the `cuda` feature).
pub fn rope_i_bf16(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if x.device().is_cuda()
            && x.dtype() == DType::BF16
            && cos.dtype() == DType::F32
            && sin.dtype() == DType::F32
            && x.rank() == 4
            && enabled()
        {
            let x = x.contiguous()?;
            let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
            return Ok(Some(x.apply_op3(&cos, &sin, cuda::RopeBf16)?));
        }
    }
    let _ = (x, cos, sin);
    Ok(None)
}

/// max |a - b| / max |b| over all elements, in f32: how the GPU self-checks compare a fused
/// kernel's output (or gradient) `a` with the generic ops' `b`.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    use candle_core::DType;
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(d / (b.abs()?.max_all()?.to_scalar::<f32>()? as f64).max(1e-12))
}

/// False with `ARPG_NO_FUSED` set: every op takes the generic path (for A/B measurements).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ARPG_NO_FUSED").is_none())
}

/// GroupNorm of NCHW `x` (f32 or bf16, on CUDA) with f32 `weight`/`bias [c]`, optionally
/// followed by SiLU, in one kernel (the generic path is ten kernels over f32 copies; same
/// arithmetic). `None` when it does not apply.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if enabled()
            && x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
            && weight.dtype() == DType::F32
            && bias.dtype() == DType::F32
            && x.rank() == 4
            && x.dim(1)? % groups == 0
        {
            let op = cuda::GroupNorm {
                groups,
                eps: eps as f32,
                silu,
            };
            let (w, b) = (weight.flatten_all()?, bias.flatten_all()?);
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(&w, &b, &op)?));
        }
    }
    let _ = (x, weight, bias, groups, eps, silu);
    Ok(None)
}

/// Attention probabilities `softmax(scores * scale)` over the last dimension of
/// `[b, h, tq, tk]` scores (f32 or bf16, on CUDA), masked by `causal` when given,
/// computed in f32 and rounded once to the scores' dtype; differentiable, with a backward of
/// one kernel (`scale * p * (g - sum(p * g))` from the saved probabilities). The generic path
/// is about six kernels forward and a dozen backward over f32 copies. `None` when it does not
/// apply.
pub fn attn_softmax(
    scores: &Tensor,
    scale: f64,
    causal: Option<super::layers::CausalMask>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if enabled()
            && scores.device().is_cuda()
            && matches!(scores.dtype(), DType::F32 | DType::BF16)
            && scores.rank() == 4
        {
            if let Some(m) = causal {
                let (tq, tk) = (scores.dim(2)?, scores.dim(3)?);
                anyhow::ensure!(
                    (m.tq, m.tk) == (tq, tk),
                    "a {}x{} mask for {:?} scores",
                    m.tq,
                    m.tk,
                    scores.shape()
                );
            }
            let op = cuda::AttnSoftmax {
                scale: scale as f32,
                causal: causal.is_some(),
                offset: causal.map_or(0, |m| m.offset()) as u32,
            };
            return Ok(Some(scores.contiguous()?.apply_op1(op)?));
        }
    }
    let _ = (scores, scale, causal);
    Ok(None)
}

/// Training RMSNorm of bf16 `x [.., d]` by bf16 `weight [d]` on CUDA: one kernel forward (the
/// generic path's arithmetic: normalise in f32, round, scale, round) and three backward (the
/// input's gradient; each row's scale; the weight's gradient summed per chunk of rows, then
/// over the chunks, so no atomics and the same result every run). `None` when it does not
/// apply.
pub fn rms_norm_train(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if enabled()
            && x.device().is_cuda()
            && x.dtype() == DType::BF16
            && weight.dtype() == DType::BF16
            && weight.rank() == 1
        {
            let op = cuda::RmsNormTrain { eps: eps as f32 };
            return Ok(Some(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?));
        }
    }
    let _ = (x, weight, eps);
    Ok(None)
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape};

    /// Every kernel of `kernels/fused.cu`, loaded once per device as module `arpg_fused`.
    pub(crate) const PTX: &str = include_str!("kernels/fused.ptx");

    /// A custom op's `name` and a `cpu_fwd` that refuses (`n` inputs): CUDA kernels only.
    macro_rules! cuda_only {
        (1, $name:literal) => {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                candle_core::bail!(concat!($name, ": CUDA only"))
            }
        };
        (2, $name:literal) => {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                candle_core::bail!(concat!($name, ": CUDA only"))
            }
        };
        (3, $name:literal) => {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                candle_core::bail!(concat!($name, ": CUDA only"))
            }
        };
    }

    /// Launch kernel `name` of [`PTX`] on `dev` with `cfg` and the arguments in order.
    macro_rules! run_kernel {
        ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
            let func = $dev.get_or_load_custom_func($name, "arpg_fused", PTX)?;
            let mut builder = func.builder();
            $(builder.arg($arg);)+
            // Safety: every call site passes the kernel's arguments in its order and types.
            unsafe { builder.launch($cfg) }.map_err(err)?;
        }};
    }

    #[derive(Clone, Copy)]
    pub struct RopeBf16;

    fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("fused kernel launch: {e:?}"))
    }

    impl CustomOp3 for RopeBf16 {
        cuda_only!(3, "arpg-rope-i-bf16");

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            c: &CudaStorage,
            cl: &Layout,
            s: &CudaStorage,
            sl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (b, h, t, d) = xl.shape().dims4()?;
            let (cb, ct, ch) = cl.shape().dims3()?;
            if (cb, ct, ch) != (b, t, d / 2) || sl.shape() != cl.shape() || d % 2 != 0 {
                candle_core::bail!(
                    "fused rope: x {:?}, cos {:?}, sin {:?}",
                    xl.shape(),
                    cl.shape(),
                    sl.shape()
                );
            }
            let off = |l: &Layout| {
                l.contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("fused rope: strided input".into()))
            };
            let (xo, co, so) = (off(xl)?, off(cl)?, off(sl)?);
            let dev = x.device().clone();
            let xs = x.as_cuda_slice::<half::bf16>()?.slice(xo.0..xo.1);
            let cs = c.as_cuda_slice::<f32>()?.slice(co.0..co.1);
            let ss = s.as_cuda_slice::<f32>()?.slice(so.0..so.1);
            let n = b * h * t * d;
            let pairs = (n / 2) as u32;
            // Safety: the kernel writes every element.
            let mut dst = unsafe { dev.alloc::<half::bf16>(n) }?;
            let (h, t, half_d) = (h as u32, t as u32, (d / 2) as u32);
            let cfg = LaunchConfig {
                grid_dim: (pairs.div_ceil(256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            run_kernel!(
                dev,
                "rope_i_bf16_f32",
                cfg;
                &xs,
                &cs,
                &ss,
                &mut dst,
                &h,
                &t,
                &half_d,
                &pairs,
            );
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), xl.shape().clone()))
        }

        fn bwd(
            &self,
            _x: &candle_core::Tensor,
            cos: &candle_core::Tensor,
            sin: &candle_core::Tensor,
            _res: &candle_core::Tensor,
            grad: &candle_core::Tensor,
        ) -> candle_core::Result<(
            Option<candle_core::Tensor>,
            Option<candle_core::Tensor>,
            Option<candle_core::Tensor>,
        )> {
            // A rotation's transpose is the rotation by the opposite angle.
            let g = grad.to_dtype(candle_core::DType::BF16)?.contiguous()?;
            let gx = g.apply_op3_no_bwd(cos, &sin.neg()?, self)?;
            Ok((Some(gx), None, None))
        }
    }

    pub struct GroupNorm {
        pub groups: usize,
        pub eps: f32,
        pub silu: bool,
    }

    impl CustomOp3 for GroupNorm {
        cuda_only!(3, "arpg-group-norm");

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::DType;
            let (n_img, c, h, wd) = xl.shape().dims4()?;
            if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
                candle_core::bail!("fused group norm: {c} channels, weight {:?}", wl.shape());
            }
            let off = |l: &Layout| {
                l.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("fused group norm: strided input".into())
                })
            };
            let (xo, wo, bo) = (off(xl)?, off(wl)?, off(bl)?);
            let dev = x.device().clone();
            let ws = w.as_cuda_slice::<f32>()?.slice(wo.0..wo.1);
            let bs = b.as_cuda_slice::<f32>()?.slice(bo.0..bo.1);
            let cpg = c / self.groups;
            let (n, hw) = ((cpg * h * wd) as u32, (h * wd) as u32);
            let (cpg_u, groups_u) = (cpg as u32, self.groups as u32);
            let silu = self.silu as i32;
            let cfg = LaunchConfig {
                grid_dim: ((n_img * self.groups) as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            let total = n_img * c * h * wd;
            macro_rules! launch {
                ($t:ty, $name:literal) => {{
                    let xs = x.as_cuda_slice::<$t>()?.slice(xo.0..xo.1);
                    // Safety: the kernel writes every element.
                    let mut dst = unsafe { dev.alloc::<$t>(total) }?;
                    run_kernel!(
                        dev,
                        $name,
                        cfg;
                        &xs,
                        &ws,
                        &bs,
                        &mut dst,
                        &n,
                        &hw,
                        &cpg_u,
                        &groups_u,
                        &self.eps,
                        &silu,
                    );
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }};
            }
            let out = match x.dtype() {
                DType::F32 => launch!(f32, "group_norm_f32"),
                DType::BF16 => launch!(half::bf16, "group_norm_bf16"),
                dt => candle_core::bail!("fused group norm: {dt:?}"),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: strided input")))
    }

    #[derive(Clone, Copy)]
    pub struct AttnSoftmax {
        pub scale: f32,
        pub causal: bool,
        /// Keys visible to every query before its own position (a decoding step's cache).
        pub offset: u32,
    }

    impl candle_core::CustomOp1 for AttnSoftmax {
        cuda_only!(1, "arpg-attn-softmax");

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::DType;
            let (b, h, tq, tk) = l.shape().dims4()?;
            let (o0, o1) = contiguous(l, "fused attention softmax")?;
            let dev = s.device().clone();
            let rows = (b * h * tq) as u32;
            let (tq_u, tk_u, causal) = (tq as u32, tk as u32, self.causal as i32);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            macro_rules! launch {
                ($t:ty, $name:literal) => {{
                    let src = s.as_cuda_slice::<$t>()?.slice(o0..o1);
                    // Safety: the kernel writes every element.
                    let mut dst = unsafe { dev.alloc::<$t>(o1 - o0) }?;
                    run_kernel!(
                        dev,
                        $name,
                        cfg;
                        &src,
                        &mut dst,
                        &rows,
                        &tq_u,
                        &tk_u,
                        &self.scale,
                        &causal,
                        &self.offset,
                    );
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }};
            }
            let out = match s.dtype() {
                DType::F32 => launch!(f32, "attn_softmax_f32"),
                DType::BF16 => launch!(half::bf16, "attn_softmax_bf16"),
                dt => candle_core::bail!("fused attention softmax: {dt:?}"),
            };
            Ok((out, l.shape().clone()))
        }

        fn bwd(
            &self,
            _arg: &candle_core::Tensor,
            res: &candle_core::Tensor,
            grad: &candle_core::Tensor,
        ) -> candle_core::Result<Option<candle_core::Tensor>> {
            let grad = grad.to_dtype(res.dtype())?.contiguous()?;
            Ok(Some(
                res.apply_op2_no_bwd(&grad, &AttnSoftmaxBwd(self.scale))?,
            ))
        }
    }

    /// `scale * p * (g - sum(p * g))` per row, from probabilities `p` and their gradient `g`.
    pub struct AttnSoftmaxBwd(pub f32);

    impl candle_core::CustomOp2 for AttnSoftmaxBwd {
        cuda_only!(2, "arpg-attn-softmax-bwd");

        fn cuda_fwd(
            &self,
            p: &CudaStorage,
            pl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::DType;
            if pl.shape() != gl.shape() {
                candle_core::bail!("softmax backward: {:?} vs {:?}", pl.shape(), gl.shape());
            }
            let tk = *pl.dims().last().unwrap_or(&1);
            let n = pl.shape().elem_count();
            let (p0, p1) = contiguous(pl, "softmax backward")?;
            let (g0, g1) = contiguous(gl, "softmax backward")?;
            let dev = p.device().clone();
            let rows = (n / tk.max(1)) as u32;
            let tk_u = tk as u32;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            macro_rules! launch {
                ($t:ty, $name:literal) => {{
                    let ps = p.as_cuda_slice::<$t>()?.slice(p0..p1);
                    let gs = g.as_cuda_slice::<$t>()?.slice(g0..g1);
                    // Safety: the kernel writes every element.
                    let mut dst = unsafe { dev.alloc::<$t>(n) }?;
                    run_kernel!(
                        dev,
                        $name,
                        cfg;
                        &ps,
                        &gs,
                        &mut dst,
                        &rows,
                        &tk_u,
                        &self.0,
                    );
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }};
            }
            let out = match p.dtype() {
                DType::F32 => launch!(f32, "attn_softmax_bwd_f32"),
                DType::BF16 => launch!(half::bf16, "attn_softmax_bwd_bf16"),
                dt => candle_core::bail!("softmax backward: {dt:?}"),
            };
            Ok((out, pl.shape().clone()))
        }
    }

    type Bf16View<'a> = candle_core::cuda_backend::cudarc::driver::CudaView<'a, half::bf16>;

    fn bf16_view<'a>(
        st: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<Bf16View<'a>> {
        let (a, b) = contiguous(l, what)?;
        Ok(st.as_cuda_slice::<half::bf16>()?.slice(a..b))
    }

    fn warp_rows(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    #[derive(Clone, Copy)]
    pub struct RmsNormTrain {
        pub eps: f32,
    }

    impl candle_core::CustomOp2 for RmsNormTrain {
        cuda_only!(2, "arpg-rms-norm-train");

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let d = *xl.dims().last().unwrap_or(&1);
            if wl.shape().elem_count() != d {
                candle_core::bail!(
                    "fused rms norm: x {:?}, weight {:?}",
                    xl.shape(),
                    wl.shape()
                );
            }
            let n = xl.shape().elem_count();
            let (rows, d_u) = ((n / d) as u32, d as u32);
            let dev = x.device().clone();
            let (xs, ws) = (bf16_view(x, xl, "rms norm")?, bf16_view(w, wl, "rms norm")?);
            // Safety: the kernel writes every element.
            let mut dst = unsafe { dev.alloc::<half::bf16>(n) }?;
            run_kernel!(
                dev,
                "rms_norm_fwd_bf16",
                warp_rows(n / d);
                &xs,
                &ws,
                &mut dst,
                &rows,
                &d_u,
                &self.eps,
            );
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), xl.shape().clone()))
        }

        fn bwd(
            &self,
            x: &candle_core::Tensor,
            w: &candle_core::Tensor,
            _res: &candle_core::Tensor,
            grad: &candle_core::Tensor,
        ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)>
        {
            let g = grad.to_dtype(candle_core::DType::BF16)?.contiguous()?;
            let gx = x.apply_op3_no_bwd(w, &g, &RmsNormBwdX { eps: self.eps })?;
            let dens = x.apply_op1_no_bwd(&RmsNormDens { eps: self.eps })?;
            let part = x.apply_op3_no_bwd(&g, &dens, &RmsNormBwdW)?;
            let gw = part.sum(0)?.to_dtype(w.dtype())?;
            Ok((Some(gx), Some(gw)))
        }
    }

    struct RmsNormBwdX {
        eps: f32,
    }

    impl CustomOp3 for RmsNormBwdX {
        cuda_only!(3, "arpg-rms-norm-bwd-x");

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let d = *xl.dims().last().unwrap_or(&1);
            let n = xl.shape().elem_count();
            if gl.shape() != xl.shape() {
                candle_core::bail!("rms norm backward: {:?} vs {:?}", gl.shape(), xl.shape());
            }
            let (rows, d_u) = ((n / d) as u32, d as u32);
            let dev = x.device().clone();
            let (xs, ws, gs) = (
                bf16_view(x, xl, "rms norm backward")?,
                bf16_view(w, wl, "rms norm backward")?,
                bf16_view(g, gl, "rms norm backward")?,
            );
            // Safety: the kernel writes every element.
            let mut dst = unsafe { dev.alloc::<half::bf16>(n) }?;
            run_kernel!(
                dev,
                "rms_norm_bwd_x_bf16",
                warp_rows(n / d);
                &xs,
                &ws,
                &gs,
                &mut dst,
                &rows,
                &d_u,
                &self.eps,
            );
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), xl.shape().clone()))
        }
    }

    struct RmsNormDens {
        eps: f32,
    }

    impl candle_core::CustomOp1 for RmsNormDens {
        cuda_only!(1, "arpg-rms-norm-dens");

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let d = *xl.dims().last().unwrap_or(&1);
            let rows = xl.shape().elem_count() / d;
            let (rows_u, d_u) = (rows as u32, d as u32);
            let dev = x.device().clone();
            let xs = bf16_view(x, xl, "rms norm scales")?;
            // Safety: the kernel writes one value per row.
            let mut dst = unsafe { dev.alloc::<f32>(rows) }?;
            run_kernel!(
                dev,
                "rms_norm_dens_bf16",
                warp_rows(rows);
                &xs,
                &mut dst,
                &rows_u,
                &d_u,
                &self.eps,
            );
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(rows)))
        }
    }

    /// Rows per chunk of the weight gradient's first pass.
    const RMS_CHUNK: usize = 256;

    struct RmsNormBwdW;

    impl CustomOp3 for RmsNormBwdW {
        cuda_only!(3, "arpg-rms-norm-bwd-w");

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
            dens: &CudaStorage,
            dl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let d = *xl.dims().last().unwrap_or(&1);
            let rows = xl.shape().elem_count() / d;
            let chunks = rows.div_ceil(RMS_CHUNK).max(1);
            let dev = x.device().clone();
            let (xs, gs) = (
                bf16_view(x, xl, "rms norm weight gradient")?,
                bf16_view(g, gl, "rms norm weight gradient")?,
            );
            let (d0, d1) = contiguous(dl, "rms norm weight gradient")?;
            let ds = dens.as_cuda_slice::<f32>()?.slice(d0..d1);
            // Safety: the kernel writes every (chunk, column).
            let mut dst = unsafe { dev.alloc::<f32>(chunks * d) }?;
            let (rows_u, d_u, chunk_u) = (rows as u32, d as u32, RMS_CHUNK as u32);
            let cfg = LaunchConfig {
                grid_dim: ((d as u32).div_ceil(32), chunks as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            run_kernel!(
                dev,
                "rms_norm_bwd_w_bf16",
                cfg;
                &xs,
                &gs,
                &ds,
                &mut dst,
                &rows_u,
                &d_u,
                &chunk_u,
            );
            Ok((
                CudaStorage::wrap_cuda_slice(dst, dev),
                Shape::from((chunks, d)),
            ))
        }
    }
}
