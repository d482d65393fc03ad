//! AdamW's update of one f32 tensor in place, in three passes (first moment, second moment,
//! weight) instead of ~12 tensor ops, each rounding exactly as the composite of candle ops in
//! [`update_slow`] (PyTorch's order) does: bit-identical on the CPU and on CUDA, where the
//! kernel spells every rounding out so that nothing is contracted into an FMA.

use super::cpu_f32;
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};

/// One step's constants, as the composite's scalar ops see them (f64 arithmetic, then f32).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub lr: f64,
    /// Decoupled weight decay for this tensor (0 for vectors).
    pub weight_decay: f64,
    /// Bias corrections `1 - beta^t`.
    pub bc1: f64,
    pub bc2: f64,
    /// The gradient-clipping factor (applied when below 1).
    pub grad_scale: f64,
}

impl Step {
    fn consts(&self) -> Consts {
        Consts {
            b1: self.beta1 as f32,
            c1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            c2: (1.0 - self.beta2) as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            do_decay: (self.weight_decay > 0.0) as i32,
            inv_bc2s: (1.0 / self.bc2.sqrt()) as f32,
            eps: self.eps as f32,
            step: (self.lr / self.bc1) as f32,
            gscale: self.grad_scale as f32,
            do_scale: (self.grad_scale < 1.0) as i32,
        }
    }
}

/// f32 constants and flags of the kernels.
#[derive(Debug, Clone, Copy)]
struct Consts {
    b1: f32,
    c1: f32,
    b2: f32,
    c2: f32,
    decay: f32,
    do_decay: i32,
    inv_bc2s: f32,
    eps: f32,
    step: f32,
    gscale: f32,
    do_scale: i32,
}

impl Consts {
    fn grad(&self, g: f32) -> f32 {
        if self.do_scale != 0 {
            g * self.gscale
        } else {
            g
        }
    }
    fn m(&self, m: f32, g: f32) -> f32 {
        m * self.b1 + self.grad(g) * self.c1
    }
    fn v(&self, v: f32, g: f32) -> f32 {
        let g = self.grad(g);
        v * self.b2 + (g * g) * self.c2
    }
    fn w(&self, w: f32, m: f32, v: f32) -> f32 {
        let w = if self.do_decay != 0 {
            w * self.decay
        } else {
            w
        };
        let den = v.sqrt() * self.inv_bc2s + self.eps;
        w - (m / den) * self.step
    }
}

/// Update `p`, `m`, `v` (contiguous f32 tensors of one shape, not sharing storage) from the
/// gradient `g` in place.
pub fn update(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: &Step) -> Result<()> {
    for (what, t) in [("weight", p), ("m", m), ("v", v), ("gradient", g)] {
        ensure!(
            t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == p.dims(),
            "AdamW: the {what} is {:?} {:?}, not contiguous f32 {:?}",
            t.dtype(),
            t.dims(),
            p.dims()
        );
    }
    let c = s.consts();
    m.inplace_op2(g, &Moment { c, second: false })?;
    v.inplace_op2(g, &Moment { c, second: true })?;
    p.inplace_op3(m, v, &Weight(c))?;
    Ok(())
}

/// The composite of candle ops: new `(p, m, v)`.
pub fn update_slow(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: &Step,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = match s.grad_scale < 1.0 {
        true => (g * s.grad_scale)?,
        false => g.clone(),
    };
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let mut w = p.clone();
    if s.weight_decay > 0.0 {
        w = (w * (1.0 - s.lr * s.weight_decay))?;
    }
    let denom = ((v.sqrt()? / s.bc2.sqrt())? + s.eps)?;
    let w = (w - (m.div(&denom)? * (s.lr / s.bc1))?)?;
    Ok((w, m, v))
}

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW: strided tensor".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        s => candle_core::bail!("AdamW: {:?} state", s.dtype()),
    }
}

/// The first (`second` false) or second moment's update from the gradient.
struct Moment {
    c: Consts,
    second: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "arpg-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = cpu_f32(g, gl, "AdamW")?;
        for (x, &g) in f32_mut(s, l)?.iter_mut().zip(&g) {
            *x = match self.second {
                false => self.c.m(*x, g),
                true => self.c.v(*x, g),
            };
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{launch, view, view_mut};
        let dev = s.device().clone();
        let n = l.shape().elem_count();
        let gs = view::<f32>(g, gl, "AdamW")?;
        let mut xs = view_mut::<f32>(s, l, "AdamW moment")?;
        let c = &self.c;
        let (mul, cg) = match self.second {
            false => (c.b1, c.c1),
            true => (c.b2, c.c2),
        };
        let (n_u, second) = (n as u64, self.second as i32);
        launch!(dev, "adamw_moment_f32", grid(n);
            &mut xs, &gs, &n_u, &mul, &cg, &c.gscale, &c.do_scale, &second);
        Ok(())
    }
}

/// The weight's update from the new moments.
struct Weight(Consts);

impl InplaceOp3 for Weight {
    fn name(&self) -> &'static str {
        "arpg-adamw-weight"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (cpu_f32(m, ml, "AdamW")?, cpu_f32(v, vl, "AdamW")?);
        for ((w, &m), &v) in f32_mut(s, l)?.iter_mut().zip(&m).zip(&v) {
            *w = self.0.w(*w, m, v);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{launch, view, view_mut};
        let dev = s.device().clone();
        let n = l.shape().elem_count();
        let (ms, vs) = (view::<f32>(m, ml, "AdamW")?, view::<f32>(v, vl, "AdamW")?);
        let mut ws = view_mut::<f32>(s, l, "AdamW weight")?;
        let c = &self.0;
        let n_u = n as u64;
        launch!(dev, "adamw_weight_f32", grid(n);
            &mut ws, &ms, &vs, &n_u, &c.decay, &c.do_decay, &c.inv_bc2s, &c.eps, &c.step);
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn grid(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).clamp(1, 8192), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Partial sums per tensor of [`squared_norms`] (a fixed count: the same sums every run).
const PARTS: usize = 1024;

/// Each tensor's sum of squares, in f64, with one read back to the host for all of them.
/// On CUDA (f32 tensors) one kernel per tensor writes a fixed number of partial sums, which
/// are then added in a fixed order: deterministic, no atomics, no squared copies.
pub fn squared_norms(ts: &[Tensor]) -> Result<Vec<f64>> {
    let Some(first) = ts.first() else {
        return Ok(Vec::new());
    };
    let dev = first.device();
    let fast = dev.is_cuda()
        && super::on(dev)
        && ts
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous());
    if !fast {
        let parts: Vec<Tensor> = ts
            .iter()
            .map(|g| {
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .reshape(1)
            })
            .collect::<candle_core::Result<_>>()?;
        return Ok(Tensor::cat(&parts, 0)?.to_vec1::<f64>()?);
    }
    let buf = Tensor::zeros((ts.len(), PARTS), DType::F32, dev)?;
    for (slot, t) in ts.iter().enumerate() {
        buf.inplace_op2(t, &SquaredPartials { slot })?;
    }
    Ok(buf.to_dtype(DType::F64)?.sum(1)?.to_vec1::<f64>()?)
}

/// Writes row `slot` of `[tensors, PARTS]`: the partial sums of squares of the source.
struct SquaredPartials {
    slot: usize,
}

impl InplaceOp2 for SquaredPartials {
    fn name(&self) -> &'static str {
        "arpg-squared-partials"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = cpu_f32(g, gl, "squared norm")?;
        let row = &mut f32_mut(s, l)?[self.slot * PARTS..][..PARTS];
        for (k, p) in row.iter_mut().enumerate() {
            *p = g.iter().skip(k).step_by(PARTS).map(|v| v * v).sum();
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{launch, view, view_mut};
        let dev = s.device().clone();
        let gs = view::<f32>(g, gl, "squared norm")?;
        let n = gl.shape().elem_count() as u64;
        let at = self.slot * PARTS;
        let mut buf = view_mut::<f32>(s, l, "squared norm")?;
        let mut row = buf.slice_mut(at..at + PARTS);
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (PARTS as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "squared_partials_f32", cfg; &mut row, &gs, &n);
        Ok(())
    }
}

/// The kernels against the composite on `device` over a few steps of random tensors (a
/// matrix with weight decay and clipping, a vector without): the largest relative
/// difference of the weights and moments (0 expected: the same roundings).
pub fn compare(device: &candle_core::Device) -> Result<f64> {
    let mut worst = 0f64;
    for (shape, wd, scale) in [(vec![37usize, 129], 0.05, 0.5), (vec![1000], 0.0, 1.0)] {
        let r = |s: f32| Tensor::randn(0f32, s, shape.as_slice(), device);
        let (p, m, v) = (r(1.0)?, (r(0.1)? * 0.0)?, (r(0.1)? * 0.0)?);
        let (mut sp, mut sm, mut sv) = (p.copy()?, m.copy()?, v.copy()?);
        for t in 1..=3 {
            let g = r(0.3)?;
            let s = Step {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                lr: 1e-3 * t as f64,
                weight_decay: wd,
                bc1: 1.0 - 0.9f64.powi(t),
                bc2: 1.0 - 0.95f64.powi(t),
                grad_scale: scale,
            };
            update(&p, &m, &v, &g, &s)?;
            (sp, sm, sv) = update_slow(&sp, &sm, &sv, &g, &s)?;
        }
        for (a, b) in [(&p, &sp), (&m, &sm), (&v, &sv)] {
            worst = worst.max(super::rel_diff(a, b)?);
        }
    }
    Ok(worst)
}

/// [`compare`] on CUDA, and the squared norms' relative difference from the composite's;
/// `None` elsewhere.
pub fn check(device: &candle_core::Device) -> Result<Option<f64>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    let ts = [
        Tensor::randn(0f32, 1.0, (1024, 1031), device)?,
        Tensor::randn(0f32, 2.0, 77, device)?,
    ];
    let mut worst = compare(device)?;
    for (t, got) in ts.iter().zip(squared_norms(&ts)?) {
        let want = t
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        worst = worst.max((got - want).abs() / want);
    }
    Ok(Some(worst))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_passes_round_as_the_composite() {
        assert_eq!(super::compare(&candle_core::Device::Cpu).unwrap(), 0.0);
    }

    #[test]
    fn partial_sums_add_up_to_the_squared_norm() {
        use candle_core::{DType, Device, Tensor};
        let t = Tensor::randn(0f32, 1.0, 1000, &Device::Cpu).unwrap();
        let buf = Tensor::zeros((2, super::PARTS), DType::F32, &Device::Cpu).unwrap();
        buf.inplace_op2(&t, &super::SquaredPartials { slot: 1 })
            .unwrap();
        let rows = buf.sum(1).unwrap().to_vec1::<f32>().unwrap();
        let want = t
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(rows[0], 0.0);
        assert!(
            (rows[1] - want).abs() < 1e-4 * want,
            "{} vs {want}",
            rows[1]
        );
    }
}
