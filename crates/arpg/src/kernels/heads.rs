//! Attention's layout changes with RoPE folded in: columns of a projection `[b, t, stride]`
//! to heads `[b, h, t, hd]` (rotated by the packed angles `[2, b, t, hd/2]` or not), and
//! heads back to `[b, t, h * hd]` (rotated by the opposite angles: RoPE's backward). One
//! coalesced pass each, where the generic path is a strided copy, a second copy and the
//! rotation. The arithmetic of [`super::rope`]: f32, rounded once.

use super::{cpu_f32, cpu_store};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

/// Columns `col .. col + n_head * hd` of `src [b, t, stride]` as `[b, n_head, t, hd]`,
/// rotated by `cs [2, b, t, hd / 2]` when given.
pub fn split(
    src: &Tensor,
    col: usize,
    n_head: usize,
    hd: usize,
    cs: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, _, stride) = src.dims3()?;
    ensure!(
        hd.is_multiple_of(2) && col + n_head * hd <= stride,
        "heads: columns {col}..{} of {stride}",
        col + n_head * hd
    );
    if !fast(src) {
        return split_slow(src, col, n_head, hd, cs);
    }
    Heads {
        split: true,
        col,
        n_head,
        hd,
    }
    .run(src, cs)
}

/// `g [b, h, t, hd]` as `[b, t, h * hd]`, rotated by the opposite angles of `cs` when given.
pub fn merge(g: &Tensor, cs: Option<&Tensor>) -> Result<Tensor> {
    let (_, h, _, hd) = g.dims4()?;
    if !fast(g) {
        return merge_slow(g, cs);
    }
    Heads {
        split: false,
        col: 0,
        n_head: h,
        hd,
    }
    .run(g, cs)
}

/// Several `[b, h_i, t, hd]` gradients merged (each rotated back by `cs` where its flag says)
/// side by side into one `[b, t, sum of h_i * hd]`: the merged q|k|v projection's gradient,
/// written in place where [`merge`] and a concatenation would copy it again.
pub fn merge_cat(parts: &[(&Tensor, bool)], cs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda_merge_cat(parts, cs)? {
        return Ok(out);
    }
    let merged = parts
        .iter()
        .map(|(g, rotate)| merge(g, rotate.then_some(cs)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&merged, 2)?)
}

/// [`merge_cat`]'s kernels: one launch a part into its columns of one buffer (bf16, head
/// sizes multiples of 8); `None` where they do not apply.
#[cfg(feature = "cuda")]
fn cuda_merge_cat(parts: &[(&Tensor, bool)], cs: &Tensor) -> Result<Option<Tensor>> {
    use super::cuda::{cuda_view, launch, tensor};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    let Some((first, _)) = parts.first() else {
        anyhow::bail!("merge_cat of no parts");
    };
    let shapes = parts
        .iter()
        .map(|(g, _)| g.dims4())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (b, _, t, _) = shapes[0];
    let fits = first.dtype() == DType::BF16
        && super::on(first.device())
        && parts.iter().all(|(g, _)| g.dtype() == DType::BF16)
        && shapes
            .iter()
            .all(|&(bb, _, tt, hd)| (bb, tt) == (b, t) && hd.is_multiple_of(8));
    if !fits {
        return Ok(None);
    }
    let stride: usize = shapes.iter().map(|&(_, h, _, hd)| h * hd).sum();
    let dev = first.device().as_cuda_device()?.clone();
    let cs = super::aligned(&cs.to_dtype(DType::F32)?)?;
    let (cg, cl) = cs.storage_and_layout();
    let cv = cuda_view::<f32>(&cg, cl, "heads")?;
    // Safety: the parts' launches write every column of every row between them.
    let mut out = unsafe { dev.alloc::<half::bf16>(b * t * stride) }?;
    let mut col = 0usize;
    for ((g, rotate), &(_, h, _, hd)) in parts.iter().zip(&shapes) {
        let g = super::aligned(g)?;
        let (gg, gl) = g.storage_and_layout();
        let gv = cuda_view::<half::bf16>(&gg, gl, "heads")?;
        let threads = b * t * h * hd / 8;
        let cfg = LaunchConfig {
            grid_dim: ((threads as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = [b, t, h, hd, stride, col, 0].map(|v| v as u32);
        let [b_u, t_u, h_u, hd_u, st_u, col_u, split_u] = dims;
        let (rot, inverse) = (*rotate as i32, 1i32);
        launch!(dev, "heads8_bf16", cfg; &gv, &cv, &mut out, &b_u, &t_u, &h_u, &hd_u, &st_u,
            &col_u, &split_u, &rot, &inverse);
        col += h * hd;
    }
    Ok(Some(tensor(out, &dev, (b, t, stride))))
}

/// Whether the one-pass ops take `x` (f32 or bf16, kernels not turned off, loaded on CUDA).
fn fast(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16)
        && super::enabled()
        && (x.device().is_cpu() || super::on(x.device()))
}

/// The composite: narrow, split heads, [`super::rope::slow`].
pub fn split_slow(
    src: &Tensor,
    col: usize,
    n_head: usize,
    hd: usize,
    cs: Option<&Tensor>,
) -> Result<Tensor> {
    let x =
        crate::model::layers::split_heads(&src.narrow(2, col, n_head * hd)?.contiguous()?, n_head)?;
    match cs {
        Some(cs) => super::rope::slow(&x, &cs.get(0)?, &cs.get(1)?),
        None => Ok(x),
    }
}

/// The composite of [`merge`].
pub fn merge_slow(g: &Tensor, cs: Option<&Tensor>) -> Result<Tensor> {
    let g = match cs {
        Some(cs) => super::rope::slow(g, &cs.get(0)?, &cs.get(1)?.neg()?)?,
        None => g.clone(),
    };
    crate::model::layers::merge_heads(&g)
}

/// One layout change: `split` (columns to heads, rotated by the angles) or not (heads to
/// columns, rotated back: the opposite angles).
struct Heads {
    split: bool,
    col: usize,
    n_head: usize,
    hd: usize,
}

/// (b, t, stride of the `[b, t, _]` side).
fn dims(op: &Heads, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    Ok(match op.split {
        true => l.shape().dims3()?,
        false => {
            let (b, _, t, _) = l.shape().dims4()?;
            (b, t, op.n_head * op.hd)
        }
    })
}

impl Heads {
    /// On `x` (rotating when `cs` is given): the unary or the binary op.
    fn run(&self, x: &Tensor, cs: Option<&Tensor>) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match cs {
            Some(cs) => x.apply_op2_no_bwd(&cs.contiguous()?, self)?,
            None => x.apply_op1_no_bwd(self)?,
        })
    }

    fn out_shape(&self, b: usize, t: usize) -> Shape {
        match self.split {
            true => Shape::from((b, self.n_head, t, self.hd)),
            false => Shape::from((b, t, self.n_head * self.hd)),
        }
    }

    fn cpu(
        &self,
        x: &CpuStorage,
        l: &Layout,
        cs: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, stride) = dims(self, l)?;
        let (h, hd, half) = (self.n_head, self.hd, self.hd / 2);
        let v = cpu_f32(x, l, "heads")?;
        let cs = match cs {
            Some((c, cl)) => Some(cpu_f32(c, cl, "heads")?),
            None => None,
        };
        let mut out = vec![0f32; b * t * h * hd];
        for bb in 0..b {
            for tt in 0..t {
                for hh in 0..h {
                    let flat = (bb * t + tt) * stride + self.col + hh * hd;
                    let heads = ((bb * h + hh) * t + tt) * hd;
                    let (src, dst) = match self.split {
                        true => (flat, heads),
                        false => (heads, flat),
                    };
                    for p in 0..half {
                        let (x0, x1) = (v[src + 2 * p], v[src + 2 * p + 1]);
                        let (y0, y1) = match &cs {
                            Some(cs) => {
                                let c = cs[(bb * t + tt) * half + p];
                                let s = cs[b * t * half + (bb * t + tt) * half + p];
                                let s = if self.split { s } else { -s };
                                (x0 * c - x1 * s, x1 * c + x0 * s)
                            }
                            None => (x0, x1),
                        };
                        out[dst + 2 * p] = y0;
                        out[dst + 2 * p + 1] = y1;
                    }
                }
            }
        }
        Ok((cpu_store(out, x.dtype())?, self.out_shape(b, t)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
        cs: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (b, t, stride) = dims(self, l)?;
        let dev = x.device().clone();
        let pairs = b * t * self.n_head * self.hd / 2;
        // 8 channels a thread with 16-byte accesses where the layout allows it (bf16).
        let wide = x.dtype() == DType::BF16
            && self.hd.is_multiple_of(8)
            && stride.is_multiple_of(8)
            && self.col.is_multiple_of(8)
            && l.start_offset().is_multiple_of(8)
            && cs.is_none_or(|(_, cl)| cl.start_offset().is_multiple_of(4));
        let threads = if wide { pairs / 4 } else { pairs };
        let cfg = LaunchConfig {
            grid_dim: ((threads as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims: [u32; 7] = [
            b as u32,
            t as u32,
            self.n_head as u32,
            self.hd as u32,
            stride as u32,
            self.col as u32,
            self.split as u32,
        ];
        let (rotate, inverse) = (cs.is_some() as i32, !self.split as i32);
        // Without angles the kernel reads none: pass a one-element stand-in.
        let none = dev.alloc_zeros::<f32>(1)?;
        let cv = match cs {
            Some((c, cl)) => view::<f32>(c, cl, "heads")?,
            None => none.slice(0..1),
        };
        let [b_u, t_u, h_u, hd_u, st_u, col_u, split_u] = dims;
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let xs = view::<$t>(x, l, "heads")?;
                // Safety: the kernel writes every element.
                let mut dst = unsafe { dev.alloc::<$t>(pairs * 2) }?;
                launch!(dev, $name, cfg; &xs, &cv, &mut dst, &b_u, &t_u, &h_u, &hd_u, &st_u,
                    &col_u, &split_u, &rotate, &inverse);
                candle_core::CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match x.dtype() {
            DType::BF16 if wide => run!(half::bf16, "heads8_bf16"),
            DType::BF16 => run!(half::bf16, "heads_bf16"),
            DType::F32 => run!(f32, "heads_f32"),
            dt => candle_core::bail!("heads: {dt:?}"),
        };
        Ok((out, self.out_shape(b, t)))
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "arpg-heads"
    }
    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(x, l, None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(x, l, None)
    }
}

impl CustomOp2 for Heads {
    fn name(&self) -> &'static str {
        "arpg-heads-rope"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        l: &Layout,
        cs: &CpuStorage,
        csl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(x, l, Some((cs, csl)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
        cs: &candle_core::CudaStorage,
        csl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(x, l, Some((cs, csl)))
    }
}

/// The fused ops against their composites on `device` in `dtype`: the largest relative
/// difference over a split with and without rotation and a merge with and without.
pub fn compare(device: &candle_core::Device, dtype: DType) -> Result<f64> {
    let (b, t, h, hd) = (3, 5, 2, 16);
    let src = Tensor::randn(0f32, 1.0, (b, t, 3 * h * hd), device)?.to_dtype(dtype)?;
    let ang = Tensor::randn(0f32, 2.0, (b, t, hd / 2), device)?;
    let cs = Tensor::stack(&[ang.cos()?, ang.sin()?], 0)?;
    let g = Tensor::randn(0f32, 1.0, (b, h, t, hd), device)?.to_dtype(dtype)?;
    let mut worst = 0f64;
    for c in [None, Some(&cs)] {
        let s = split(&src, h * hd, h, hd, c)?;
        worst = worst.max(super::rel_diff(&s, &split_slow(&src, h * hd, h, hd, c)?)?);
        worst = worst.max(super::rel_diff(&merge(&g, c)?, &merge_slow(&g, c)?)?);
    }
    let g2 = Tensor::randn(0f32, 1.0, (b, 1, t, hd), device)?.to_dtype(dtype)?;
    let cat = merge_cat(&[(&g, true), (&g2, false), (&g, false)], &cs)?;
    let want = Tensor::cat(
        &[
            merge_slow(&g, Some(&cs))?,
            merge_slow(&g2, None)?,
            merge_slow(&g, None)?,
        ],
        2,
    )?;
    Ok(worst.max(super::rel_diff(&cat, &want)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_layout_changes_match_their_composites() {
        let dev = candle_core::Device::Cpu;
        assert!(compare(&dev, DType::F32).unwrap() < 1e-6);
        assert!(compare(&dev, DType::BF16).unwrap() < 1e-2);
        // Merging undoes splitting, and the opposite rotation undoes the rotation.
        let src = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev).unwrap();
        let ang = Tensor::randn(0f32, 2.0, (2, 3, 4), &dev).unwrap();
        let cs = Tensor::stack(&[ang.cos().unwrap(), ang.sin().unwrap()], 0).unwrap();
        let back = merge(&split(&src, 0, 2, 8, Some(&cs)).unwrap(), Some(&cs)).unwrap();
        assert!(super::super::rel_diff(&back, &src).unwrap() < 1e-6);
    }
}
