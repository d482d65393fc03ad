//! GroupNorm of NCHW `x` with f32 `weight`/`bias [c]`, optionally followed by SiLU: f32
//! statistics in two passes (mean, then mean squared deviation), an f32 affine rounded to
//! `x`'s dtype, then SiLU in f32 of that rounded value, rounded once. One kernel where the
//! composite is ten over f32 copies. Inference only (the VQ decoder): no backward.

use super::{cpu_f32, cpu_store, round_to};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

/// The fused op, or `None` where it does not apply (see the module list in `kernels`).
pub fn fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !(matches!(x.dtype(), DType::F32 | DType::BF16)
        && weight.dtype() == DType::F32
        && bias.dtype() == DType::F32
        && x.rank() == 4
        && x.dim(1)? % groups == 0
        && super::on(x.device()))
    {
        return Ok(None);
    }
    let op = GroupNorm {
        groups,
        eps: eps as f32,
        silu,
    };
    let (w, b) = (weight.flatten_all()?, bias.flatten_all()?);
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&w, &b, &op)?))
}

/// The composite: tensor ops in f32, `x`'s dtype (SiLU, when asked, of the rounded norm in
/// f32, rounded again: the kernel's arithmetic).
pub fn slow(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let xs = x
        .to_dtype(DType::F32)?
        .reshape((b, groups, (c / groups) * h * w))?;
    let xs = xs.broadcast_sub(&xs.mean_keepdim(2)?)?;
    let var = xs.sqr()?.mean_keepdim(2)?;
    let xs = xs
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, h, w))?;
    let (wt, bs) = (weight.reshape((1, c, 1, 1))?, bias.reshape((1, c, 1, 1))?);
    let y = xs
        .broadcast_mul(&wt)?
        .broadcast_add(&bs)?
        .to_dtype(x.dtype())?;
    if silu {
        return Ok(y.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())?);
    }
    Ok(y)
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "arpg-group-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, h, wd) = xl.shape().dims4()?;
        let dt = x.dtype();
        let mut xs = cpu_f32(x, xl, "group norm")?;
        let (ws, bs) = (cpu_f32(w, wl, "group norm")?, cpu_f32(b, bl, "group norm")?);
        let (cpg, hw) = (c / self.groups, h * wd);
        for (gi, grp) in xs.chunks_mut(cpg * hw).enumerate() {
            let n = grp.len() as f32;
            let mean = grp.iter().sum::<f32>() / n;
            let den =
                (grp.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n + self.eps).sqrt();
            let c0 = (gi % self.groups) * cpg;
            for (i, v) in grp.iter_mut().enumerate() {
                let ch = c0 + i / hw;
                let y = round_to(dt, (*v - mean) / den * ws[ch] + bs[ch]);
                *v = if self.silu { y / (1.0 + (-y).exp()) } else { y };
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
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        use candle_core::CudaStorage;
        let (n_img, c, h, wd) = xl.shape().dims4()?;
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!("fused group norm: {c} channels, weight {:?}", wl.shape());
        }
        let dev = x.device().clone();
        let ws = view::<f32>(w, wl, "fused group norm")?;
        let bs = view::<f32>(b, bl, "fused group norm")?;
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
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let xs = view::<$t>(x, xl, "fused group norm")?;
                // Safety: the kernel writes every element.
                let mut dst = unsafe { dev.alloc::<$t>(total) }?;
                launch!(dev, $name, cfg;
                    &xs, &ws, &bs, &mut dst, &n, &hw, &cpg_u, &groups_u, &self.eps, &silu);
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match x.dtype() {
            DType::F32 => run!(f32, "group_norm_f32"),
            DType::BF16 => run!(half::bf16, "group_norm_bf16"),
            dt => candle_core::bail!("fused group norm: {dt:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

const CHECK_GROUPS: usize = 32;
const CHECK_EPS: f64 = 1e-6;

/// `[f32, bf16]` max |op - composite| / max |composite| on random input (with and without
/// SiLU: the larger of the two).
fn compare(
    device: &Device,
    op: impl Fn(&Tensor, &Tensor, &Tensor, bool) -> Result<Option<Tensor>>,
) -> Result<Option<[f64; 2]>> {
    let c = 64;
    let x = (Tensor::randn(0f32, 1.0, (2, c, 9, 7), device)? * 3.0)?;
    let weight = Tensor::randn(1f32, 0.5, (1, c, 1, 1), device)?;
    let bias = Tensor::randn(0f32, 0.5, (1, c, 1, 1), device)?;
    let mut out = [0f64; 2];
    for (k, dt) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let x = x.to_dtype(dt)?;
        for silu in [false, true] {
            let Some(f) = op(&x, &weight, &bias, silu)? else {
                return Ok(None);
            };
            let g = slow(&x, &weight, &bias, CHECK_GROUPS, CHECK_EPS, silu)?;
            out[k] = out[k].max(super::rel_diff(&f, &g)?);
        }
    }
    Ok(Some(out))
}

/// On CUDA: the fused GroupNorm(+SiLU) against the composite (see [`compare`]). `None` off
/// CUDA or with fused kernels off.
pub fn check(device: &Device) -> Result<Option<[f64; 2]>> {
    compare(device, |x, w, b, silu| {
        fused(x, w, b, CHECK_GROUPS, CHECK_EPS, silu)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_op_matches_the_composite() {
        let op = |x: &Tensor, w: &Tensor, b: &Tensor, silu| {
            let op = GroupNorm {
                groups: CHECK_GROUPS,
                eps: CHECK_EPS as f32,
                silu,
            };
            Ok(Some(x.apply_op3_no_bwd(
                &w.flatten_all()?,
                &b.flatten_all()?,
                &op,
            )?))
        };
        let [f32_rel, bf16_rel] = compare(&Device::Cpu, op).unwrap().unwrap();
        assert!(f32_rel < 1e-5, "{f32_rel}");
        assert!(bf16_rel < 1e-2, "{bf16_rel}");
    }
}
