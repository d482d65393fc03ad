//! 2D rotary position embedding with the reference's zeroed class-token row.

use crate::config::ArpgConfig;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// cos/sin tables of shape `[cls_token_num + grid_h * grid_w, head_dim / 2]`, float32.
///
/// Row 0 (the class token) is all zeros, so the class token's rotated query and key vanish:
/// the official checkpoints were trained that way. Raster cell (i, j) is row `1 + i * grid_w + j`;
/// its angles are `[i * f_0 .. i * f_{d/4-1}, j * f_0 .. j * f_{d/4-1}]`.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    /// cos then sin, `[2, rows, head_dim / 2]`: one gather for the fused decoding step.
    packed: Tensor,
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
        let cos = Tensor::from_vec(cos, (rows, half), device)?;
        let sin = Tensor::from_vec(sin, (rows, half), device)?;
        Ok(Self {
            packed: Tensor::stack(&[&cos, &sin], 0)?,
            cos,
            sin,
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

    /// [`Rope::gather`]'s two tables as one `[2, batch, len, head_dim/2]`.
    pub fn gather_packed(&self, rows: &Tensor) -> Result<Tensor> {
        let (b, l) = rows.dims2()?;
        let cs = self.packed.index_select(&rows.flatten_all()?, 1)?;
        Ok(cs.reshape((2, b, l, ()))?)
    }
}

/// Rotate interleaved channel pairs (2m, 2m+1) of `x: [b, h, t, d]` by the angles in
/// `cos`/`sin: [b, t, d/2]`, in float32, returning `x`'s dtype: inference (candle's kernel,
/// which has no backward, where the fused bf16 one does not apply).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _enter = tracing::trace_span!("model.rope").entered();
    if let Some(out) = crate::kernels::rope::fused(x, cos, sin)? {
        return Ok(out);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(crate::kernels::at_least_f32(dtype))?;
    let (cos, sin) = (cos.to_dtype(x32.dtype())?, sin.to_dtype(x32.dtype())?);
    let out =
        candle_nn::rotary_emb::rope_i(&x32.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?;
    Ok(out.to_dtype(dtype)?)
}

/// [`apply`] with a backward: the fused bf16 kernel has its own, elsewhere tensor ops.
pub fn apply_train(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _enter = tracing::trace_span!("model.rope").entered();
    match crate::kernels::rope::fused(x, cos, sin)? {
        Some(out) => Ok(out),
        None => crate::kernels::rope::slow(x, cos, sin),
    }
}
