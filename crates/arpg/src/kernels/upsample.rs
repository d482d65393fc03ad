//! Nearest-neighbour 2x upsampling of NHWC activations (the VQ decoder's, on cuDNN): one copy
//! kernel of 16-byte vectors. The composite is candle's strided copy of a rank-6 broadcast,
//! about 7x slower at the decoder's 256x256x128 level. A copy, so the check is equality.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// The composite: each pixel repeated along both image axes.
pub fn slow_nhwc(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    Ok(x.reshape((n, h, 1, w, 1, c))?
        .broadcast_as((n, h, 2, w, 2, c))?
        .contiguous()?
        .reshape((n, h * 2, w * 2, c))?)
}

/// The kernel on CUDA, for pixels of whole 16-byte vectors; `None` elsewhere.
pub fn fused_nhwc(x: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if super::on(x.device()) && x.rank() == 4 {
        let row = x.dim(3)? * x.dtype().size_in_bytes();
        let x = x.contiguous()?;
        let aligned = x.layout().start_offset() * x.dtype().size_in_bytes() % 16 == 0;
        if row % 16 == 0 && aligned {
            return Ok(Some(x.apply_op1_no_bwd(&cuda::Upsample2)?));
        }
    }
    let _ = x;
    Ok(None)
}

/// On CUDA: whether the kernel equals the composite, in f32 and bf16. `None` off CUDA.
pub fn check(device: &Device) -> Result<Option<bool>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    let x = Tensor::randn(0f32, 1.0, (2, 5, 3, 16), device)?;
    let mut same = true;
    for dt in [DType::F32, DType::BF16] {
        let x = x.to_dtype(dt)?;
        let Some(f) = fused_nhwc(&x)? else {
            return Ok(None);
        };
        let diff = (f.to_dtype(DType::F32)? - slow_nhwc(&x)?.to_dtype(DType::F32)?)?;
        same &= diff.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
    }
    Ok(Some(same))
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::kernels::cuda::{cuda_only, launch};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape};

    pub(super) struct Upsample2;

    impl CustomOp1 for Upsample2 {
        cuda_only!("arpg-upsample2-nhwc"; s: &CpuStorage, l: &Layout);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (n, h, w, c) = l.shape().dims4()?;
            let bytes = s.dtype().size_in_bytes();
            let (cv, vecs) = ((c * bytes / 16) as u32, n * h * w * c * bytes / 16);
            let dev = s.device().clone();
            let (h_u, w_u) = (h as u32, w as u32);
            let per_image = 4 * h * w * cv as usize;
            let cfg = LaunchConfig {
                grid_dim: (per_image.div_ceil(256).min(2048) as u32, n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            macro_rules! run {
                ($t:ty) => {{
                    let start = l.start_offset();
                    let src = s.as_cuda_slice::<$t>()?.slice(start..start + vecs * 16 / bytes);
                    // Safety: the kernel writes every output vector.
                    let mut dst = unsafe { dev.alloc::<$t>(4 * vecs * 16 / bytes) }?;
                    // The kernel moves whole 16-byte vectors whatever the element type.
                    launch!(dev, "upsample2_nhwc", cfg; &src, &mut dst, &h_u, &w_u, &cv);
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }};
            }
            let out = match s.dtype() {
                candle_core::DType::F32 => run!(f32),
                candle_core::DType::BF16 => run!(half::bf16),
                candle_core::DType::F16 => run!(half::f16),
                dt => candle_core::bail!("upsample: {dt:?}"),
            };
            Ok((out, Shape::from((n, 2 * h, 2 * w, c))))
        }
    }
}
