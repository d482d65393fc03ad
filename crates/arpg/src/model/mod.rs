//! The ARPG two-pass transformer.
//!
//! Pass 1 (`self_dec`) runs causal self-attention over the content tokens (class token, then
//! image tokens in generation order). Its output is normalised once and projected to ONE shared
//! key/value set. Pass 2 (`cross_dec`) runs mask-token queries, each rotated with the position
//! of the token it must predict, against that shared key/value set.

pub mod cache;
pub mod fused;
pub mod layers;
pub mod rope;

pub use cache::KvCache;
pub use layers::Mode;

use crate::config::ArpgConfig;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use layers::{
    attention, causal_mask, linear, merge_heads, split_heads, CausalMask, FeedForward, Linear,
    RmsNorm,
};
use rope::Rope;

struct SelfBlock {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    proj: Linear,
    ffn: FeedForward,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

struct CrossBlock {
    to_q: Linear,
    proj: Linear,
    ffn: FeedForward,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// Positions of a forward pass: RoPE table rows (`0` = class token, `1 + p` = raster cell p).
pub struct Positions<'a> {
    /// `[batch, n_tokens]` rows of the content tokens fed to pass 1.
    pub keys: &'a Tensor,
    /// `[batch, n_queries]` rows of the tokens the queries predict.
    pub queries: &'a Tensor,
}

pub struct Arpg {
    cfg: ArpgConfig,
    embeddings: Embedding,
    self_dec: Vec<SelfBlock>,
    cross_dec: Vec<CrossBlock>,
    kv_norm: RmsNorm,
    to_k: Linear,
    to_v: Linear,
    norm: RmsNorm,
    head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    id: u64,
}

/// A fresh identity for a model's weights and tables (CUDA graphs hold their addresses).
fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Arpg {
    /// Build from a `VarBuilder` whose names follow the reference state dict.
    pub fn new(cfg: &ArpgConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, hid, eps) = (cfg.dim, cfg.ffn_hidden(), cfg.norm_eps);
        let emb = vb
            .pp("embeddings")
            .get((cfg.embedding_rows(), d), "weight")?;
        let l = vb.pp("layers");
        let mut self_dec = Vec::new();
        let mut cross_dec = Vec::new();
        for i in 0..cfg.self_layers() {
            let b = l.pp("self_dec").pp(i);
            let a = b.pp("attn");
            self_dec.push(SelfBlock {
                to_q: linear(&a, "to_q", d, d)?,
                to_k: linear(&a, "to_k", d, d)?,
                to_v: linear(&a, "to_v", d, d)?,
                proj: linear(&a, "proj", d, d)?,
                ffn: FeedForward::new(&b.pp("ffn"), d, hid)?,
                attn_norm: RmsNorm::new(&b, "attn_norm", d, eps)?,
                ffn_norm: RmsNorm::new(&b, "ffn_norm", d, eps)?,
            });
        }
        for i in 0..cfg.self_layers() {
            let b = l.pp("cross_dec").pp(i);
            let a = b.pp("attn");
            cross_dec.push(CrossBlock {
                to_q: linear(&a, "to_q", d, d)?,
                proj: linear(&a, "proj", d, d)?,
                ffn: FeedForward::new(&b.pp("ffn"), d, hid)?,
                attn_norm: RmsNorm::new(&b, "attn_norm", d, eps)?,
                ffn_norm: RmsNorm::new(&b, "ffn_norm", d, eps)?,
            });
        }
        let g = cfg.grid_size();
        Ok(Self {
            embeddings: Embedding::new(emb, d),
            self_dec,
            cross_dec,
            kv_norm: RmsNorm::new(&l, "norm", d, eps)?,
            to_k: linear(&l, "to_k", d, d)?,
            to_v: linear(&l, "to_v", d, d)?,
            norm: RmsNorm::new(&vb, "norm", d, eps)?,
            head: linear(&vb, "head", d, cfg.vocab_size)?,
            rope: Rope::new(cfg, (g, g), vb.device())?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
            id: next_id(),
        })
    }

    pub fn config(&self) -> &ArpgConfig {
        &self.cfg
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn rope(&self) -> &Rope {
        &self.rope
    }
    /// Unique per model instance and RoPE grid: what a captured decode graph was built from.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Use a RoPE table for another grid (resolution expansion); rows follow that grid's raster.
    pub fn set_grid(&mut self, grid: (usize, usize)) -> Result<()> {
        self.rope = Rope::new(&self.cfg, grid, &self.device)?;
        self.id = next_id();
        Ok(())
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embeddings.forward(ids)?)
    }

    fn mask_queries(&self, batch: usize, n: usize) -> Result<Tensor> {
        let ids = Tensor::full(self.cfg.mask_token(), (batch, n), &self.device)?;
        self.embed(&ids)
    }

    /// Teacher-forced forward (training path): `tokens [b, L]` = class token then image tokens
    /// in generation order; `pos.queries [b, L]` the rows of the tokens to predict. Causal
    /// masks in both passes. Returns float32 logits `[b, L, vocab]` in generation order.
    pub fn forward(&self, tokens: &Tensor, pos: Positions, mode: &mut Mode) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        let diff = mode.differentiable;
        let mask = causal_mask(l, &self.device)?;
        let mut x = self.embed(tokens)?;
        x = mode.drop(x)?;
        let (kc, ks) = self.rope.gather(pos.keys)?;
        let (qc, qs) = self.rope.gather(pos.queries)?;
        let h = self.cfg.n_head;
        for blk in &self.self_dec {
            let xn = blk.attn_norm.forward(&x, diff)?;
            let q = rope::apply(&split_heads(&blk.to_q.forward(&xn)?, h)?, &kc, &ks, diff)?;
            let k = rope::apply(&split_heads(&blk.to_k.forward(&xn)?, h)?, &kc, &ks, diff)?;
            let v = split_heads(&blk.to_v.forward(&xn)?, h)?;
            let a = merge_heads(&attention(&q, &k, &v, Some(&mask), diff)?)?;
            x = (x + mode.drop(blk.proj.forward(&a)?)?)?;
            let f = blk.ffn.forward(&blk.ffn_norm.forward(&x, diff)?, mode)?;
            x = (x + f)?;
        }
        let (k, v) = self.shared_kv(&x, &kc, &ks, diff)?;
        let q = self.mask_queries(b, l)?;
        let q = self.cross_pass(q, &k, &v, &qc, &qs, Some(&mask), mode)?;
        self.logits(&q, diff)
    }

    fn shared_kv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        diff: bool,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.cfg.n_head;
        let xn = self.kv_norm.forward(x, diff)?;
        let k = rope::apply(&split_heads(&self.to_k.forward(&xn)?, h)?, cos, sin, diff)?;
        let v = split_heads(&self.to_v.forward(&xn)?, h)?;
        Ok((k, v))
    }

    #[allow(clippy::too_many_arguments)]
    fn cross_pass(
        &self,
        mut q: Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&CausalMask>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let diff = mode.differentiable;
        let h = self.cfg.n_head;
        for blk in &self.cross_dec {
            let qn = blk.attn_norm.forward(&q, diff)?;
            let qh = rope::apply(&split_heads(&blk.to_q.forward(&qn)?, h)?, cos, sin, diff)?;
            let a = merge_heads(&attention(&qh, k, v, mask, diff)?)?;
            q = (q + mode.drop(blk.proj.forward(&a)?)?)?;
            let f = blk.ffn.forward(&blk.ffn_norm.forward(&q, diff)?, mode)?;
            q = (q + f)?;
        }
        Ok(q)
    }

    fn logits(&self, q: &Tensor, diff: bool) -> Result<Tensor> {
        Ok(self
            .head_logits(q, diff)?
            .to_dtype(layers::at_least_f32(self.dtype))?)
    }

    /// Logits in the compute dtype.
    fn head_logits(&self, q: &Tensor, diff: bool) -> Result<Tensor> {
        Ok(self.head.forward(&self.norm.forward(q, diff)?)?)
    }

    /// A KV cache for `batch` sequences of up to `capacity` content tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.self_dec.len(),
            batch,
            self.cfg.n_head,
            capacity,
            self.cfg.head_dim(),
            self.dtype,
            &self.device,
        )
    }

    /// One decoding step (inference path). Feeds `tokens [b, m]` (rows `pos.keys`) through
    /// pass 1, appending to `cache`, then runs `n` mask queries (rows `pos.queries [b, n]`)
    /// through pass 2 against every cached key. No mask inside a step. Returns float32
    /// logits `[b, n, vocab]`, or `None` when there are no queries (a prefill).
    pub fn step(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
    ) -> Result<Option<Tensor>> {
        self.step_inner(cache, tokens, pos, true)
    }

    /// [`Arpg::step`] with the logits left in the compute dtype (bf16 logits are a quarter of the
    /// memory of f32 ones at the last, largest step, and widening them later is exact).
    pub fn step_native_logits(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
    ) -> Result<Option<Tensor>> {
        self.step_inner(cache, tokens, pos, false)
    }

    fn step_inner(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
        f32_logits: bool,
    ) -> Result<Option<Tensor>> {
        let (b, m) = tokens.dims2()?;
        let n = pos.queries.dim(1)?;
        if cache.len() + m > cache.capacity() {
            bail!(
                "KV cache overflow: {} + {m} tokens > capacity {}",
                cache.len(),
                cache.capacity()
            );
        }
        let mut mode = Mode::inference();
        let h = self.cfg.n_head;
        let mut x = self.embed(tokens)?;
        let (kc, ks) = self.rope.gather(pos.keys)?;
        for (i, blk) in self.self_dec.iter().enumerate() {
            let xn = blk.attn_norm.forward(&x, false)?;
            let q = rope::apply(&split_heads(&blk.to_q.forward(&xn)?, h)?, &kc, &ks, false)?;
            let k = rope::apply(&split_heads(&blk.to_k.forward(&xn)?, h)?, &kc, &ks, false)?;
            let v = split_heads(&blk.to_v.forward(&xn)?, h)?;
            let (k, v) = cache.append_layer(i, &k, &v)?;
            let a = merge_heads(&attention(&q, &k, &v, None, false)?)?;
            x = (x + blk.proj.forward(&a)?)?;
            x = (&x
                + blk
                    .ffn
                    .forward(&blk.ffn_norm.forward(&x, false)?, &mut mode)?)?;
        }
        let (k, v) = self.shared_kv(&x, &kc, &ks, false)?;
        let (k, v) = cache.append_shared(&k, &v)?;
        cache.advance(m);
        if n == 0 {
            return Ok(None);
        }
        let (qc, qs) = self.rope.gather(pos.queries)?;
        let q = self.mask_queries(b, n)?;
        let q = self.cross_pass(q, &k, &v, &qc, &qs, None, &mut mode)?;
        Ok(Some(if f32_logits {
            self.logits(&q, false)?
        } else {
            self.head_logits(&q, false)?
        }))
    }
}
