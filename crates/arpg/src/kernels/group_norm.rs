//! GroupNorm of NCHW `x` with f32 `weight`/`bias [c]`, optionally followed by SiLU: f32
//! statistics in two passes (mean, then mean squared deviation), an f32 affine rounded to
//! `x`'s dtype, then SiLU in f32 of that rounded value, rounded once. One kernel where the
//! composite is ten over f32 copies. Inference only (the VQ decoder): no backward.
//!
//! The NHWC variant (`fused_nhwc`, the layout of the cuDNN decoder): its statistics come from
//! per-channel partials of position ranges, each shifted by its first value and combined
//! exactly (Chan et al.), so that the data is read once for the statistics and once for the
//! output, with every read coalesced across channels. Its affine is folded per channel into
//! one fused multiply-add (`x * w / den + (b - mean * w / den)`), and bf16 takes the fast
//! exponential and division in SiLU: the elementwise pass was bound by its instructions
//! (divisions, expf), not by memory. Its results then differ from the composite's by rounding.

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

/// One value's affine with the group's (mean, sqrt(var + eps)) and the channel's (weight,
/// bias), rounded to `dt`, then SiLU of the rounded value when asked (the kernels' `gn_affine`).
fn affine(dt: DType, v: f32, (mean, den): (f32, f32), (w, b): (f32, f32), silu: bool) -> f32 {
    let y = round_to(dt, (v - mean) / den * w + b);
    if silu {
        y / (1.0 + (-y).exp())
    } else {
        y
    }
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
                *v = affine(dt, *v, (mean, den), (ws[ch], bs[ch]), self.silu);
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

/// The composite in NHWC: the NCHW composite between two transposes.
pub fn slow_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let y = slow(&x.permute((0, 3, 1, 2))?, weight, bias, groups, eps, silu)?;
    Ok(y.permute((0, 2, 3, 1))?.contiguous()?)
}

/// The fused NHWC op (`x [n, h, w, c]`), or `None` where it does not apply. Unlike
/// [`fused`], it also runs on the CPU (its CPU version is what the CPU decoder runs in NHWC).
pub fn fused_nhwc(
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
        && x.dim(3)? % groups == 0
        && (x.device().is_cpu() || super::on(x.device())))
    {
        return Ok(None);
    }
    let op = GroupNormNhwc {
        groups,
        eps: eps as f32,
        silu,
    };
    let (w, b) = (weight.flatten_all()?, bias.flatten_all()?);
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&w, &b, &op)?))
}

/// Threads per block of the NHWC statistics kernel.
const NHWC_BLOCK: usize = 256;

/// Channels a thread of the NHWC kernels reads at once: one 16-byte vector (8 bf16 or 4 f32)
/// where the channels fill whole vectors, else 1.
fn width(dt: DType, c: usize) -> usize {
    let v = 16 / dt.size_in_bytes();
    if c.is_multiple_of(v) {
        v
    } else {
        1
    }
}

/// How the NHWC statistics split an image of `hw` positions and `c` channels read `v` at a
/// time: `chunks` ranges of `rows` positions, each read by `lanes` threads per vector of
/// channels (positions `lane`, `lane + lanes`, ...), so that a block's 256 threads are busy
/// however few the channels.
#[derive(Clone, Copy, Debug)]
struct Split {
    chunks: usize,
    rows: usize,
    lanes: usize,
}

impl Split {
    fn new(n: usize, hw: usize, c: usize, v: usize) -> Self {
        let cv = c / v;
        // About 2,048 blocks over the batch (each H200 SM gets several), at least 8 rows each.
        let want = (2048 / n.max(1)).clamp(1, hw.div_ceil(8).max(1));
        let rows = hw.div_ceil(want).max(1);
        Self {
            chunks: hw.div_ceil(rows),
            rows,
            lanes: if cv < NHWC_BLOCK { NHWC_BLOCK / cv } else { 1 },
        }
    }

    /// Partials per image and channel.
    fn parts(&self) -> usize {
        self.chunks * self.lanes
    }
}

/// One partial: the count, mean and sum of squared deviations of the positions `p0, p0 +
/// lanes, ... < p1` of one channel (`at(p)` reads them), shifted by the first value.
fn partial(at: impl Fn(usize) -> f32, p0: usize, p1: usize, lanes: usize) -> [f32; 3] {
    if p0 >= p1 {
        return [0.0; 3];
    }
    let k = at(p0);
    let (mut s, mut q, mut cnt) = (0f32, 0f32, 0u32);
    for p in (p0..p1).step_by(lanes) {
        let d = at(p) - k;
        s += d;
        q += d * d;
        cnt += 1;
    }
    let fc = cnt as f32;
    [fc, k + s / fc, (q - s * s / fc).max(0.0)]
}

/// A channel's (scale, shift) from its group's (mean, sqrt(var + eps)) and its (weight,
/// bias): the NHWC kernels' `gn_nhwc_stats` fold.
fn fold((mean, den): (f32, f32), (w, b): (f32, f32)) -> (f32, f32) {
    let scale = w / den;
    (scale, b - mean * scale)
}

/// `v * scale + shift` rounded once, then to `dt`, then SiLU of that value when asked (the
/// NHWC kernels' `gn_scaled`).
fn scaled(dt: DType, v: f32, (scale, shift): (f32, f32), silu: bool) -> f32 {
    let y = round_to(dt, v.mul_add(scale, shift));
    if silu {
        y / (1.0 + (-y).exp())
    } else {
        y
    }
}

/// Mean and sqrt(variance + eps) of a group from its partials (count, mean, M2).
fn combine(parts: &[[f32; 3]], n: f32, eps: f32) -> (f32, f32) {
    let mean = parts.iter().map(|p| p[0] * p[1]).sum::<f32>() / n;
    let m2 = parts
        .iter()
        .map(|p| p[2] + p[0] * (p[1] - mean) * (p[1] - mean))
        .sum::<f32>();
    (mean, (m2 / n + eps).sqrt())
}

struct GroupNormNhwc {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormNhwc {
    fn name(&self) -> &'static str {
        "arpg-group-norm-nhwc"
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
        let (n, h, wd, c) = xl.shape().dims4()?;
        let dt = x.dtype();
        let mut xs = cpu_f32(x, xl, "group norm")?;
        let (ws, bs) = (cpu_f32(w, wl, "group norm")?, cpu_f32(b, bl, "group norm")?);
        let (hw, cpg) = (h * wd, c / self.groups);
        let sp = Split::new(n, hw, c, width(dt, c));
        for img in xs.chunks_mut(hw * c) {
            // Partials in the kernel's order: (chunk, lane, channel).
            let mut parts = vec![[0f32; 3]; sp.parts() * c];
            for chunk in 0..sp.chunks {
                for lane in 0..sp.lanes {
                    let (p0, p1) = (chunk * sp.rows + lane, ((chunk + 1) * sp.rows).min(hw));
                    for ch in 0..c {
                        parts[(chunk * sp.lanes + lane) * c + ch] =
                            partial(|p| img[p * c + ch], p0, p1, sp.lanes);
                    }
                }
            }
            let stats: Vec<(f32, f32)> = (0..self.groups)
                .map(|g| {
                    let of_group: Vec<[f32; 3]> = (0..sp.parts())
                        .flat_map(|pi| (0..cpg).map(move |k| (pi, g * cpg + k)))
                        .map(|(pi, ch)| parts[pi * c + ch])
                        .collect();
                    combine(&of_group, (hw * cpg) as f32, self.eps)
                })
                .collect();
            let ab: Vec<(f32, f32)> = (0..c)
                .map(|ch| fold(stats[ch / cpg], (ws[ch], bs[ch])))
                .collect();
            for (i, v) in img.iter_mut().enumerate() {
                *v = scaled(dt, *v, ab[i % c], self.silu);
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
        let (n, h, wd, c) = xl.shape().dims4()?;
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!("fused group norm: {c} channels, weight {:?}", wl.shape());
        }
        let dev = x.device().clone();
        let ws = view::<f32>(w, wl, "fused group norm")?;
        let bs = view::<f32>(b, bl, "fused group norm")?;
        let (hw, cpg) = (h * wd, c / self.groups);
        let aligned = xl.start_offset() * x.dtype().size_in_bytes() % 16 == 0;
        let v = if aligned { width(x.dtype(), c) } else { 1 };
        let sp = Split::new(n, hw, c, v);
        // Safety: the partial kernel writes every partial, the statistics kernel every channel's pair.
        let mut parts = unsafe { dev.alloc::<f32>(n * sp.parts() * c * 3) }?;
        let mut ab = unsafe { dev.alloc::<f32>(n * c * 2) }?;
        let (hw_u, c_u, rows_u, lanes_u) = (hw as u32, c as u32, sp.rows as u32, sp.lanes as u32);
        let (cpg_u, groups_u, parts_u) = (cpg as u32, self.groups as u32, sp.parts() as u32);
        let count = (hw * cpg) as f32;
        let silu = self.silu as i32;
        let partial_cfg = LaunchConfig {
            grid_dim: (sp.chunks as u32, n as u32, 1),
            block_dim: (NHWC_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stats_cfg = LaunchConfig {
            grid_dim: ((n * self.groups) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let apply_cfg = LaunchConfig {
            grid_dim: ((hw * c / v).div_ceil(256).min(1024) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let total = n * hw * c;
        macro_rules! run {
            ($t:ty, $partial:literal, $apply:literal) => {{
                let xs = view::<$t>(x, xl, "fused group norm")?;
                launch!(dev, $partial, partial_cfg; &xs, &mut parts, &hw_u, &c_u, &rows_u, &lanes_u);
                launch!(dev, "gn_nhwc_stats", stats_cfg; &parts, &ws, &bs, &mut ab, &c_u, &cpg_u,
                    &groups_u, &parts_u, &count, &self.eps);
                // Safety: the kernel writes every element.
                let mut dst = unsafe { dev.alloc::<$t>(total) }?;
                launch!(dev, $apply, apply_cfg; &xs, &ab, &mut dst, &hw_u, &c_u, &silu);
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match (x.dtype(), v > 1) {
            (DType::F32, false) => run!(f32, "gn_nhwc_partial_f32", "gn_nhwc_apply_f32"),
            (DType::F32, true) => run!(f32, "gn_nhwc_partial_v_f32", "gn_nhwc_apply_v_f32"),
            (DType::BF16, false) => {
                run!(half::bf16, "gn_nhwc_partial_bf16", "gn_nhwc_apply_bf16")
            }
            (DType::BF16, true) => {
                run!(half::bf16, "gn_nhwc_partial_v_bf16", "gn_nhwc_apply_v_bf16")
            }
            (dt, _) => candle_core::bail!("fused group norm: {dt:?}"),
        };
        Ok((out, xl.shape().clone()))
    }
}

const CHECK_GROUPS: usize = 32;
const CHECK_EPS: f64 = 1e-6;

/// `[f32, bf16]` max |op - composite| / max |composite| on random input (with and without
/// SiLU: the larger of the two), in NCHW or (`nhwc`) NHWC.
fn compare(
    device: &Device,
    nhwc: bool,
    op: impl Fn(&Tensor, &Tensor, &Tensor, bool) -> Result<Option<Tensor>>,
) -> Result<Option<[f64; 2]>> {
    let c = 64;
    // An offset far from zero: the statistics must not lose the variance to cancellation.
    let x = (Tensor::randn(0f32, 1.0, (2, c, 9, 7), device)? * 3.0)?;
    let x = if nhwc {
        (x.permute((0, 2, 3, 1))?.contiguous()? + 40.0)?
    } else {
        x
    };
    let weight = Tensor::randn(1f32, 0.5, (1, c, 1, 1), device)?;
    let bias = Tensor::randn(0f32, 0.5, (1, c, 1, 1), device)?;
    let mut out = [0f64; 2];
    for (k, dt) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let x = x.to_dtype(dt)?;
        for silu in [false, true] {
            let Some(f) = op(&x, &weight, &bias, silu)? else {
                return Ok(None);
            };
            let g = if nhwc {
                slow_nhwc(&x, &weight, &bias, CHECK_GROUPS, CHECK_EPS, silu)?
            } else {
                slow(&x, &weight, &bias, CHECK_GROUPS, CHECK_EPS, silu)?
            };
            out[k] = out[k].max(super::rel_diff(&f, &g)?);
        }
    }
    Ok(Some(out))
}

/// On CUDA: the fused GroupNorm(+SiLU) against the composite (see [`compare`]), NCHW then
/// NHWC: `[nchw f32, nchw bf16, nhwc f32, nhwc bf16]`. `None` off CUDA or with fused kernels
/// off.
pub fn check(device: &Device) -> Result<Option<[f64; 4]>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    let nchw = compare(device, false, |x, w, b, silu| {
        fused(x, w, b, CHECK_GROUPS, CHECK_EPS, silu)
    })?;
    let nhwc = compare(device, true, |x, w, b, silu| {
        fused_nhwc(x, w, b, CHECK_GROUPS, CHECK_EPS, silu)
    })?;
    Ok(nchw.zip(nhwc).map(|(a, b)| [a[0], a[1], b[0], b[1]]))
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
        let [f32_rel, bf16_rel] = compare(&Device::Cpu, false, op).unwrap().unwrap();
        assert!(f32_rel < 1e-5, "{f32_rel}");
        assert!(bf16_rel < 1e-2, "{bf16_rel}");
    }

    #[test]
    fn the_nhwc_cpu_op_matches_the_composite() {
        let op = |x: &Tensor, w: &Tensor, b: &Tensor, silu| {
            fused_nhwc(x, w, b, CHECK_GROUPS, CHECK_EPS, silu)
        };
        let [f32_rel, bf16_rel] = compare(&Device::Cpu, true, op).unwrap().unwrap();
        assert!(f32_rel < 1e-5, "{f32_rel}");
        assert!(bf16_rel < 1e-2, "{bf16_rel}");
    }

    #[test]
    fn nhwc_splits_cover_every_position_once() {
        let cases = [
            (1, 1, 512, 8),
            (64, 256, 512, 8),
            (64, 65536, 128, 8),
            (3, 63, 96, 4),
        ];
        for (n, hw, c, v) in cases.into_iter().chain([(2, 7, 3, 1), (2, 9, 96, 1)]) {
            let sp = Split::new(n, hw, c, v);
            let mut seen = vec![0u32; hw];
            for chunk in 0..sp.chunks {
                for lane in 0..sp.lanes {
                    let (p0, p1) = (chunk * sp.rows + lane, ((chunk + 1) * sp.rows).min(hw));
                    for p in (p0..p1).step_by(sp.lanes) {
                        seen[p] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&k| k == 1), "{n} {hw} {c}: {sp:?}");
            assert!(sp.lanes * (c / v).min(NHWC_BLOCK) <= NHWC_BLOCK);
        }
    }
}
