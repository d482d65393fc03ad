//! Fused CUDA kernels for the bf16 decoding step, where candle has none. Sampling is
//! launch-bound (hundreds of small kernels per step), so each kernel saved is time saved.

use anyhow::Result;
use candle_core::Tensor;

/// Interleaved RoPE of bf16 `x [b, h, t, d]` by f32 `cos`/`sin [b, t, d/2]` in one kernel
/// (the generic path is three: cast to f32, rotate, cast back; same arithmetic). `None` when it
/// does not apply (not CUDA, not bf16, or a build without the `cuda` feature).
pub fn rope_i_bf16(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if x.device().is_cuda()
            && x.dtype() == DType::BF16
            && cos.dtype() == DType::F32
            && sin.dtype() == DType::F32
            && x.rank() == 4
        {
            let x = x.contiguous()?;
            let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
            return Ok(Some(x.apply_op3_no_bwd(&cos, &sin, &cuda::RopeBf16)?));
        }
    }
    let _ = (x, cos, sin);
    Ok(None)
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape};

    /// Every kernel of `kernels/fused.cu`, loaded once per device as module `arpg_fused`.
    pub(crate) const PTX: &str = include_str!("kernels/fused.ptx");

    pub struct RopeBf16;

    fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("fused rope kernel: {e:?}"))
    }

    impl CustomOp3 for RopeBf16 {
        fn name(&self) -> &'static str {
            "arpg-rope-i-bf16"
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
            candle_core::bail!("the fused bf16 RoPE kernel is CUDA only")
        }

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
            let func = dev.get_or_load_custom_func("rope_i_bf16_f32", "arpg_fused", PTX)?;
            let (h, t, half_d) = (h as u32, t as u32, (d / 2) as u32);
            let mut builder = func.builder();
            builder.arg(&xs);
            builder.arg(&cs);
            builder.arg(&ss);
            builder.arg(&mut dst);
            builder.arg(&h);
            builder.arg(&t);
            builder.arg(&half_d);
            builder.arg(&pairs);
            let cfg = LaunchConfig {
                grid_dim: (pairs.div_ceil(256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // Safety: argument types and count match the kernel's signature.
            unsafe { builder.launch(cfg) }.map_err(err)?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), xl.shape().clone()))
        }
    }
}
