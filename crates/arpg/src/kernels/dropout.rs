//! Dropout from a counter-based generator: whether element `i` of a site survives is a hash
//! of (the site's seed, `i`), so the mask is never stored (the backward draws it again), is
//! the same on the CPU and on CUDA, and the forward can fuse it into the residual add. The
//! autograd path multiplies by the same mask, materialised ([`mask`]).

use super::{cpu_f32, cpu_store, round_to};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

/// One forward pass's dropout: probability `p`; site `k` (in the order the forward applies
/// them) draws from `seed` mixed with `k`.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    pub fn site(&self, k: usize) -> Site {
        Site {
            p: self.p,
            seed: splitmix64(self.seed.wrapping_add(k as u64)),
        }
    }
}

/// One dropout site: its probability and seed.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    pub p: f64,
    pub seed: u64,
}

impl Site {
    /// Elements whose 24-bit draw is below this are dropped.
    pub(crate) fn threshold(&self) -> u32 {
        (self.p * (1u32 << 24) as f64).round() as u32
    }
    /// The survivors' scale `1 / (1 - p)` as a tensor of `dtype` holds it.
    pub(crate) fn scale(&self, dtype: DType) -> f32 {
        round_to(dtype, (1.0 / (1.0 - self.p)) as f32)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// murmur3's finaliser.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Whether element `i` survives (the CUDA kernels compute the same).
fn keep(seed: u64, i: u32, threshold: u32) -> bool {
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    (fmix32(fmix32(i ^ lo) ^ hi) >> 8) >= threshold
}

/// `x * mask` (no autograd graph).
pub fn apply(x: &Tensor, site: Site) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&Drop { site })?)
}

/// `x + y * mask` in one pass (no autograd graph): the residual add after a dropout.
pub fn add(x: &Tensor, y: &Tensor, site: Site) -> Result<Tensor> {
    ensure!(
        x.dims() == y.dims(),
        "dropout add: {:?} + {:?}",
        x.dims(),
        y.dims()
    );
    Ok(y.contiguous()?
        .apply_op2_no_bwd(&x.contiguous()?, &Drop { site })?)
}

/// The mask itself (`0` or the scale), for the autograd path's `x * mask`.
pub fn mask(shape: &Shape, dtype: DType, device: &Device, site: Site) -> Result<Tensor> {
    apply(&Tensor::ones(shape, dtype, device)?, site)
}

/// The CPU ops' values: `x + y * mask` (`y * mask` without `x`), survivors rounded to `dt`,
/// the sum not yet (the ops round once more on storing).
pub(crate) fn cpu_values(
    y: &[f32],
    x: Option<&[f32]>,
    site: Site,
    dt: DType,
) -> candle_core::Result<Vec<f32>> {
    Drop { site }.cpu(y, x, dt)
}

/// Dropout of the op's first input (plus its second, as a binary op).
struct Drop {
    site: Site,
}

impl Drop {
    fn cpu(&self, y: &[f32], x: Option<&[f32]>, dt: DType) -> candle_core::Result<Vec<f32>> {
        if y.len() > u32::MAX as usize {
            candle_core::bail!("dropout: {} elements", y.len());
        }
        let (thr, s) = (self.site.threshold(), self.site.scale(dt));
        Ok(y.iter()
            .enumerate()
            .map(|(i, &v)| {
                let d = match keep(self.site.seed, i as u32, thr) {
                    true => round_to(dt, v * s),
                    false => 0.0,
                };
                match x {
                    Some(x) => x[i] + d,
                    None => d,
                }
            })
            .collect())
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        x: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let dev = y.device().clone();
        let n = yl.shape().elem_count();
        if n > u32::MAX as usize {
            candle_core::bail!("dropout: {n} elements");
        }
        let (thr, n_u, add) = (self.site.threshold(), n as u32, x.is_some() as i32);
        let (lo, hi) = (self.site.seed as u32, (self.site.seed >> 32) as u32);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256).clamp(1, 65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let s = self.site.scale(y.dtype());
                let ys = view::<$t>(y, yl, "dropout")?;
                // Without `add`, the kernel reads no second input: pass the first again.
                let xs = match x {
                    Some((x, xl)) => view::<$t>(x, xl, "dropout")?,
                    None => view::<$t>(y, yl, "dropout")?,
                };
                // Safety: the kernel writes every element.
                let mut dst = unsafe { dev.alloc::<$t>(n) }?;
                launch!(dev, $name, cfg; &ys, &xs, &mut dst, &n_u, &lo, &hi, &thr, &s, &add);
                candle_core::CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        Ok(match y.dtype() {
            DType::BF16 => run!(half::bf16, "dropout_bf16"),
            DType::F32 => run!(f32, "dropout_f32"),
            dt => candle_core::bail!("dropout: {dt:?}"),
        })
    }
}

impl CustomOp1 for Drop {
    fn name(&self) -> &'static str {
        "arpg-dropout"
    }

    fn cpu_fwd(&self, y: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dt = y.dtype();
        let out = self.cpu(&cpu_f32(y, l, "dropout")?, None, dt)?;
        Ok((cpu_store(out, dt)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.cuda(y, l, None)?, l.shape().clone()))
    }
}

impl CustomOp2 for Drop {
    fn name(&self) -> &'static str {
        "arpg-dropout-add"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dt = y.dtype();
        let xs = cpu_f32(x, xl, "dropout add")?;
        let out = self.cpu(&cpu_f32(y, yl, "dropout add")?, Some(&xs), dt)?;
        Ok((cpu_store(out, dt)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.cuda(y, yl, Some((x, xl)))?, yl.shape().clone()))
    }
}

/// The fused ops against the composite `x + y * mask` on `device` in `dtype`: the largest
/// relative difference (0 expected), and the fraction dropped at p = 0.3.
pub fn compare(device: &Device, dtype: DType) -> Result<(f64, f64)> {
    let site = Dropout { p: 0.3, seed: 42 }.site(3);
    let r =
        || -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, (37, 1024), device)?.to_dtype(dtype)?) };
    let (x, y) = (r()?, r()?);
    let m = mask(x.shape(), dtype, device, site)?;
    let slow = (&x + (&y * &m)?)?;
    let worst = super::rel_diff(&add(&x, &y, site)?, &slow)?
        .max(super::rel_diff(&apply(&y, site)?, &(&y * &m)?)?);
    let dropped = m
        .to_dtype(DType::F32)?
        .eq(0.0)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    Ok((worst, dropped))
}

/// [`compare`] in bf16 on CUDA; `None` elsewhere.
pub fn check(device: &Device) -> Result<Option<f64>> {
    match device.is_cuda() {
        true => Ok(Some(compare(device, DType::BF16)?.0)),
        false => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_ops_are_the_composite_and_drop_p() {
        for dt in [DType::F32, DType::BF16] {
            let (worst, dropped) = compare(&Device::Cpu, dt).unwrap();
            assert_eq!(worst, 0.0, "{dt:?}");
            assert!((dropped - 0.3).abs() < 0.01, "{dt:?}: dropped {dropped}");
        }
    }

    #[test]
    fn sites_draw_different_masks_and_a_site_the_same_one() {
        let d = Dropout { p: 0.5, seed: 7 };
        let ones = Tensor::ones(4096, DType::F32, &Device::Cpu).unwrap();
        let m = |k| apply(&ones, d.site(k)).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m(1), m(1));
        let same = m(1).iter().zip(m(2)).filter(|(a, b)| **a == *b).count();
        assert!((1800..2300).contains(&same), "{same} of 4096 agree");
    }
}
