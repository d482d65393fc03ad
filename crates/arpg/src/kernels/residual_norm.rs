//! The residual stream of the hand-written training step, one pass each way. Forward: the
//! add after a dropout, `s = x + dropout(y)`, and the training RMSNorm of its result, `n =
//! norm(s) * w` (what the next layer reads). Backward, for a norm whose input also flows on
//! through the residual: `total = res + d loss / d s`, `dropped = dropout(total)` (the
//! gradient of the layer output the dropout sat on) and the weight's gradient. The composite
//! ([`forward_slow`], [`backward_slow`]) is the dropout add and the norm forward, and the norm's
//! three kernels, an add and a dropout backward: six passes over the activations for two.
//! The arithmetic and roundings are the composite's; only the order of the row sums differs.

use super::dropout::{self, Site};
use super::{rms_norm, round_to};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};

/// The residual stream after an add, and its norm.
pub struct Added {
    pub s: Tensor,
    pub n: Tensor,
}

/// A norm's backward: the residual's gradient, the same after the dropout of the layer that
/// produced the norm's input (`total` again without one), and the weight's gradient (f32).
pub struct NormGrad {
    pub total: Tensor,
    pub dropped: Tensor,
    pub weight: Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Cuda,
    Cpu,
    Composite,
}

/// Where the fused op runs for `t [.., d]` normed by `w`: the CUDA kernels (bf16, d a
/// multiple of 8 up to 4096), the CPU twin (f32 or bf16), or the composite.
fn path(t: &Tensor, w: &Tensor) -> Path {
    let d = t.dim(D::Minus1).unwrap_or(0);
    let typed = t.dtype() == w.dtype() && w.dims() == [d] && d > 0;
    if !(super::enabled() && typed && t.elem_count() <= u32::MAX as usize) {
        return Path::Composite;
    }
    match t.device() {
        Device::Cpu if matches!(t.dtype(), DType::F32 | DType::BF16) => Path::Cpu,
        dev if t.dtype() == DType::BF16 && d.is_multiple_of(8) && d <= 4096 && super::on(dev) => {
            Path::Cuda
        }
        _ => Path::Composite,
    }
}

fn same_dims(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    ensure!(
        a.dims() == b.dims(),
        "{what}: {:?} and {:?}",
        a.dims(),
        b.dims()
    );
    Ok(())
}

/// `s = x + dropout(y)` (`x` absent: `dropout(y)`; no site: no dropout) and `n = norm(s) * w`.
pub fn forward(
    x: Option<&Tensor>,
    y: &Tensor,
    site: Option<Site>,
    w: &Tensor,
    eps: f64,
) -> Result<Added> {
    if let Some(x) = x {
        same_dims(x, y, "residual add")?;
    }
    match path(y, w) {
        Path::Composite => forward_slow(x, y, site, w, eps),
        Path::Cpu => cpu::forward(x, y, site, w, eps),
        Path::Cuda => {
            #[cfg(feature = "cuda")]
            return cuda::forward(x, y, site, w, eps);
            #[allow(unreachable_code)]
            forward_slow(x, y, site, w, eps)
        }
    }
}

/// [`forward`] as the composite of the dropout ops and the training norm.
pub fn forward_slow(
    x: Option<&Tensor>,
    y: &Tensor,
    site: Option<Site>,
    w: &Tensor,
    eps: f64,
) -> Result<Added> {
    let s = match (x, site) {
        (Some(x), Some(site)) => dropout::add(x, y, site)?,
        (Some(x), None) => (x + y)?,
        (None, Some(site)) => dropout::apply(y, site)?,
        (None, None) => y.clone(),
    };
    let n = match rms_norm::fused(&s, w, eps)? {
        Some(n) => n,
        None => rms_norm::slow(&s, w, eps)?,
    };
    Ok(Added { s, n: n.detach() })
}

/// The backward of `n = norm(x) * w` from `g = d loss / d n`, plus the residual's gradient
/// `res` when the norm's input also flows on, then the dropout at `site`.
pub fn backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    g: &Tensor,
    res: Option<&Tensor>,
    site: Option<Site>,
) -> Result<NormGrad> {
    same_dims(x, g, "norm backward")?;
    if let Some(r) = res {
        same_dims(x, r, "norm backward residual")?;
    }
    let g = g.to_dtype(x.dtype())?;
    match path(x, w) {
        Path::Composite => backward_slow(x, w, eps, &g, res, site),
        Path::Cpu => cpu::backward(x, w, eps, &g, res, site),
        Path::Cuda => {
            #[cfg(feature = "cuda")]
            return cuda::backward(x, w, eps, &g, res, site);
            #[allow(unreachable_code)]
            backward_slow(x, w, eps, &g, res, site)
        }
    }
}

/// [`backward`] as the composite: the norm's backward, the add, the dropout.
pub fn backward_slow(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    g: &Tensor,
    res: Option<&Tensor>,
    site: Option<Site>,
) -> Result<NormGrad> {
    let (gx, weight) = rms_norm::backward(x, w, eps, g)?;
    let total = match res {
        Some(r) => (r + gx)?,
        None => gx,
    };
    let dropped = match site {
        Some(s) => dropout::apply(&total, s)?,
        None => total.clone(),
    };
    Ok(NormGrad {
        total,
        dropped,
        weight,
    })
}

/// The CPU twins: the kernels' arithmetic row by row.
mod cpu {
    use super::*;

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn tensor(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())?)
    }

    /// sqrt(mean(row^2) + eps) in f32.
    fn den(row: &[f32], eps: f32) -> f32 {
        (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32 + eps).sqrt()
    }

    pub(super) fn forward(
        x: Option<&Tensor>,
        y: &Tensor,
        site: Option<Site>,
        w: &Tensor,
        eps: f64,
    ) -> Result<Added> {
        let (dt, d) = (y.dtype(), w.elem_count());
        let mut s = values(y)?;
        if let Some(site) = site {
            s = dropout::cpu_values(&s, None, site, dt)?;
        }
        if let Some(x) = x {
            for (v, a) in s.iter_mut().zip(values(x)?) {
                *v = round_to(dt, a + *v);
            }
        }
        let ws = values(w)?;
        let mut n = vec![0f32; s.len()];
        for (row, out) in s.chunks(d).zip(n.chunks_mut(d)) {
            let den = den(row, eps as f32);
            for ((o, v), w) in out.iter_mut().zip(row).zip(&ws) {
                *o = round_to(dt, v / den) * w;
            }
        }
        Ok(Added {
            s: tensor(s, y)?,
            n: tensor(n, y)?,
        })
    }

    pub(super) fn backward(
        x: &Tensor,
        w: &Tensor,
        eps: f64,
        g: &Tensor,
        res: Option<&Tensor>,
        site: Option<Site>,
    ) -> Result<NormGrad> {
        let (dt, d) = (x.dtype(), w.elem_count());
        let (xs, gs, ws) = (values(x)?, values(g)?, values(w)?);
        let rs = res.map(values).transpose()?;
        let mut total = vec![0f32; xs.len()];
        let mut gw = vec![0f32; d];
        for (r, (row, grow)) in xs.chunks(d).zip(gs.chunks(d)).enumerate() {
            let den = den(row, eps as f32);
            let dot = row
                .iter()
                .zip(grow)
                .zip(&ws)
                .map(|((x, g), w)| g * w * (x / den))
                .sum::<f32>()
                / d as f32;
            for j in 0..d {
                let (xv, gv) = (row[j], grow[j]);
                let gx = round_to(dt, (gv * ws[j] - xv / den * dot) / den);
                let k = r * d + j;
                total[k] = match &rs {
                    Some(rs) => round_to(dt, rs[k] + gx),
                    None => gx,
                };
                gw[j] += gv * round_to(dt, xv / den);
            }
        }
        let dropped = match site {
            Some(site) => Some(tensor(dropout::cpu_values(&total, None, site, dt)?, x)?),
            None => None,
        };
        let total = tensor(total, x)?;
        Ok(NormGrad {
            dropped: dropped.unwrap_or_else(|| total.clone()),
            total,
            weight: Tensor::from_vec(gw, d, x.device())?,
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{cuda_view, launch, tensor};
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    /// The kernel for rows of d: C passes of 1024 columns.
    fn kernel(stem: &str, d: usize) -> String {
        let c = match d {
            0..=1024 => 1,
            1025..=2048 => 2,
            _ => 4,
        };
        format!("{stem}_c{c}_bf16")
    }

    /// Dropout's kernel arguments: (on, lo, hi, threshold, scale).
    fn drop_args(site: Option<Site>) -> (i32, u32, u32, u32, f32) {
        match site {
            Some(s) => (
                1,
                s.seed as u32,
                (s.seed >> 32) as u32,
                s.threshold(),
                s.scale(DType::BF16),
            ),
            None => (0, 0, 0, 0, 1.0),
        }
    }

    pub(super) fn forward(
        x: Option<&Tensor>,
        y: &Tensor,
        site: Option<Site>,
        w: &Tensor,
        eps: f64,
    ) -> Result<Added> {
        let al = super::super::aligned;
        let (y, w) = (al(y)?, al(w)?);
        let x = x.map(al).transpose()?;
        let d = w.elem_count();
        let rows = y.elem_count() / d;
        let dev = y.device().as_cuda_device()?.clone();
        let (yg, yl) = y.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let ys = cuda_view::<half::bf16>(&yg, yl, "residual add")?;
        let ws = cuda_view::<half::bf16>(&wg, wl, "residual add")?;
        let xg = x.as_ref().map(|x| x.storage_and_layout());
        // Without x the kernel reads none: pass y again.
        let xs = match &xg {
            Some((g, l)) => cuda_view::<half::bf16>(g, l, "residual add")?,
            None => cuda_view::<half::bf16>(&yg, yl, "residual add")?,
        };
        // Safety: the kernel writes every element of both halves.
        let mut out = unsafe { dev.alloc::<half::bf16>(2 * rows * d) }?;
        let (rows_u, d_u, eps_f, has_x) = (rows as u32, d as u32, eps as f32, x.is_some() as i32);
        let (drop, lo, hi, thr, scale) = drop_args(site);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, &kernel("add_norm_train", d), cfg;
            &xs, &ys, &ws, &mut out, &rows_u, &d_u, &eps_f, &has_x, &drop, &lo, &hi, &thr,
            &scale);
        let out = tensor(out, &dev, (2, rows, d));
        Ok(Added {
            s: out.get(0)?.reshape(y.shape())?,
            n: out.get(1)?.reshape(y.shape())?,
        })
    }

    pub(super) fn backward(
        x: &Tensor,
        w: &Tensor,
        eps: f64,
        g: &Tensor,
        res: Option<&Tensor>,
        site: Option<Site>,
    ) -> Result<NormGrad> {
        let al = super::super::aligned;
        let (x, w, g) = (al(x)?, al(w)?, al(g)?);
        let res = res.map(al).transpose()?;
        let d = w.elem_count();
        let rows = x.elem_count() / d;
        // About 2048 blocks (all resident at once on an H200), each summing the weight's
        // gradient over its rows: at 512 the kernel ran at a quarter of the bandwidth.
        let per_block = rows.div_ceil(2048).max(1);
        let blocks = rows.div_ceil(per_block);
        let dev = x.device().as_cuda_device()?.clone();
        let what = "norm backward";
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let (gg, gl) = g.storage_and_layout();
        let xs = cuda_view::<half::bf16>(&xg, xl, what)?;
        let ws = cuda_view::<half::bf16>(&wg, wl, what)?;
        let gs = cuda_view::<half::bf16>(&gg, gl, what)?;
        let rg = res.as_ref().map(|r| r.storage_and_layout());
        // Without res the kernel reads none: pass g again.
        let rs = match &rg {
            Some((r, l)) => cuda_view::<half::bf16>(r, l, what)?,
            None => cuda_view::<half::bf16>(&gg, gl, what)?,
        };
        let halves = 1 + site.is_some() as usize;
        // Safety: the kernel writes every element of the halves it is given and every
        // (block, column) of the partial sums.
        let mut out = unsafe { dev.alloc::<half::bf16>(halves * rows * d) }?;
        let mut part = unsafe { dev.alloc::<f32>(blocks * d) }?;
        let (rows_u, d_u, per_u, eps_f) = (rows as u32, d as u32, per_block as u32, eps as f32);
        let has_res = res.is_some() as i32;
        let (drop, lo, hi, thr, scale) = drop_args(site);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, &kernel("norm_bwd_train", d), cfg;
            &xs, &ws, &gs, &rs, &mut out, &mut part, &rows_u, &d_u, &per_u, &eps_f, &has_res,
            &drop, &lo, &hi, &thr, &scale);
        let out = tensor(out, &dev, (halves, rows, d));
        let total = out.get(0)?.reshape(x.shape())?;
        let dropped = match site {
            Some(_) => out.get(1)?.reshape(x.shape())?,
            None => total.clone(),
        };
        Ok(NormGrad {
            total,
            dropped,
            weight: tensor(part, &dev, (blocks, d)).sum(0)?,
        })
    }
}

/// The fused ops against the composite on `device` in `dtype`, relative differences:
/// `[s, n, total, dropped, weight gradient]`, over rows of 1024 with dropout and a residual.
pub fn compare(device: &Device, dtype: DType) -> Result<[f64; 5]> {
    let site = dropout::Dropout { p: 0.1, seed: 9 }.site(2);
    let r = |m: f32, s: f32, shape: (usize, usize, usize)| -> Result<Tensor> {
        Ok(Tensor::randn(m, s, shape, device)?.to_dtype(dtype)?)
    };
    let shape = (3, 37, 1024);
    let (x, y, g, res) = (
        r(0., 1., shape)?,
        r(0., 1., shape)?,
        r(0., 1., shape)?,
        r(0., 1., shape)?,
    );
    let w = Tensor::randn(1f32, 0.3, 1024, device)?.to_dtype(dtype)?;
    let (a, b) = (
        forward(Some(&x), &y, Some(site), &w, 1e-5)?,
        forward_slow(Some(&x), &y, Some(site), &w, 1e-5)?,
    );
    let (ga, gb) = (
        backward(&a.s, &w, 1e-5, &g, Some(&res), Some(site))?,
        backward_slow(&b.s, &w, 1e-5, &g, Some(&res), Some(site))?,
    );
    let rel = super::rel_diff;
    Ok([
        rel(&a.s, &b.s)?,
        rel(&a.n, &b.n)?,
        rel(&ga.total, &gb.total)?,
        rel(&ga.dropped, &gb.dropped)?,
        rel(&ga.weight, &gb.weight)?,
    ])
}

/// [`compare`] in bf16 on CUDA (the kernels); `None` elsewhere.
pub fn check(device: &Device) -> Result<Option<[f64; 5]>> {
    match device.is_cuda() {
        true => Ok(Some(compare(device, DType::BF16)?)),
        false => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_twins_are_the_composite() {
        let [s, n, total, dropped, weight] = compare(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(s, 0.0);
        assert!(
            n < 1e-6 && total < 1e-6 && dropped < 1e-6 && weight < 1e-5,
            "{n} {total} {dropped} {weight}"
        );
        // bf16: a rounding apart at most (the row sums' order differs), the weight's gradient
        // against the composite's, which sums the rows in f32 too.
        let [s, n, total, dropped, weight] = compare(&Device::Cpu, DType::BF16).unwrap();
        assert_eq!(s, 0.0);
        assert!(
            n < 1e-2 && total < 1e-2 && dropped < 1e-2 && weight < 1e-3,
            "{n} {total} {dropped} {weight}"
        );
    }

    #[test]
    fn without_an_input_or_a_site_the_sum_is_the_other_term() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 1.0, (5, 16), &dev).unwrap();
        let w = Tensor::ones(16, DType::F32, &dev).unwrap();
        let a = forward(None, &y, None, &w, 1e-6).unwrap();
        assert_eq!(a.s.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
        let site = dropout::Dropout { p: 0.5, seed: 1 }.site(0);
        let b = forward(None, &y, Some(site), &w, 1e-6).unwrap();
        let want = dropout::apply(&y, site).unwrap();
        assert_eq!(
            b.s.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        // The norm of each row has mean square 1.
        let ms =
            b.n.sqr()
                .unwrap()
                .mean(1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(ms.iter().all(|m| (m - 1.0).abs() < 1e-3), "{ms:?}");
        assert!(forward(Some(&y.narrow(1, 0, 8).unwrap()), &y, None, &w, 1e-6).is_err());
    }
}
