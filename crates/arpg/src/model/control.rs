//! The control encoder of controllable generation (the paper's extension, after ControlAR):
//! a condition image (edges, depth, a sketch) becomes one embedding per grid cell, and the
//! query that predicts cell p in pass 2 carries p's embedding. Pass 1, the causal masks and
//! the KV cache are untouched, so parallel decoding, CUDA graphs and editing work as before.
//!
//! Weights live under `control.` in the state dict: `patch_embed.weight` (a bias-free
//! `patch x patch` stride-`patch` convolution, as a linear over flattened patches),
//! `pos_embed.weight` (one row per cell), `layers.{i}` (bidirectional pre-norm blocks with
//! the transformer's key names), `norm.weight` and `out.weight`.

use super::layers::{linear, merge_heads, split_heads, FeedForward, Linear, Mode, Ops, RmsNorm};
use crate::config::{ArpgConfig, ControlConfig};
use anyhow::{ensure, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

struct Block {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    proj: Linear,
    ffn: FeedForward,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

impl Block {
    fn forward(&self, x: &Tensor, ops: Ops, n_head: usize, mode: &mut Mode) -> Result<Tensor> {
        let xn = (ops.norm)(&self.attn_norm, x)?;
        let heads = |l: &Linear| split_heads(&l.forward(&xn)?, n_head);
        let (q, k, v) = (heads(&self.to_q)?, heads(&self.to_k)?, heads(&self.to_v)?);
        let a = merge_heads(&(ops.attention)(&q, &k, &v, None)?)?;
        let x = (x + mode.drop(self.proj.forward(&a)?)?)?;
        let f = self.ffn.forward(&(ops.norm)(&self.ffn_norm, &x)?)?;
        Ok((&x + mode.drop(f)?)?)
    }
}

pub struct ControlEncoder {
    cfg: ControlConfig,
    /// The condition shape `[C, H, W]` (`ArpgConfig::control_shape`).
    shape: (usize, usize, usize),
    grid: usize,
    n_head: usize,
    patch_embed: Linear,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    out: Linear,
}

impl ControlEncoder {
    /// The encoder of `mc`'s `control` block.
    pub fn new(mc: &ArpgConfig, vb: VarBuilder) -> Result<Self> {
        let (cfg, shape) = match (&mc.control, mc.control_shape()) {
            (Some(c), Some(s)) => (c, s),
            _ => anyhow::bail!("the model config has no control block"),
        };
        let d = mc.dim;
        let patch = cfg.channels * cfg.patch * cfg.patch;
        let l = vb.pp("layers");
        let blocks = (0..cfg.layers)
            .map(|i| {
                let (b, a) = (l.pp(i), l.pp(i).pp("attn"));
                Ok(Block {
                    to_q: linear(&a, "to_q", d, d)?,
                    to_k: linear(&a, "to_k", d, d)?,
                    to_v: linear(&a, "to_v", d, d)?,
                    proj: linear(&a, "proj", d, d)?,
                    ffn: FeedForward::new(&b.pp("ffn"), d, mc.ffn_hidden())?,
                    attn_norm: RmsNorm::new(&b, "attn_norm", d, mc.norm_eps)?,
                    ffn_norm: RmsNorm::new(&b, "ffn_norm", d, mc.norm_eps)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            shape,
            grid: mc.grid_size(),
            n_head: mc.n_head,
            patch_embed: linear(&vb, "patch_embed", patch, d)?,
            pos: vb.pp("pos_embed").get((mc.block_size, d), "weight")?,
            blocks,
            norm: RmsNorm::new(&vb, "norm", d, mc.norm_eps)?,
            out: linear(&vb, "out", d, d)?,
        })
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    /// The condition's expected shape `[channels, side, side]`.
    pub fn input_shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    /// Embeddings `[b, cells, dim]` (raster order) of conditions `[b, C, H, W]` in [0, 1].
    pub fn forward(&self, cond: &Tensor, ops: Ops, mode: &mut Mode) -> Result<Tensor> {
        let (b, c, h, w) = cond.dims4()?;
        let want = self.input_shape();
        ensure!(
            (c, h, w) == want,
            "a condition of shape {:?}, the control encoder takes {want:?}",
            (c, h, w)
        );
        let (g, p) = (self.grid, self.cfg.patch);
        let x = ((cond.to_dtype(self.pos.dtype())? * 2.0)? - 1.0)?;
        // [b, C, g, p, g, p] -> [b, g, g, C, p, p]: each cell's patch, flattened as a
        // convolution kernel reads it.
        let x = x
            .reshape(vec![b, c, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .reshape((b, g * g, c * p * p))?;
        let mut x = self.patch_embed.forward(&x)?.broadcast_add(&self.pos)?;
        for blk in &self.blocks {
            x = blk.forward(&x, ops, self.n_head, mode)?;
        }
        Ok(self.out.forward(&(ops.norm)(&self.norm, &x)?)?)
    }
}
