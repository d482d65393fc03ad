//! AdamW with decoupled weight decay on matrices only, the learning-rate schedule, and
//! global gradient-norm clipping, as the paper's recipe uses them.

use anyhow::Result;
use candle_core::{Tensor, Var};

/// How a linear warm-up counts its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    /// Step i trains at `peak * (i + 1) / warmup`: the first step already learns.
    #[default]
    FromFirstStep,
    /// Step i trains at `peak * i / warmup`, as the paper's `train_c2i.py` computes it
    /// (`lr * epoch / warmup_epochs` with fractional epochs): its first step at lr 0.
    Reference,
}

/// Warmup from 0 to `peak` over `warmup` steps, then cosine down to `min` at `total`.
pub fn lr_at(step: usize, warmup: usize, total: usize, peak: f64, min: f64) -> f64 {
    lr_with(Warmup::FromFirstStep, step, warmup, total, peak, min)
}

/// [`lr_at`] with the warm-up counted as `how` says.
pub fn lr_with(how: Warmup, step: usize, warmup: usize, total: usize, peak: f64, min: f64) -> f64 {
    if step < warmup {
        let done = match how {
            Warmup::FromFirstStep => step + 1,
            Warmup::Reference => step,
        };
        return peak * done as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f64 / span as f64).min(1.0);
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * t).cos())
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// First and second moments, one pair per parameter.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Steps taken (for bias correction).
    pub t: usize,
}

impl AdamW {
    pub fn new(params: &[Var], beta1: f64, beta2: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Var| p.zeros_like();
        Ok(Self {
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            m: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    /// One update, in the order PyTorch's AdamW does it. Weight decay applies to tensors of
    /// two or more dimensions only (matrices and embeddings, not norms).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_owned(params, grads, lr, 1.0, None)
    }

    /// [`Self::step`] with the gradients scaled by `grad_scale` when it is below 1 (the
    /// clipping factor), for the tensors marked in `owned` only (all when `None`): under
    /// ZeRO-1 a rank keeps the moments of its own tensors and updates those. f32 tensors take
    /// the in-place passes of [`crate::kernels::adamw`] (the composite's roundings).
    pub fn step_owned(
        &mut self,
        params: &[Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
        owned: Option<&[bool]>,
    ) -> Result<()> {
        self.t += 1;
        let (bc1, bc2) = (
            1.0 - self.beta1.powi(self.t as i32),
            1.0 - self.beta2.powi(self.t as i32),
        );
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if owned.is_some_and(|o| !o[i]) {
                continue;
            }
            let s = crate::kernels::adamw::Step {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                lr,
                weight_decay: if p.rank() >= 2 {
                    self.weight_decay
                } else {
                    0.0
                },
                bc1,
                bc2,
                grad_scale,
            };
            let f32s = [p.as_tensor(), &self.m[i], &self.v[i], g]
                .iter()
                .all(|t| t.dtype() == candle_core::DType::F32 && t.is_contiguous());
            if f32s && crate::kernels::enabled() {
                crate::kernels::adamw::update(p, &self.m[i], &self.v[i], g, &s)?;
                continue;
            }
            let (w, m, v) = crate::kernels::adamw::update_slow(p, &self.m[i], &self.v[i], g, &s)?;
            p.set(&w)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The global L2 norm of `grads` (one read back to the host for all of them).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let sq: f64 = crate::kernels::adamw::squared_norms(grads)?.iter().sum();
    Ok(sq.sqrt())
}

/// The factor that brings a gradient norm down to `max_norm` (1 when it is within it, or
/// when clipping is off).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(55, 10, 100, 1.0, 0.1) < 0.6 && lr_at(55, 10, 100, 1.0, 0.1) > 0.5);
        // The paper's: lr * e / W over fractional epochs e = i / P, then cosine over
        // (e - W) / (E - W); P = 7 iterations per epoch, W = 3, E = 20 epochs.
        let (p, w, e, peak, min) = (7usize, 3usize, 20usize, 4e-4, 1e-5);
        for i in 0..e * p {
            let ep = i as f64 / p as f64;
            let want = if ep < w as f64 {
                peak * ep / w as f64
            } else {
                min + (peak - min)
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * (ep - w as f64) / (e - w) as f64).cos())
            };
            let got = lr_with(Warmup::Reference, i, w * p, e * p, peak, min);
            assert!((got - want).abs() < 1e-15, "iteration {i}: {got} vs {want}");
        }
    }

    #[test]
    fn adamw_matches_a_hand_computed_step_and_skips_decay_on_vectors() {
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, -2.0], (1, 2), &dev).unwrap();
        let b = Var::from_vec(vec![0.5f32], 1, &dev).unwrap();
        let mut opt = AdamW::new(&[w.clone(), b.clone()], 0.9, 0.95, 0.1).unwrap();
        let g = [
            Tensor::new(&[[0.2f32, -0.4]], &dev).unwrap(),
            Tensor::new(&[1.0f32], &dev).unwrap(),
        ];
        opt.step(&[w.clone(), b.clone()], &g, 0.01).unwrap();
        // First step: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (eps aside).
        let w1 = w.as_tensor().to_vec2::<f32>().unwrap();
        assert!(
            (w1[0][0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6,
            "{w1:?}"
        );
        assert!(
            (w1[0][1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6,
            "{w1:?}"
        );
        let b1 = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!((b1[0] - (0.5 - 0.01)).abs() < 1e-6, "{b1:?}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let g = vec![Tensor::new(&[3.0f32, 4.0], &dev).unwrap()];
        let n = grad_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert_eq!(clip_factor(n, 0.0), 1.0, "clipping off");
        assert_eq!(clip_factor(n, 10.0), 1.0, "within the bound");
        let v = (&g[0] * clip_factor(n, 1.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
    }
}
