//! Interleaved RoPE: channel pairs (2m, 2m+1) of `x [b, h, t, d]` rotated by `cos`/`sin
//! [b, t, d/2]`, in f32, rounded once to `x`'s dtype. The kernel (bf16 `x`, f32 tables) is one
//! launch where the composite is three (cast, rotate, cast back), and its backward is the
//! same op by the opposite angles.

use super::{at_least_f32, cpu_f32, cpu_store};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, D};

/// The fused op, or `None` where it does not apply (see the module list in `kernels`).
pub fn fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !(x.dtype() == DType::BF16
        && cos.dtype() == DType::F32
        && sin.dtype() == DType::F32
        && x.rank() == 4
        && super::on(x.device()))
    {
        return Ok(None);
    }
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    Ok(Some(x.contiguous()?.apply_op3(&cos, &sin, RopeI)?))
}

/// The composite of tensor ops (differentiable), in f32 (f64 for f64 `x`).
pub fn slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(at_least_f32(dtype))?;
    let (cos, sin) = (&cos.to_dtype(x32.dtype())?, &sin.to_dtype(x32.dtype())?);
    let (b, h, t, d) = x32.dims4()?;
    let xs = x32.reshape((b, h, t, d / 2, 2))?;
    let x0 = xs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let x1 = xs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let c = cos.unsqueeze(1)?;
    let s = sin.unsqueeze(1)?;
    let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
    let o1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
    Ok(Tensor::stack(&[o0, o1], D::Minus1)?
        .reshape((b, h, t, d))?
        .to_dtype(dtype)?)
}

#[derive(Clone, Copy)]
struct RopeI;

fn check_shapes(xl: &Layout, cl: &Layout, sl: &Layout) -> candle_core::Result<(usize, usize)> {
    let (b, h, t, d) = xl.shape().dims4()?;
    if cl.shape().dims3()? != (b, t, d / 2) || sl.shape() != cl.shape() || d % 2 != 0 {
        candle_core::bail!(
            "fused rope: x {:?}, cos {:?}, sin {:?}",
            xl.shape(),
            cl.shape(),
            sl.shape()
        );
    }
    Ok((h, t))
}

impl CustomOp3 for RopeI {
    fn name(&self) -> &'static str {
        "arpg-rope-i"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, t) = check_shapes(xl, cl, sl)?;
        let half_d = *cl.dims().last().unwrap_or(&1);
        let xs = cpu_f32(x, xl, "rope")?;
        let (cs, ss) = (cpu_f32(c, cl, "rope")?, cpu_f32(s, sl, "rope")?);
        let mut out = vec![0f32; xs.len()];
        for (p, o) in out.chunks_exact_mut(2).enumerate() {
            let (k, row) = (p % half_d, p / half_d);
            let ci = (row / t / h * t + row % t) * half_d + k;
            let (x0, x1) = (xs[2 * p], xs[2 * p + 1]);
            o[0] = x0 * cs[ci] - x1 * ss[ci];
            o[1] = x0 * ss[ci] + x1 * cs[ci];
        }
        Ok((cpu_store(out, x.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (h, t) = check_shapes(xl, cl, sl)?;
        let dev = x.device().clone();
        let xs = view::<half::bf16>(x, xl, "fused rope")?;
        let cs = view::<f32>(c, cl, "fused rope")?;
        let ss = view::<f32>(s, sl, "fused rope")?;
        let n = xl.shape().elem_count();
        let pairs = (n / 2) as u32;
        // Safety: the kernel writes every element.
        let mut dst = unsafe { dev.alloc::<half::bf16>(n) }?;
        let (h, t, half_d) = (h as u32, t as u32, (*cl.dims().last().unwrap_or(&1)) as u32);
        let cfg = LaunchConfig {
            grid_dim: (pairs.div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "rope_i_bf16_f32", cfg; &xs, &cs, &ss, &mut dst, &h, &t, &half_d, &pairs);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A rotation's transpose is the rotation by the opposite angle.
        let g = grad.to_dtype(res.dtype())?.contiguous()?;
        let gx = g.apply_op3_no_bwd(cos, &sin.neg()?, self)?;
        Ok((Some(gx), None, None))
    }
}

/// On CUDA: the gradient of a random linear loss through the fused bf16 RoPE against the
/// composite's, max relative difference. `None` off CUDA or with fused kernels off.
pub fn check(device: &Device) -> Result<Option<f64>> {
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = candle_core::Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (b, h, t, d), device)?.to_dtype(DType::BF16)?,
    )?;
    let ang = Tensor::randn(0f32, 2.0, (b, t, d / 2), device)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let w = Tensor::randn(0f32, 1.0, (b, h, t, d), device)?;
    let Some(fused) = fused(x.as_tensor(), &cos, &sin)? else {
        return Ok(None);
    };
    let grad = |y: &Tensor| -> Result<Tensor> {
        let loss = (y.to_dtype(DType::F32)? * &w)?.sum_all()?;
        Ok(loss.backward()?.get(&x).cloned().expect("a gradient"))
    };
    let (gf, gg) = (grad(&fused)?, grad(&slow(x.as_tensor(), &cos, &sin)?)?);
    Ok(Some(super::rel_diff(&gf, &gg)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_op_and_its_backward_match_the_composite() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 8);
        let ang = Tensor::randn(0f32, 2.0, (b, t, d / 2), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let w = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        for (dt, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let x0 = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
            let x = candle_core::Var::from_tensor(&x0.to_dtype(dt).unwrap()).unwrap();
            let op = x.as_tensor().apply_op3(&cos, &sin, RopeI).unwrap();
            let composite = slow(x.as_tensor(), &cos, &sin).unwrap();
            assert!(
                super::super::rel_diff(&op, &composite).unwrap() < tol,
                "{dt:?}"
            );
            let grad = |y: &Tensor| {
                let loss = (y.to_dtype(DType::F32).unwrap() * &w).unwrap();
                let g = loss.sum_all().unwrap().backward().unwrap();
                g.get(&x).cloned().unwrap()
            };
            let rel = super::super::rel_diff(&grad(&op), &grad(&composite)).unwrap();
            assert!(rel < tol, "{dt:?} gradient: {rel}");
        }
    }
}
