//! bf16 to f32, 16-byte loads: the hand-written step's gradients come out of the GEMMs in
//! bf16 and the optimizer sums them in f32, about 200 casts a step where candle's kernel
//! moves one value a thread. Widening is exact, so the result is `to_dtype`'s bit for bit.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// `t` in f32: the kernel for contiguous bf16 on CUDA, `to_dtype` elsewhere.
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.dtype() == DType::BF16 && t.elem_count() > 0 && super::on(t.device()) {
        return cuda(t);
    }
    Ok(t.to_dtype(DType::F32)?)
}

#[cfg(feature = "cuda")]
fn cuda(t: &Tensor) -> Result<Tensor> {
    use super::cuda::{cuda_view, launch, tensor};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    let t = super::aligned(t)?;
    let n = t.elem_count();
    let dev = t.device().as_cuda_device()?.clone();
    let (g, l) = t.storage_and_layout();
    let x = cuda_view::<half::bf16>(&g, l, "widen")?;
    // Safety: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<f32>(n) }?;
    let cfg = LaunchConfig {
        grid_dim: ((n.div_ceil(8) as u32).div_ceil(256).clamp(1, 65535), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_u = n as u64;
    launch!(dev, "widen_bf16_f32", cfg; &x, &mut y, &n_u);
    Ok(tensor(y, &dev, t.shape().clone()))
}

/// [`to_f32`] against `to_dtype` on `device` (0 expected: widening is exact), over a size
/// with a tail past the last full vector.
pub fn compare(device: &candle_core::Device) -> Result<f64> {
    let t = Tensor::randn(0f32, 1.0, (37, 101), device)?.to_dtype(DType::BF16)?;
    let part = t.narrow(0, 3, 30)?;
    Ok(
        super::rel_diff(&to_f32(&t)?, &t.to_dtype(DType::F32)?)?.max(super::rel_diff(
            &to_f32(&part)?,
            &part.to_dtype(DType::F32)?,
        )?),
    )
}
