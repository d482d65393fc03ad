//! Drawing tokens on the device: guidance mixing, temperature and a Gumbel-max draw in one
//! kernel, with counter-based noise so that a CUDA graph can replay it (a generator's state
//! would be frozen into the graph).

use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// How the rows of a logits tensor become tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Guidance weight `w`: the logits hold `[cond; uncond]` halves mixed as
    /// `u + (c - u) * w`. `None`: one half, used as it is.
    pub guidance: Option<f32>,
    /// 0 = argmax.
    pub temperature: f32,
    /// Varies the noise between the steps of one decode (the seed varies it between decodes).
    pub salt: u32,
}

/// Tokens `[b, n]` (u32) from logits `[copies * b, n, vocab]` and a seed `[1]` (i64, read on
/// the device). Logits are used in f32 (bf16 ones are widened inside the CUDA kernel, which is
/// exact and saves an f32 copy). Same arithmetic and noise on the CPU and the GPU.
pub fn draw(logits: &Tensor, seed: &Tensor, d: Draw) -> Result<Tensor> {
    let (rows, n, _) = logits.dims3()?;
    ensure!(
        seed.dtype() == DType::I64 && seed.elem_count() == 1,
        "draw: one i64 seed expected"
    );
    let native = logits.dtype() == DType::F32
        || (logits.dtype() == DType::BF16 && logits.device().is_cuda());
    let logits = if native {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    let b = match d.guidance {
        Some(_) => {
            ensure!(rows % 2 == 0, "draw: guidance needs [cond; uncond] halves");
            rows / 2
        }
        None => rows,
    };
    let out = logits.contiguous()?.apply_op2_no_bwd(seed, &d)?;
    Ok(out.reshape((b, n))?)
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Draw {
    /// Rows drawn: one per query of the conditional half.
    fn out_rows(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let (rows, n, v) = l.shape().dims3()?;
        let half = if self.guidance.is_some() {
            rows / 2
        } else {
            rows
        };
        Ok((half * n, v))
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

impl CustomOp2 for Draw {
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
        let (rows, v) = self.out_rows(ll)?;
        let (lo, _) = ll
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("draw: strided logits".into()))?;
        let logits = &l.as_slice::<f32>()?[lo..];
        let seed = s.as_slice::<i64>()?[sl.start_offset()] as u64;
        let (mix, w, t, noise) = self.kernel_args();
        let out: Vec<u32> = (0..rows)
            .map(|r| {
                let c = &logits[r * v..(r + 1) * v];
                let u = if mix != 0 {
                    &logits[(rows + r) * v..(rows + r + 1) * v]
                } else {
                    &[][..]
                };
                let base = mix64(seed ^ mix64(((self.salt as u64) << 32) | r as u64));
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
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (rows, v) = self.out_rows(ll)?;
        let (lo, hi) = ll
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("draw: strided logits".into()))?;
        let dev = l.device().clone();
        let so = sl.start_offset();
        let ss = s.as_cuda_slice::<i64>()?.slice(so..so + 1);
        // Safety: the kernel writes one token per row.
        let mut dst = unsafe { dev.alloc::<u32>(rows) }?;
        let name = match l.dtype() {
            DType::F32 => "cfg_gumbel_argmax_f32",
            DType::BF16 => "cfg_gumbel_argmax_bf16",
            dt => candle_core::bail!("draw: {dt:?} logits"),
        };
        let func =
            dev.get_or_load_custom_func(name, "arpg_fused", crate::model::fused::cuda::PTX)?;
        let (mix, w, t, noise) = self.kernel_args();
        let (rows_u, v_u) = (rows as u32, v as u32);
        let (lf, lb);
        let mut builder = func.builder();
        if l.dtype() == DType::F32 {
            lf = l.as_cuda_slice::<f32>()?.slice(lo..hi);
            builder.arg(&lf);
        } else {
            lb = l.as_cuda_slice::<half::bf16>()?.slice(lo..hi);
            builder.arg(&lb);
        }
        builder.arg(&mut dst);
        builder.arg(&ss);
        builder.arg(&rows_u);
        builder.arg(&v_u);
        builder.arg(&mix);
        builder.arg(&w);
        builder.arg(&t);
        builder.arg(&noise);
        builder.arg(&self.salt);
        let cfg = LaunchConfig {
            grid_dim: (rows_u, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: argument types and count match the kernel's signature.
        unsafe { builder.launch(cfg) }
            .map_err(|e| candle_core::Error::Msg(format!("draw kernel: {e:?}")))?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
            Shape::from(rows),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn seed(s: i64) -> Tensor {
        Tensor::new(&[s], &Device::Cpu).unwrap()
    }

    /// All drawn tokens, flattened.
    fn tokens(l: &Tensor, seed: &Tensor, d: Draw) -> Vec<u32> {
        draw(l, seed, d)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn zero_temperature_is_the_argmax_of_the_guided_logits_ties_to_the_lower_index() {
        // cond row, then uncond row: u + (c - u) * 3.
        let l = Tensor::new(
            &[[[1.0f32, 0.0, 0.5, 0.5]], [[0.0f32, 0.0, 0.5, 0.5]]],
            &Device::Cpu,
        )
        .unwrap();
        let d = Draw {
            guidance: Some(3.0),
            temperature: 0.0,
            salt: 0,
        };
        assert_eq!(
            draw(&l, &seed(1), d).unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![0]]
        );
        let ties = Tensor::new(&[[[0.0f32, 2.0, 2.0, 1.0]]], &Device::Cpu).unwrap();
        let d = Draw {
            guidance: None,
            ..d
        };
        assert_eq!(
            draw(&ties, &seed(1), d).unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![1]]
        );
    }

    #[test]
    fn draws_follow_the_softmax_of_logits_over_temperature_and_vary_with_seed_and_salt() {
        let p = [0.6f64, 0.3, 0.1];
        let t = 0.5f32;
        // Logits whose softmax at temperature t is p.
        let row: Vec<f32> = p.iter().map(|x| (x.ln() * t as f64) as f32).collect();
        let l = Tensor::new(row.as_slice(), &Device::Cpu)
            .unwrap()
            .broadcast_as((1, 30000, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        let d = Draw {
            guidance: None,
            temperature: t,
            salt: 7,
        };
        let a = tokens(&l, &seed(42), d);
        for (k, &pk) in p.iter().enumerate() {
            let f = a.iter().filter(|&&x| x == k as u32).count() as f64 / a.len() as f64;
            assert!((f - pk).abs() < 0.015, "token {k}: {f} vs {pk}");
        }
        let again = tokens(&l, &seed(42), d);
        assert_eq!(a, again, "same seed and salt, same draws");
        let other_seed = tokens(&l, &seed(43), d);
        let other_salt = tokens(&l, &seed(42), Draw { salt: 8, ..d });
        for o in [other_seed, other_salt] {
            let same = a.iter().zip(&o).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
            // Independent draws agree with probability sum p^2 = 0.46.
            assert!((same - 0.46).abs() < 0.02, "{same}");
        }
    }
}
