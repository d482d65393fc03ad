//! 2D rotary position embedding with the reference's zeroed class-token row.

use crate::config::ArpgConfig;
use anyhow::Result;
use candle_core::{Device, Tensor, D};

/// cos/sin tables of shape `[cls_token_num + grid_h * grid_w, head_dim / 2]`, float32.
///
/// Row 0 (the class token) is all zeros, so the class token's rotated query and key vanish:
/// the official checkpoints were trained that way. Raster cell (i, j) is row `1 + i * grid_w + j`;
/// its angles are `[i * f_0 .. i * f_{d/4-1}, j * f_0 .. j * f_{d/4-1}]`.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub grid: (usize, usize),
}

impl Rope {
    pub fn new(cfg: &ArpgConfig, grid: (usize, usize), device: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let quarter = half / 2;
        // The reference computes the frequencies in float32; keep that rounding.
        let freqs: Vec<f32> = (0..quarter)
            .map(|k| 1.0f32 / (cfg.rope_base as f32).powf((2 * k) as f32 / half as f32))
            .collect();
        let (gh, gw) = grid;
        let rows = cfg.cls_token_num + gh * gw;
        let mut cos = vec![0f32; rows * half];
        let mut sin = vec![0f32; rows * half];
        for i in 0..gh {
            for j in 0..gw {
                let r = cfg.cls_token_num + i * gw + j;
                for (k, &f) in freqs.iter().enumerate() {
                    for (slot, t) in [(k, i as f32 * f), (quarter + k, j as f32 * f)] {
                        cos[r * half + slot] = t.cos();
                        sin[r * half + slot] = t.sin();
                    }
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (rows, half), device)?,
            sin: Tensor::from_vec(sin, (rows, half), device)?,
            grid,
        })
    }

    pub fn rows(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// cos and sin for a `[batch, len]` u32 tensor of table rows: two `[batch, len, head_dim/2]`.
    pub fn gather(&self, rows: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = rows.dims2()?;
        let flat = rows.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, l, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, l, ()))?;
        Ok((cos, sin))
    }
}

/// Rotate interleaved channel pairs (2m, 2m+1) of `x: [b, h, t, d]` by the angles in
/// `cos`/`sin: [b, t, d/2]`, in float32, returning `x`'s dtype.
///
/// On CUDA in bf16, one fused kernel with its own backward. Otherwise `differentiable` picks
/// plain tensor ops (which have a backward) over candle's fused kernel (which has none).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
    crate::util::timed("model.rope", x.device(), || {
        apply_inner(x, cos, sin, differentiable)
    })
}

fn apply_inner(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
    // The fused kernel has its own backward.
    if let Some(out) = super::fused::rope_i_bf16(x, cos, sin)? {
        return Ok(out);
    }
    generic(x, cos, sin, differentiable)
}

/// On CUDA: the gradient of a random linear loss through the fused bf16 RoPE against the
/// generic ops', max relative difference. `None` off CUDA or with fused kernels off.
pub fn fused_rope_grad_check(device: &Device) -> Result<Option<f64>> {
    use candle_core::DType;
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = candle_core::Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (b, h, t, d), device)?.to_dtype(DType::BF16)?,
    )?;
    let ang = Tensor::randn(0f32, 2.0, (b, t, d / 2), device)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let w = Tensor::randn(0f32, 1.0, (b, h, t, d), device)?;
    let Some(fused) = super::fused::rope_i_bf16(x.as_tensor(), &cos, &sin)? else {
        return Ok(None);
    };
    let grad = |y: &Tensor| -> Result<Tensor> {
        let loss = (y.to_dtype(DType::F32)? * &w)?.sum_all()?;
        Ok(loss
            .backward()?
            .get(&x)
            .cloned()
            .expect("a gradient")
            .to_dtype(DType::F32)?)
    };
    let (gf, gg) = (
        grad(&fused)?,
        grad(&generic(x.as_tensor(), &cos, &sin, true)?)?,
    );
    Ok(Some(super::fused::rel_diff(&gf, &gg)?))
}

fn generic(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(super::layers::at_least_f32(dtype))?;
    let (cos, sin) = (&cos.to_dtype(x32.dtype())?, &sin.to_dtype(x32.dtype())?);
    let out = if differentiable {
        let (b, h, t, d) = x32.dims4()?;
        let xs = x32.reshape((b, h, t, d / 2, 2))?;
        let x0 = xs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let x1 = xs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
        let c = cos.unsqueeze(1)?;
        let s = sin.unsqueeze(1)?;
        let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
        let o1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
        Tensor::stack(&[o0, o1], D::Minus1)?.reshape((b, h, t, d))?
    } else {
        candle_nn::rotary_emb::rope_i(&x32.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?
    };
    Ok(out.to_dtype(dtype)?)
}
