//! Drawing tokens on the device: guidance mixing, temperature and a Gumbel-max draw in one
//! kernel (`kernels::draw`), with counter-based noise so that a CUDA graph can replay it (a
//! generator's state would be frozen into the graph).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

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

/// Tokens `[b, n]` (u32) from logits `[copies * b, n, vocab]` and seeds `[b]` (i64, one per
/// sequence, read on/// the device). Logits are used in f32 (bf16 ones are widened inside the CUDA kernel, which is
/// exact and saves an f32 copy). Same arithmetic and noise on the CPU and the GPU.
pub fn draw(logits: &Tensor, seed: &Tensor, d: Draw) -> Result<Tensor> {
    let (rows, n, _) = logits.dims3()?;
    ensure!(seed.dtype() == DType::I64, "draw: i64 seeds expected");
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
    let op = crate::kernels::draw::GumbelArgmax {
        guidance: d.guidance,
        temperature: d.temperature,
        salt: d.salt,
    };
    ensure!(
        seed.elem_count() == b,
        "draw: {} seeds for {b} sequences",
        seed.elem_count()
    );
    let out = op.apply(&logits, seed)?;
    Ok(out.reshape((b, n))?)
}

/// The seeds of a decode's `b` sequences from the one seed its generator gives: sequence `i`'s
/// noise depends on the decode's seed and `i` only, so a sequence draws the same tokens in any
/// batch that gives it the same pair (the server's batching relies on it).
pub fn sequence_seeds(seed: i64, b: usize) -> Vec<i64> {
    (0..b as u64)
        .map(|i| crate::kernels::draw::mix64(seed as u64 ^ crate::kernels::draw::mix64(i)) as i64)
        .collect()
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
        // A sequence's draws depend on its own seed, not on its place in the batch.
        let two = Tensor::cat(
            &[
                &l,
                &l.narrow(1, 0, 5)
                    .unwrap()
                    .pad_with_zeros(1, 0, 29995)
                    .unwrap(),
            ],
            0,
        )
        .unwrap();
        let both = draw(&two, &Tensor::new(&[9i64, 42], &Device::Cpu).unwrap(), d)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        assert_eq!(both[0], tokens(&l, &seed(9), d));
        assert_eq!(both[1][..5], a[..5]);
        assert!(draw(&two, &seed(1), d).is_err(), "one seed per sequence");
        let other_seed = tokens(&l, &seed(43), d);
        let other_salt = tokens(&l, &seed(42), Draw { salt: 8, ..d });
        for o in [other_seed, other_salt] {
            let same = a.iter().zip(&o).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
            // Independent draws agree with probability sum p^2 = 0.46.
            assert!((same - 0.46).abs() < 0.02, "{same}");
        }
    }
}
