//! Turning one row of logits into one token: temperature, top-k, top-p, then a draw.
//! Each row is filtered on its own (the reference's top-p scatters along the wrong axis
//! for `[batch, n, vocab]` logits; here every token's distribution is handled separately).

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenFilter {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// 0 = off; else keep the k largest logits.
    pub top_k: usize,
    /// 1 = off; else keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: f32,
}

impl Default for TokenFilter {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl TokenFilter {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!("--temperature {} must be >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("--top-p {} must be in (0, 1]", self.top_p);
        }
        Ok(())
    }

    /// Apply temperature, top-k and top-p to `logits` in place: removed entries become -inf.
    pub fn filter(&self, logits: &mut [f32]) {
        let t = self.temperature.max(1e-5);
        for l in logits.iter_mut() {
            *l /= t;
        }
        let v = logits.len();
        if self.top_k > 0 && self.top_k < v {
            // Keep every logit >= the k-th largest (ties kept, as the reference does).
            let mut tmp = logits.to_vec();
            let (_, kth, _) = tmp.select_nth_unstable_by(self.top_k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            for l in logits.iter_mut() {
                if *l < kth {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if self.top_p < 1.0 {
            let mut idx: Vec<usize> = (0..v).filter(|&i| logits[i].is_finite()).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let max = logits[idx[0]];
            let z: f64 = idx.iter().map(|&i| ((logits[i] - max) as f64).exp()).sum();
            let mut cum = 0.0;
            let mut keep = 0;
            // Keep tokens until the mass before them exceeds p (the first token always stays).
            for &i in &idx {
                if keep > 0 && cum > self.top_p as f64 {
                    break;
                }
                cum += ((logits[i] - max) as f64).exp() / z;
                keep += 1;
            }
            for &i in &idx[keep..] {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }

    /// One token from a row of logits (consumed as scratch space).
    pub fn sample<R: Rng>(&self, logits: &mut [f32], rng: &mut R) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        self.filter(logits);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for l in logits.iter_mut() {
            let p = ((*l - max) as f64).exp();
            *l = p as f32;
            total += p;
        }
        let mut u = rng.random::<f64>() * total;
        let mut last = 0;
        for (i, &p) in logits.iter().enumerate() {
            if p > 0.0 {
                last = i;
                u -= p as f64;
                if u < 0.0 {
                    return i as u32;
                }
            }
        }
        last as u32
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn kept(f: &TokenFilter, logits: &[f32]) -> Vec<usize> {
        let mut l = logits.to_vec();
        f.filter(&mut l);
        (0..l.len()).filter(|&i| l[i].is_finite()).collect()
    }

    #[test]
    fn top_k_keeps_the_k_largest_of_each_row() {
        let f = TokenFilter {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
        };
        assert_eq!(kept(&f, &[0.1, 3.0, -1.0, 2.0]), vec![1, 3]);
        assert_eq!(kept(&f, &[5.0, 3.0, 4.0, 2.0]), vec![0, 2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus_per_row() {
        // probabilities 0.5, 0.3, 0.15, 0.05 (as logits of their logs)
        let row = [0.5f32.ln(), 0.15f32.ln(), 0.3f32.ln(), 0.05f32.ln()];
        let f = TokenFilter {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
        };
        assert_eq!(kept(&f, &row), vec![0, 2]);
        let f = TokenFilter { top_p: 0.45, ..f };
        assert_eq!(kept(&f, &row), vec![0]);
        let f = TokenFilter { top_p: 0.85, ..f };
        assert_eq!(kept(&f, &row), vec![0, 1, 2]);
        // A second row with another order is filtered by its own probabilities.
        let row2 = [0.05f32.ln(), 0.5f32.ln(), 0.15f32.ln(), 0.3f32.ln()];
        let f = TokenFilter { top_p: 0.7, ..f };
        assert_eq!(kept(&f, &row2), vec![1, 3]);
    }

    #[test]
    fn sampling_follows_the_distribution_and_greedy_takes_argmax() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let row = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let f = TokenFilter::default();
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[f.sample(&mut row.clone(), &mut rng) as usize] += 1;
        }
        let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 20000.0).collect();
        assert!(
            (freq[0] - 0.7).abs() < 0.02 && (freq[2] - 0.1).abs() < 0.02,
            "{freq:?}"
        );
        let g = TokenFilter {
            temperature: 0.0,
            ..f
        };
        assert_eq!(g.sample(&mut [1.0, 5.0, 5.0, 2.0], &mut rng), 1);
        let k1 = TokenFilter { top_k: 1, ..f };
        for _ in 0..100 {
            assert_eq!(k1.sample(&mut row.clone(), &mut rng), 0);
        }
    }
}
