//! An embedding table's gradient: row `r` is the sum of the gradient rows of the positions
//! that read it, added in position order (f32) in segments of up to 128 positions, then the
//! segments in order. One block per segment, then per table row, on CUDA, from a row ->
//! positions index built on the host: deterministic and bit-identical to the CPU, where
//! candle's `index_add` kernel scans every id for every output element.

use super::cpu_f32;
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// `[rows, d]` (f32): for each table row, the sum of `grad [n, d]`'s rows at the positions
/// where `ids [n]` (u32) names it.
pub fn backward(ids: &Tensor, grad: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, _) = grad.dims2()?;
    ensure!(
        ids.dims() == [n] && ids.dtype() == DType::U32,
        "embedding backward: ids {:?} {:?} for {n} rows",
        ids.dtype(),
        ids.dims()
    );
    let id: Vec<u32> = ids.to_vec1()?;
    // Positions grouped by the row they read, in position order (a counting sort).
    let mut offsets = vec![0u32; rows + 1];
    for &r in &id {
        ensure!(
            (r as usize) < rows,
            "embedding backward: id {r} of {rows} rows"
        );
        offsets[r as usize + 1] += 1;
    }
    for r in 0..rows {
        offsets[r + 1] += offsets[r];
    }
    let mut next = offsets.clone();
    let mut order = vec![0u32; n];
    for (p, &r) in id.iter().enumerate() {
        order[next[r as usize] as usize] = p as u32;
        next[r as usize] += 1;
    }
    // A row read by many positions (the mask token: every query) is summed in segments of
    // at most SEGMENT positions, one block each, then the segments in order: one block
    // summing 16k rows alone took 14 ms of the training step.
    let mut seg_offsets = vec![0u32];
    let mut row_segs = vec![0u32; rows + 1];
    for r in 0..rows {
        let (a, b) = (offsets[r], offsets[r + 1]);
        let mut at = a;
        while at < b {
            at = (at + SEGMENT).min(b);
            seg_offsets.push(at);
        }
        row_segs[r + 1] = (seg_offsets.len() - 1) as u32;
    }
    let segments = seg_offsets.len() - 1;
    let dev = grad.device();
    let order = Tensor::from_vec(order, n, dev)?;
    let seg_offsets = Tensor::from_vec(seg_offsets, segments + 1, dev)?;
    let part = grad
        .contiguous()?
        .apply_op3_no_bwd(&order, &seg_offsets, &EmbeddingBwd)?;
    let identity = Tensor::arange(0u32, segments as u32, dev)?;
    let row_segs = Tensor::from_vec(row_segs, rows + 1, dev)?;
    Ok(part.apply_op3_no_bwd(&identity, &row_segs, &EmbeddingBwd)?)
}

/// Positions a block sums before its partial sum is added to its row's others.
const SEGMENT: u32 = 128;

struct EmbeddingBwd;

fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("embedding backward: strided index".into()))?;
    match s {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        s => candle_core::bail!("embedding backward: {:?} index", s.dtype()),
    }
}

impl CustomOp3 for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "arpg-embedding-bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        o: &CpuStorage,
        ol: &Layout,
        f: &CpuStorage,
        fl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = gl.shape().dims2()?;
        let g = cpu_f32(g, gl, "embedding backward")?;
        let (order, offsets) = (u32s(o, ol)?, u32s(f, fl)?);
        let rows = offsets.len() - 1;
        let mut out = vec![0f32; rows * d];
        for r in 0..rows {
            let dst = &mut out[r * d..][..d];
            for &p in &order[offsets[r] as usize..offsets[r + 1] as usize] {
                for (o, v) in dst.iter_mut().zip(&g[p as usize * d..][..d]) {
                    *o += v;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        o: &candle_core::CudaStorage,
        ol: &Layout,
        f: &candle_core::CudaStorage,
        fl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (_, d) = gl.shape().dims2()?;
        let rows = fl.shape().elem_count() - 1;
        let dev = g.device().clone();
        let (os, fs) = (
            view::<u32>(o, ol, "embedding")?,
            view::<u32>(f, fl, "embedding")?,
        );
        // Safety: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<f32>(rows * d) }?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d_u = d as u32;
        match g.dtype() {
            DType::BF16 => {
                let gs = view::<half::bf16>(g, gl, "embedding")?;
                launch!(dev, "embedding_bwd_bf16", cfg; &gs, &os, &fs, &mut out, &d_u);
            }
            DType::F32 => {
                let gs = view::<f32>(g, gl, "embedding")?;
                launch!(dev, "embedding_bwd_f32", cfg; &gs, &os, &fs, &mut out, &d_u);
            }
            dt => candle_core::bail!("embedding backward: {dt:?} gradient"),
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, d)),
        ))
    }
}

/// [`backward`] against `index_add` on `device` in `dtype`: the relative difference (float
/// rounding: the segments add in another order).
pub fn compare(device: &candle_core::Device, dtype: DType) -> Result<f64> {
    // Row 0 is read by half the positions (several segments), the others by a few.
    let (n, d, rows) = (700, 64, 50);
    let ids: Vec<u32> = (0..n as u32)
        .map(|i| if i % 2 == 0 { 0 } else { (i * i + 3 * i) % 47 })
        .collect();
    let ids = Tensor::from_vec(ids, n, device)?;
    let g = Tensor::randn(0f32, 1.0, (n, d), device)?.to_dtype(dtype)?;
    let want = Tensor::zeros((rows, d), DType::F32, device)?.index_add(
        &ids,
        &g.to_dtype(DType::F32)?,
        0,
    )?;
    super::rel_diff(&backward(&ids, &g, rows)?, &want)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_gradient_is_index_adds_sum() {
        let dev = candle_core::Device::Cpu;
        assert!(super::compare(&dev, candle_core::DType::F32).unwrap() < 1e-6);
        let ids = candle_core::Tensor::new(&[3u32], &dev).unwrap();
        let g = candle_core::Tensor::zeros((1, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(super::backward(&ids, &g, 3).is_err(), "an id out of range");
    }
}
