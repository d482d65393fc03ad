//! Training RMSNorm of `x [.., d]` by `weight [d]`, the reference's arithmetic: normalise in
//! f32, round to `x`'s dtype, scale, round. One kernel forward (bf16) and three backward (the
//! input's gradient; each row's scale; the weight's gradient summed per chunk of rows, then
//! over the chunks, so no atomics and the same result every run).

use super::{at_least_f32, cpu_f32, cpu_store, round_to};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, D};

/// The fused op, or `None` where it does not apply (see the module list in `kernels`).
pub fn fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !(x.dtype() == DType::BF16
        && weight.dtype() == DType::BF16
        && weight.rank() == 1
        && super::on(x.device()))
    {
        return Ok(None);
    }
    let op = RmsNormTrain { eps: eps as f32 };
    Ok(Some(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?))
}

/// The composite of tensor ops (differentiable), normalising in f32 (f64 for f64 `x`).
pub fn slow(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(at_least_f32(x.dtype()))?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32
        .broadcast_div(&(ms + eps)?.sqrt()?)?
        .to_dtype(x.dtype())?;
    Ok(normed.broadcast_mul(weight)?)
}

#[derive(Clone, Copy)]
struct RmsNormTrain {
    eps: f32,
}

fn rows_and_d(xl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize)> {
    let d = *xl.dims().last().unwrap_or(&1);
    if wl.shape().elem_count() != d {
        candle_core::bail!("rms norm: x {:?}, weight {:?}", xl.shape(), wl.shape());
    }
    Ok((xl.shape().elem_count() / d.max(1), d))
}

impl CustomOp2 for RmsNormTrain {
    fn name(&self) -> &'static str {
        "arpg-rms-norm-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = rows_and_d(xl, wl)?;
        let dt = x.dtype();
        let (mut xs, ws) = (cpu_f32(x, xl, "rms norm")?, cpu_f32(w, wl, "rms norm")?);
        for row in xs.chunks_mut(d) {
            let den = (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + self.eps).sqrt();
            for (v, w) in row.iter_mut().zip(&ws) {
                *v = round_to(dt, *v / den) * w;
            }
        }
        Ok((cpu_store(xs, dt)?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view, warp_rows};
        let (rows, d) = rows_and_d(xl, wl)?;
        let (rows_u, d_u) = (rows as u32, d as u32);
        let dev = x.device().clone();
        let xs = view::<half::bf16>(x, xl, "rms norm")?;
        let ws = view::<half::bf16>(w, wl, "rms norm")?;
        // Safety: the kernel writes every element.
        let mut dst = unsafe { dev.alloc::<half::bf16>(rows * d) }?;
        launch!(dev, "rms_norm_fwd_bf16", warp_rows(rows);
            &xs, &ws, &mut dst, &rows_u, &d_u, &self.eps);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = grads(x, w, grad, self.eps)?;
        Ok((Some(gx), Some(gw.to_dtype(w.dtype())?)))
    }
}

/// The gradients of the training RMSNorm's input (in its dtype) and weight (f32, summed
/// over rows in f32) from the output's gradient `grad`: the fused op's backward, and the
/// hand-written training step's.
pub fn backward(x: &Tensor, weight: &Tensor, eps: f64, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok(grads(x, weight, grad, eps as f32)?)
}

fn grads(x: &Tensor, w: &Tensor, grad: &Tensor, eps: f32) -> candle_core::Result<(Tensor, Tensor)> {
    let g = grad.to_dtype(x.dtype())?.contiguous()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 && w.dtype() == DType::BF16 {
        return cuda_bwd::grads(&x.contiguous()?, &w.contiguous()?, &g, eps);
    }
    // With den = sqrt(mean(x^2) + eps), n = x / den and gn = g w (in f32):
    // gx = (gn - n mean(gn n)) / den; gw = sum over rows of g * round(n).
    let x32 = x.to_dtype(DType::F32)?;
    let den = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?;
    let n = x32.broadcast_div(&den)?;
    let gn = g
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let dot = (&gn * &n)?.mean_keepdim(D::Minus1)?;
    let gx = (gn - n.broadcast_mul(&dot)?)?.broadcast_div(&den)?;
    let nr = n.to_dtype(x.dtype())?.to_dtype(DType::F32)?;
    let d = w.elem_count();
    let gw = (g.to_dtype(DType::F32)? * nr)?.reshape(((), d))?.sum(0)?;
    Ok((gx.to_dtype(x.dtype())?, gw))
}

#[cfg(feature = "cuda")]
mod cuda_bwd {
    use super::super::cuda::{cuda_only, launch, view, warp_rows};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

    /// Rows per chunk of the weight gradient's first pass.
    const RMS_CHUNK: usize = 256;

    pub(super) fn grads(
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        eps: f32,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let gx = x.apply_op3_no_bwd(w, g, &BwdX { eps })?;
        let dens = x.apply_op1_no_bwd(&Dens { eps })?;
        let part = x.apply_op3_no_bwd(g, &dens, &BwdW)?;
        Ok((gx, part.sum(0)?.to_dtype(candle_core::DType::F32)?))
    }

    struct BwdX {
        eps: f32,
    }

    impl CustomOp3 for BwdX {
        cuda_only!("arpg-rms-norm-bwd-x"; a: &CpuStorage, b: &Layout, c: &CpuStorage,
            d: &Layout, e: &CpuStorage, f: &Layout);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            if gl.shape() != xl.shape() {
                candle_core::bail!("rms norm backward: {:?} vs {:?}", gl.shape(), xl.shape());
            }
            let (rows, d) = super::rows_and_d(xl, wl)?;
            let (rows_u, d_u) = (rows as u32, d as u32);
            let dev = x.device().clone();
            let what = "rms norm backward";
            let (xs, ws, gs) = (
                view::<half::bf16>(x, xl, what)?,
                view::<half::bf16>(w, wl, what)?,
                view::<half::bf16>(g, gl, what)?,
            );
            // Safety: the kernel writes every element.
            let mut dst = unsafe { dev.alloc::<half::bf16>(rows * d) }?;
            launch!(dev, "rms_norm_bwd_x_bf16", warp_rows(rows);
                &xs, &ws, &gs, &mut dst, &rows_u, &d_u, &self.eps);
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), xl.shape().clone()))
        }
    }

    /// Each row's `sqrt(mean(x^2) + eps)`.
    struct Dens {
        eps: f32,
    }

    impl CustomOp1 for Dens {
        cuda_only!("arpg-rms-norm-dens"; a: &CpuStorage, b: &Layout);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let d = *xl.dims().last().unwrap_or(&1);
            let rows = xl.shape().elem_count() / d;
            let (rows_u, d_u) = (rows as u32, d as u32);
            let dev = x.device().clone();
            let xs = view::<half::bf16>(x, xl, "rms norm scales")?;
            // Safety: the kernel writes one value per row.
            let mut dst = unsafe { dev.alloc::<f32>(rows) }?;
            launch!(dev, "rms_norm_dens_bf16", warp_rows(rows);
                &xs, &mut dst, &rows_u, &d_u, &self.eps);
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(rows)))
        }
    }

    /// The weight's gradient summed over each chunk of rows: `[chunks, d]`, f32.
    struct BwdW;

    impl CustomOp3 for BwdW {
        cuda_only!("arpg-rms-norm-bwd-w"; a: &CpuStorage, b: &Layout, c: &CpuStorage,
            d: &Layout, e: &CpuStorage, f: &Layout);

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
            let what = "rms norm weight gradient";
            let (xs, gs) = (
                view::<half::bf16>(x, xl, what)?,
                view::<half::bf16>(g, gl, what)?,
            );
            let ds = view::<f32>(dens, dl, what)?;
            // Safety: the kernel writes every (chunk, column).
            let mut dst = unsafe { dev.alloc::<f32>(chunks * d) }?;
            let (rows_u, d_u, chunk_u) = (rows as u32, d as u32, RMS_CHUNK as u32);
            let cfg = LaunchConfig {
                grid_dim: ((d as u32).div_ceil(32), chunks as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            launch!(dev, "rms_norm_bwd_w_bf16", cfg;
                &xs, &gs, &ds, &mut dst, &rows_u, &d_u, &chunk_u);
            Ok((
                CudaStorage::wrap_cuda_slice(dst, dev),
                Shape::from((chunks, d)),
            ))
        }
    }
}

/// Max relative differences `[output, input gradient, weight gradient]` of `op` against the
/// composite, for bf16 `x` and weight under a random linear loss.
fn compare(
    device: &Device,
    op: impl Fn(&Tensor, &Tensor, f64) -> Result<Option<Tensor>>,
) -> Result<Option<[f64; 3]>> {
    let (rows, d) = (300, 96);
    let x = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (3, rows / 3, d), device)? * 2.0)?.to_dtype(DType::BF16)?,
    )?;
    let w = candle_core::Var::from_tensor(
        &Tensor::randn(1f32, 0.3, d, device)?.to_dtype(DType::BF16)?,
    )?;
    let loss_w = Tensor::randn(0f32, 1.0, (3, rows / 3, d), device)?;
    let Some(fast) = op(x.as_tensor(), w.as_tensor(), 1e-5)? else {
        return Ok(None);
    };
    let composite = slow(x.as_tensor(), w.as_tensor(), 1e-5)?;
    let grads = |y: &Tensor| -> Result<(Tensor, Tensor)> {
        let g = (y.to_dtype(DType::F32)? * &loss_w)?.sum_all()?.backward()?;
        Ok((
            g.get(&x).cloned().expect("x grad"),
            g.get(&w).cloned().expect("w grad"),
        ))
    };
    let rel = super::rel_diff;
    let ((fx, fw), (gx, gw)) = (grads(&fast)?, grads(&composite)?);
    Ok(Some([
        rel(&fast, &composite)?,
        rel(&fx, &gx)?,
        rel(&fw, &gw)?,
    ]))
}

/// On CUDA: the fused training RMSNorm against the composite (see [`compare`]). `None` off
/// CUDA or with fused kernels off.
pub fn check(device: &Device) -> Result<Option<[f64; 3]>> {
    compare(device, fused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_op_and_its_backward_match_the_composite() {
        let op = |x: &Tensor, w: &Tensor, eps: f64| {
            Ok(Some(x.apply_op2(w, RmsNormTrain { eps: eps as f32 })?))
        };
        let [y, gx, _] = compare(&Device::Cpu, op).unwrap().unwrap();
        // bf16 outputs and input gradients: a rounding apart at most.
        assert!(y < 1e-2 && gx < 1e-2, "{y} {gx}");
    }

    #[test]
    fn the_weight_gradient_is_the_f32_sum_over_rows() {
        // The composite's weight gradient sums the rows' bf16 products in bf16 (4% off in
        // `compare`'s case), so the op's is checked against the exact sum of g * round(x / den).
        let dev = Device::Cpu;
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = bf((Tensor::randn(0f32, 1.0, (300, 96), &dev).unwrap() * 2.0).unwrap());
        let w = candle_core::Var::from_tensor(&bf(Tensor::randn(1f32, 0.3, 96, &dev).unwrap()))
            .unwrap();
        let g = bf(Tensor::randn(0f32, 1.0, (300, 96), &dev).unwrap());
        let y = x
            .apply_op2(w.as_tensor(), RmsNormTrain { eps: 1e-5 })
            .unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap()).unwrap();
        let gw = loss.sum_all().unwrap().backward().unwrap();
        let gw = gw.get(&w).unwrap();
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let x64 = f64_of(&x);
        let den = ((x64.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5).unwrap())
            .sqrt()
            .unwrap();
        let n = f64_of(&bf(x64.broadcast_div(&den).unwrap()));
        let exact = (f64_of(&g) * n).unwrap().sum(0).unwrap();
        let rel = super::super::rel_diff(gw, &exact).unwrap();
        assert!(rel < 1e-2, "{rel}");
    }
}
