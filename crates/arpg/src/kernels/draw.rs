//! One token per row of logits by the Gumbel-max trick, classifier-free guidance and
//! temperature mixed in, in one kernel, with counter-based noise (splitmix64 of the sequence's
//! seed, salt, query and column) so that a CUDA graph can replay it: a generator's state would be frozen
//! into the graph. The same arithmetic and noise on the CPU and the GPU. `sampler::draw` says
//! what the settings mean.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

/// Guidance weight (`None`: no `[cond; uncond]` halves), temperature (0 = argmax), salt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GumbelArgmax {
    pub guidance: Option<f32>,
    pub temperature: f32,
    pub salt: u32,
}

impl GumbelArgmax {
    /// Tokens `[rows]` (u32) from contiguous logits `[copies * b, n, vocab]` (f32, or bf16 on
    /// CUDA) and i64 seeds `[b]`, one per sequence, read on the device; `rows = b * n`. Where
    /// the PTX does not load, the CPU version on copies (with one warning).
    pub fn apply(&self, logits: &Tensor, seed: &Tensor) -> Result<Tensor> {
        let dev = logits.device();
        if dev.is_cuda() && !super::loaded(dev) {
            let cpu = Device::Cpu;
            let l = logits.to_device(&cpu)?.to_dtype(DType::F32)?;
            let out = l.apply_op2_no_bwd(&seed.to_device(&cpu)?, self)?;
            return Ok(out.to_device(dev)?);
        }
        Ok(logits.contiguous()?.apply_op2_no_bwd(seed, self)?)
    }

    /// Rows drawn (one per query of the conditional half), queries per sequence, vocabulary.
    fn out_rows(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (rows, n, v) = l.shape().dims3()?;
        let half = if self.guidance.is_some() {
            rows / 2
        } else {
            rows
        };
        Ok((half * n, n, v))
    }

    /// The seeds' offset, checked to hold one per sequence.
    fn seeds(&self, rows: usize, n: usize, sl: &Layout) -> candle_core::Result<usize> {
        if sl.shape().elem_count() * n != rows || !sl.is_contiguous() {
            candle_core::bail!(
                "draw: {} seeds for {} sequences",
                sl.shape().elem_count(),
                rows / n.max(1)
            );
        }
        Ok(sl.start_offset())
    }

    fn kernel_args(&self) -> (i32, f32, f32, i32) {
        let noise = self.temperature > 0.0;
        (
            self.guidance.is_some() as i32,
            self.guidance.unwrap_or(1.0),
            if noise { self.temperature } else { 1.0 },
            noise as i32,
        )
    }
}

/// splitmix64's finaliser (the kernel's `mix64`).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl CustomOp2 for GumbelArgmax {
    fn name(&self) -> &'static str {
        "arpg-cfg-gumbel-argmax"
    }

    fn cpu_fwd(
        &self,
        l: &CpuStorage,
        ll: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, n, v) = self.out_rows(ll)?;
        let (lo, hi) = ll
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("draw: strided logits".into()))?;
        let logits = &l.as_slice::<f32>()?[lo..hi];
        let seeds = &s.as_slice::<i64>()?[self.seeds(rows, n, sl)?..];
        let (mix, w, t, noise) = self.kernel_args();
        let out: Vec<u32> = (0..rows)
            .map(|r| {
                let c = &logits[r * v..(r + 1) * v];
                let u = if mix != 0 {
                    &logits[(rows + r) * v..(rows + r + 1) * v]
                } else {
                    &[][..]
                };
                let (seed, q) = (seeds[r / n] as u64, (r % n) as u64);
                let base = mix64(seed ^ mix64(((self.salt as u64) << 32) | q));
                let (mut best, mut arg) = (f32::NEG_INFINITY, u32::MAX);
                for (j, &cj) in c.iter().enumerate() {
                    let mut x = cj;
                    if mix != 0 {
                        x = u[j] + (x - u[j]) * w;
                    }
                    if noise != 0 {
                        let h = mix64(base.wrapping_add(j as u64));
                        let un = ((h >> 40) as f32 + 0.5) * (1.0 / 16_777_216.0);
                        x = x / t + -(-un.ln()).ln();
                    }
                    if x > best || arg == u32::MAX {
                        (best, arg) = (x, j as u32);
                    }
                }
                arg
            })
            .collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        l: &candle_core::CudaStorage,
        ll: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (rows, n, v) = self.out_rows(ll)?;
        let dev = l.device().clone();
        let so = self.seeds(rows, n, sl)?;
        let ss = s.as_cuda_slice::<i64>()?.slice(so..so + rows / n);
        // Safety: the kernel writes one token per row.
        let mut dst = unsafe { dev.alloc::<u32>(rows) }?;
        let (mix, w, t, noise) = self.kernel_args();
        let (rows_u, n_u, v_u) = (rows as u32, n as u32, v as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows_u, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let ls = view::<$t>(l, ll, "draw")?;
                launch!(dev, $name, cfg;
                    &ls, &mut dst, &ss, &rows_u, &n_u, &v_u, &mix, &w, &t, &noise, &self.salt);
            }};
        }
        match l.dtype() {
            DType::F32 => run!(f32, "cfg_gumbel_argmax_f32"),
            DType::BF16 => run!(half::bf16, "cfg_gumbel_argmax_bf16"),
            dt => candle_core::bail!("draw: {dt:?} logits"),
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            Shape::from(rows),
        ))
    }
}
