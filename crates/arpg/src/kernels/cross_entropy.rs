//! The training loss and its gradient in one pass over the logits: per row `logsumexp - the
//! target's logit` (f32) and `(softmax - onehot) * scale` in the logits' dtype, without the
//! f32 copies of the logits, probabilities and gradient that the composite makes.

use super::{cpu_f32, cpu_store};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// Per-row losses `[n]` (f32) and the gradient of `scale * sum(losses)` with respect to the
/// logits `[n, v]` (bf16 or f32, in their dtype), for targets `[n]` (u32): two passes over
/// the logits, no f32 copies.
pub fn fused(logits: &Tensor, targets: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let (n, v) = logits.dims2()?;
    ensure!(
        targets.dims() == [n] && targets.dtype() == DType::U32,
        "cross entropy: targets {:?} {:?} for {n} rows",
        targets.dtype(),
        targets.dims()
    );
    ensure!(v > 0, "cross entropy over no classes");
    let (l, t) = (logits.contiguous()?, targets.contiguous()?);
    let loss = l.apply_op2_no_bwd(&t, &CrossEntropy { grad: None })?;
    let grad = l.apply_op2_no_bwd(
        &t,
        &CrossEntropy {
            grad: Some(scale as f32),
        },
    )?;
    Ok((loss, grad))
}

/// The composite: candle's f32 log-softmax's per-row terms and `softmax - onehot`.
pub fn slow(logits: &Tensor, targets: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let (n, _) = logits.dims2()?;
    let l32 = logits.to_dtype(DType::F32)?;
    let lsm = candle_nn::ops::log_softmax(&l32, 1)?;
    let idx = targets.reshape((n, 1))?;
    let loss = lsm.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let minus = Tensor::full(-1f32, (n, 1), logits.device())?;
    let grad = candle_nn::ops::softmax_last_dim(&l32)?.scatter_add(&idx, &minus, 1)?;
    Ok((loss, (grad * scale)?.to_dtype(logits.dtype())?))
}

/// `[n, v]` logits and `[n]` targets to the losses `[n]` (f32), or with `grad` set, to the
/// gradient `[n, v]` scaled by it.
struct CrossEntropy {
    grad: Option<f32>,
}

fn rows(l: &Layout, tl: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, v) = l.shape().dims2()?;
    if tl.shape().elem_count() != n {
        candle_core::bail!("cross entropy: {n} rows, {:?} targets", tl.shape());
    }
    Ok((n, v))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "arpg-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        t: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = rows(l, tl)?;
        let x = cpu_f32(s, l, "cross entropy")?;
        let (a, _) = tl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cross entropy: strided targets".into()))?;
        let CpuStorage::U32(t) = t else {
            candle_core::bail!("cross entropy: {:?} targets", t.dtype())
        };
        let mut out = Vec::with_capacity(if self.grad.is_some() { n * v } else { n });
        for (r, row) in x.chunks_exact(v).enumerate() {
            let tr = t[a + r] as usize;
            if tr >= v {
                candle_core::bail!("cross entropy: target {tr} of {v} classes");
            }
            let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
            match self.grad {
                Some(scale) => out.extend(
                    row.iter()
                        .enumerate()
                        .map(|(i, &x)| ((x - lse).exp() - if i == tr { 1.0 } else { 0.0 }) * scale),
                ),
                None => out.push(lse - row[tr]),
            }
        }
        Ok(match self.grad {
            Some(_) => (cpu_store(out, s.dtype())?, l.shape().clone()),
            None => (CpuStorage::F32(out), Shape::from(n)),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (n, v) = rows(l, tl)?;
        let dev = s.device().clone();
        let ts = view::<u32>(t, tl, "cross entropy")?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let v_u = v as u32;
        macro_rules! run {
            ($t:ty, $loss:literal, $grad:literal) => {{
                let xs = view::<$t>(s, l, "cross entropy")?;
                match self.grad {
                    Some(scale) => {
                        // Safety: the kernel writes every element.
                        let mut g = unsafe { dev.alloc::<$t>(n * v) }?;
                        launch!(dev, $grad, cfg; &xs, &ts, &mut g, &v_u, &scale);
                        (candle_core::CudaStorage::wrap_cuda_slice(g, dev), l.shape().clone())
                    }
                    None => {
                        // Safety: the kernel writes every row's loss.
                        let mut loss = unsafe { dev.alloc::<f32>(n) }?;
                        launch!(dev, $loss, cfg; &xs, &ts, &mut loss, &v_u);
                        (candle_core::CudaStorage::wrap_cuda_slice(loss, dev), Shape::from(n))
                    }
                }
            }};
        }
        Ok(match s.dtype() {
            DType::BF16 => run!(
                half::bf16,
                "cross_entropy_loss_bf16",
                "cross_entropy_grad_bf16"
            ),
            DType::F32 => run!(f32, "cross_entropy_loss_f32", "cross_entropy_grad_f32"),
            dt => candle_core::bail!("cross entropy: {dt:?} logits"),
        })
    }
}

/// The fused op against the composite on `device` in `dtype` (1,000 classes, a few rows of
/// seeded logits):
/// the losses' and the gradients' relative differences.
pub fn compare(device: &candle_core::Device, dtype: DType) -> Result<[f64; 2]> {
    let (n, v) = (37, 1000);
    // Seeded logits: the difference sits near f32 rounding, so it must not vary run to run.
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let vals: Vec<f32> = (0..n * v).map(|_| rng.random_range(-6f32..6.0)).collect();
    let logits = Tensor::from_vec(vals, (n, v), device)?.to_dtype(dtype)?;
    let t: Vec<u32> = (0..n as u32).map(|i| (i * 389 + 7) % v as u32).collect();
    let targets = Tensor::from_vec(t, n, device)?;
    let (fl, fg) = fused(&logits, &targets, 0.25)?;
    let (sl, sg) = slow(&logits, &targets, 0.25)?;
    Ok([super::rel_diff(&fl, &sl)?, super::rel_diff(&fg, &sg)?])
}

/// [`compare`] in bf16 on CUDA; `None` elsewhere.
pub fn check(device: &candle_core::Device) -> Result<Option<[f64; 2]>> {
    match device.is_cuda() {
        true => Ok(Some(compare(device, DType::BF16)?)),
        false => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_loss_and_gradient_match_the_composite() {
        let dev = candle_core::Device::Cpu;
        let [l, g] = compare(&dev, DType::F32).unwrap();
        assert!(l < 1e-6 && g < 1e-6, "f32: loss {l:e}, gradient {g:e}");
        let [l, g] = compare(&dev, DType::BF16).unwrap();
        assert!(l < 1e-6 && g < 1e-2, "bf16: loss {l:e}, gradient {g:e}");
        let logits = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let bad = Tensor::new(&[1u32, 4], &dev).unwrap();
        assert!(fused(&logits, &bad, 1.0).is_err(), "a target out of range");
    }
}
