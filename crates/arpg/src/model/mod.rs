//! The ARPG two-pass transformer.
//!
//! Pass 1 (`self_dec`) runs causal self-attention over the content tokens (class token, then
//! image tokens in generation order). Its output is normalised once and projected to ONE shared
//! key/value set. Pass 2 (`cross_dec`) runs mask-token queries, each rotated with the position
//! of the token it must predict, against that shared key/value set.
//!
//! One block loop ([`Arpg::passes`]) serves the training forward and the cached decoding step;
//! they differ in their masks, the cache and the ops of their [`Mode`]. A model fused for
//! decoding ([`Arpg::fuse_for_decoding`]: bf16 on CUDA) runs its unmasked steps through the
//! same blocks with merged weights and the kernels of [`crate::kernels::decode`] instead.

pub mod backward;
pub mod cache;
pub mod control;
pub mod layers;
pub mod rope;

pub use cache::KvCache;
pub use layers::Mode;

use crate::config::ArpgConfig;
use crate::kernels::decode;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use layers::{
    causal_mask, linear, merge_heads, split_heads, CausalMask, FeedForward, Linear, Ops, RmsNorm,
};
use rope::Rope;

/// What the blocks of one pass share: its ops and dropout (the mode), the RoPE angles of the
/// tokens it runs, its mask and, when decoding, the KV cache its self-attention extends.
struct Pass<'p, 'm> {
    ops: Ops,
    mode: &'p mut Mode<'m>,
    cos: Tensor,
    sin: Tensor,
    mask: Option<CausalMask>,
    cache: Option<&'p KvCache>,
    n_head: usize,
}

impl Pass<'_, '_> {
    fn norm(&self, n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        (self.ops.norm)(n, x)
    }

    /// `[b, t, h*d]` projections to rotated heads `[b, h, t, d]`.
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        (self.ops.rope)(&split_heads(x, self.n_head)?, &self.cos, &self.sin)
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        merge_heads(&(self.ops.attention)(q, k, v, self.mask)?)
    }

    fn drop(&mut self, x: Tensor) -> Result<Tensor> {
        self.mode.drop(x)
    }
}

struct SelfBlock {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    proj: Linear,
    ffn: FeedForward,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    span: tracing::Span,
}

impl SelfBlock {
    fn new(cfg: &ArpgConfig, vb: VarBuilder) -> Result<Self> {
        let (d, a) = (cfg.dim, vb.pp("attn"));
        Ok(Self {
            to_q: linear(&a, "to_q", d, d)?,
            to_k: linear(&a, "to_k", d, d)?,
            to_v: linear(&a, "to_v", d, d)?,
            proj: linear(&a, "proj", d, d)?,
            ffn: FeedForward::new(&vb.pp("ffn"), d, cfg.ffn_hidden())?,
            attn_norm: RmsNorm::new(&vb, "attn_norm", d, cfg.norm_eps)?,
            ffn_norm: RmsNorm::new(&vb, "ffn_norm", d, cfg.norm_eps)?,
            span: tracing::trace_span!("model.self_block"),
        })
    }

    /// Causal self-attention of layer `i` (over the cache too, when decoding), then the FFN.
    fn forward(&self, x: &Tensor, p: &mut Pass, i: usize) -> Result<Tensor> {
        let _enter = self.span.enter();
        let xn = p.norm(&self.attn_norm, x)?;
        let q = p.rope(&self.to_q.forward(&xn)?)?;
        let k = p.rope(&self.to_k.forward(&xn)?)?;
        let v = split_heads(&self.to_v.forward(&xn)?, p.n_head)?;
        let (k, v) = match p.cache {
            Some(c) => c.append_layer(i, &k, &v)?,
            None => (k, v),
        };
        let a = p.attend(&q, &k, &v)?;
        let x = (x + p.drop(self.proj.forward(&a)?)?)?;
        let f = self.ffn.forward(&p.norm(&self.ffn_norm, &x)?)?;
        Ok((&x + p.drop(f)?)?)
    }

    /// The fused decoding step's layer `i`: `x` and `xn = attn_norm(x)` in, `(x', next(x'))`
    /// out, where `next` is the norm that reads this layer's output.
    fn forward_fused(
        &self,
        w: &FusedBlock,
        (x, xn): (Tensor, Tensor),
        next: &RmsNorm,
        f: &FusedPass,
        i: usize,
    ) -> Result<(Tensor, Tensor)> {
        let _enter = self.span.enter();
        let d = x.dim(D::Minus1)?;
        let qkv = w
            .qkv
            .as_ref()
            .expect("self blocks merge q, k, v")
            .forward(&xn)?;
        let buf = f.cache.layer(i);
        decode::kv_to_cache(buf, &qkv, &f.cs, d, 2 * d, f.at)?;
        let a = decode::cache_attention(&qkv, buf, &f.cs, 0, f.at + f.m)?;
        w.proj_and_ffn(&x, &a, &self.proj, &self.ffn_norm, &self.ffn, next)
    }
}

struct CrossBlock {
    to_q: Linear,
    proj: Linear,
    ffn: FeedForward,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    span: tracing::Span,
}

impl CrossBlock {
    fn new(cfg: &ArpgConfig, vb: VarBuilder) -> Result<Self> {
        let (d, a) = (cfg.dim, vb.pp("attn"));
        Ok(Self {
            to_q: linear(&a, "to_q", d, d)?,
            proj: linear(&a, "proj", d, d)?,
            ffn: FeedForward::new(&vb.pp("ffn"), d, cfg.ffn_hidden())?,
            attn_norm: RmsNorm::new(&vb, "attn_norm", d, cfg.norm_eps)?,
            ffn_norm: RmsNorm::new(&vb, "ffn_norm", d, cfg.norm_eps)?,
            span: tracing::trace_span!("model.cross_block"),
        })
    }

    /// Queries `q` attend to the shared keys/values `k`, `v`, then the FFN.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &mut Pass) -> Result<Tensor> {
        let _enter = self.span.enter();
        let qh = p.rope(&self.to_q.forward(&p.norm(&self.attn_norm, q)?)?)?;
        let a = p.attend(&qh, k, v)?;
        let q = (q + p.drop(self.proj.forward(&a)?)?)?;
        let f = self.ffn.forward(&p.norm(&self.ffn_norm, &q)?)?;
        Ok((&q + p.drop(f)?)?)
    }

    /// The fused decoding step's cross layer, as [`SelfBlock::forward_fused`]; the shared
    /// keys/values are the first `f.at + f.m` tokens of the cache's shared buffer.
    fn forward_fused(
        &self,
        w: &FusedBlock,
        (q, qn): (Tensor, Tensor),
        next: &RmsNorm,
        f: &FusedPass,
    ) -> Result<(Tensor, Tensor)> {
        let _enter = self.span.enter();
        let qh = self.to_q.forward(&qn)?;
        let a = decode::cache_attention(&qh, f.cache.shared(), &f.cs, 0, f.at + f.m)?;
        w.proj_and_ffn(&q, &a, &self.proj, &self.ffn_norm, &self.ffn, next)
    }
}

/// A block's merged weights for the fused decoding step (its own weights become views of
/// them): q|k|v (self-attention blocks only) and w1|w3.
struct FusedBlock {
    qkv: Option<Linear>,
    w13: Linear,
}

impl FusedBlock {
    /// What both kinds of fused layer end with: `x + proj(a)`, then its FFN through the merged
    /// w1|w3, added back: `(x', next(x'))`.
    fn proj_and_ffn(
        &self,
        x: &Tensor,
        a: &Tensor,
        proj: &Linear,
        ffn_norm: &RmsNorm,
        ffn: &FeedForward,
        next: &RmsNorm,
    ) -> Result<(Tensor, Tensor)> {
        let add_norm =
            |x: &Tensor, y: &Tensor, n: &RmsNorm| decode::add_rms_norm(x, y, &n.weight, n.eps);
        let (x, xn) = add_norm(x, &proj.forward(a)?, ffn_norm)?;
        let h = decode::silu_mul(&self.w13.forward(&xn)?)?;
        add_norm(&x, &ffn.w2.forward(&h)?, next)
    }
}

/// The merged weights of [`Arpg::fuse_for_decoding`].
struct Fused {
    self_dec: Vec<FusedBlock>,
    cross_dec: Vec<FusedBlock>,
    /// The shared keys|values.
    kv: Linear,
}

/// What the fused layers of one step share: the cache, where this step's `m` tokens go
/// (`at`), and the packed cos/sin of the tokens the pass rotates.
struct FusedPass<'a> {
    cache: &'a KvCache,
    at: usize,
    m: usize,
    cs: Tensor,
}

/// Positions of a forward pass: RoPE table rows (`0` = class token, `1 + p` = raster cell p).
pub struct Positions<'a> {
    /// `[batch, n_tokens]` rows of the content tokens fed to pass 1.
    pub keys: &'a Tensor,
    /// `[batch, n_queries]` rows of the tokens the queries predict.
    pub queries: &'a Tensor,
    /// A condition's query table `[batch, rows, dim]` ([`Arpg::control_queries`]): each
    /// query reads its row there instead of the mask token. `None`: mask-token queries.
    pub control: Option<&'a Tensor>,
}

/// Learned absolute positions (`abs_pos_embed`): one table row per RoPE row of the training
/// grid, and the table row each RoPE row of the current grid reads.
struct PosEmbed {
    table: Tensor,
    map: Tensor,
}

impl PosEmbed {
    /// Which table row each RoPE row of `grid` reads: the class rows their own; the cells of
    /// a larger (or smaller) grid those of the training grid centred in it, clamped to its
    /// border.
    fn map(cfg: &ArpgConfig, grid: (usize, usize), device: &Device) -> Result<Tensor> {
        let g = cfg.grid_size() as i64;
        let (gh, gw) = (grid.0 as i64, grid.1 as i64);
        let (oi, oj) = ((gh - g).div_euclid(2), (gw - g).div_euclid(2));
        let cls = cfg.cls_token_num as i64;
        let mut m: Vec<u32> = (0..cls as u32).collect();
        for i in 0..gh {
            for j in 0..gw {
                let (ti, tj) = ((i - oi).clamp(0, g - 1), (j - oj).clamp(0, g - 1));
                m.push((cls + ti * g + tj) as u32);
            }
        }
        let n = m.len();
        Ok(Tensor::from_vec(m, n, device)?)
    }

    /// Embeddings `[b, l, dim]` of a `[b, l]` tensor of RoPE rows.
    fn gather(&self, rows: &Tensor) -> Result<Tensor> {
        let (b, l) = rows.dims2()?;
        let idx = self.map.index_select(&rows.flatten_all()?, 0)?;
        Ok(self.table.index_select(&idx, 0)?.reshape((b, l, ()))?)
    }
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
    pos: Option<PosEmbed>,
    control: Option<control::ControlEncoder>,
    rope: Rope,
    /// Merged weights: unmasked decoding steps take the fused kernels.
    fused: Option<Fused>,
    dtype: DType,
    device: Device,
    id: u64,
}

/// A fresh identity for a model's weights and tables (CUDA graphs hold their addresses).
fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Records the name and shape of every weight a model asks for, handing out zeros that take
/// no memory (one element broadcast): how [`Arpg::parameter_shapes`] reads the declarations.
#[derive(Default)]
struct ShapeRecorder(std::sync::Arc<std::sync::Mutex<ParameterShapes>>);

/// Parameter names and shapes, in declaration order.
pub type ParameterShapes = Vec<(String, Vec<usize>)>;

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: every weight is declared with its shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl Arpg {
    /// Build from a `VarBuilder` whose names follow the reference state dict. The weights are
    /// declared here only: [`Arpg::parameter_shapes`] reads them back from this function.
    pub fn new(cfg: &ArpgConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, eps) = (cfg.dim, cfg.norm_eps);
        let emb = vb
            .pp("embeddings")
            .get((cfg.embedding_rows(), d), "weight")?;
        let l = vb.pp("layers");
        let self_dec = (0..cfg.self_layers())
            .map(|i| SelfBlock::new(cfg, l.pp("self_dec").pp(i)))
            .collect::<Result<_>>()?;
        let cross_dec = (0..cfg.self_layers())
            .map(|i| CrossBlock::new(cfg, l.pp("cross_dec").pp(i)))
            .collect::<Result<_>>()?;
        let kv_norm = RmsNorm::new(&l, "norm", d, eps)?;
        let (to_k, to_v) = (linear(&l, "to_k", d, d)?, linear(&l, "to_v", d, d)?);
        let norm = RmsNorm::new(&vb, "norm", d, eps)?;
        let head = linear(&vb, "head", d, cfg.vocab_size)?;
        let g = cfg.grid_size();
        let pos = if cfg.abs_pos_embed {
            Some(PosEmbed {
                table: vb
                    .pp("pos_embeddings")
                    .get((cfg.cls_token_num + cfg.block_size, d), "weight")?,
                map: PosEmbed::map(cfg, (g, g), vb.device())?,
            })
        } else {
            None
        };
        let control = match &cfg.control {
            Some(_) => Some(control::ControlEncoder::new(cfg, vb.pp("control"))?),
            None => None,
        };
        Ok(Self {
            embeddings: Embedding::new(emb, d),
            self_dec,
            cross_dec,
            kv_norm,
            to_k,
            to_v,
            norm,
            head,
            pos,
            control,
            rope: Rope::new(cfg, (g, g), vb.device())?,
            fused: None,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
            id: next_id(),
        })
    }

    /// Every parameter name and shape in the reference's state-dict layout, in the order
    /// [`Arpg::new`] declares them (no weights are allocated).
    pub fn parameter_shapes(cfg: &ArpgConfig) -> Result<ParameterShapes> {
        let rec = ShapeRecorder::default();
        let seen = rec.0.clone();
        Self::new(
            cfg,
            VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu),
        )?;
        let shapes = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(shapes)
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

    /// Let unmasked decoding steps run the fused kernels of [`crate::kernels::decode`]: merges
    /// q|k|v, w1|w3 and the shared k|v into one weight each (the separate weights become views
    /// of them, so memory does not grow). Where the kernels apply (bf16 on CUDA), or always
    /// with `force` (their CPU versions: for tests). Returns whether the fused step is on.
    /// An inference model only: the views are no longer trainable variables.
    pub fn fuse_for_decoding(&mut self, force: bool) -> Result<bool> {
        let applies = crate::kernels::decode::applies(&self.device, self.dtype)
            && self.cfg.head_dim() == crate::kernels::decode::HEAD_DIM;
        if self.fused.is_some() || !(force || applies) {
            return Ok(self.fused.is_some());
        }
        ensure!(
            self.cfg.head_dim() == crate::kernels::decode::HEAD_DIM,
            "the fused decoding step needs heads of {}, not {}",
            crate::kernels::decode::HEAD_DIM,
            self.cfg.head_dim()
        );
        let w13 = |f: &mut FeedForward| Linear::merge(&mut [&mut f.w1, &mut f.w3]);
        let self_dec = self
            .self_dec
            .iter_mut()
            .map(|b| {
                Ok(FusedBlock {
                    qkv: Some(Linear::merge(&mut [&mut b.to_q, &mut b.to_k, &mut b.to_v])?),
                    w13: w13(&mut b.ffn)?,
                })
            })
            .collect::<Result<_>>()?;
        let cross_dec = self
            .cross_dec
            .iter_mut()
            .map(|b| {
                Ok(FusedBlock {
                    qkv: None,
                    w13: w13(&mut b.ffn)?,
                })
            })
            .collect::<Result<_>>()?;
        let kv = Linear::merge(&mut [&mut self.to_k, &mut self.to_v])?;
        self.fused = Some(Fused {
            self_dec,
            cross_dec,
            kv,
        });
        // Captured graphs hold the old weights' addresses.
        self.id = next_id();
        Ok(true)
    }

    /// Whether unmasked decoding steps run fused ([`Arpg::fuse_for_decoding`]).
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Use a RoPE table for another grid (resolution expansion); rows follow that grid's raster.
    pub fn set_grid(&mut self, grid: (usize, usize)) -> Result<()> {
        self.rope = Rope::new(&self.cfg, grid, &self.device)?;
        if let Some(p) = self.pos.as_mut() {
            p.map = PosEmbed::map(&self.cfg, grid, &self.device)?;
        }
        self.id = next_id();
        Ok(())
    }

    /// Token embeddings of `ids [b, l]` at RoPE rows `rows [b, l]` (plus their absolute
    /// position embedding when the model has one).
    fn embed(&self, ids: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(ids)?;
        match &self.pos {
            Some(p) => Ok((x + p.gather(rows)?)?),
            None => Ok(x),
        }
    }

    /// Mask-token queries for the cells at RoPE rows `rows [b, n]`.
    fn mask_queries(&self, rows: &Tensor) -> Result<Tensor> {
        let ids = Tensor::full(self.cfg.mask_token(), rows.dims2()?, &self.device)?;
        self.embed(&ids, rows)
    }

    /// The control encoder, for a model that has one.
    pub fn control(&self) -> Option<&control::ControlEncoder> {
        self.control.as_ref()
    }

    /// The query table of conditions `cond [b, C, H, W]` (values in [0, 1]): for every RoPE
    /// row of the model's grid, the query that predicts it, `[b, rows, dim]`, to pass as
    /// [`Positions::control`]. `keep [b]` (1 or 0, float) selects per sequence the condition
    /// or the null condition (the plain mask-token query: what condition dropout trains).
    pub fn control_queries(
        &self,
        cond: &Tensor,
        keep: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let enc = self.control.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this model has no control encoder: it takes no condition")
        })?;
        let (cls, cells) = (self.cfg.cls_token_num, self.cfg.block_size);
        if self.rope.rows() != cls + cells {
            bail!("a condition covers the model's own grid only, not a resized one (--grid)");
        }
        let b = cond.dim(0)?;
        let ctrl = enc.forward(cond, Ops::for_mode(mode), mode)?;
        let rows = Tensor::arange(0u32, (cls + cells) as u32, &self.device)?.unsqueeze(0)?;
        let base = self.mask_queries(&rows)?;
        let d = self.cfg.dim;
        // The class rows are never queried; a cell's query gains (add) or swaps the mask
        // token for (replace) its control embedding.
        let delta = match enc.config().query {
            crate::config::ControlQuery::Add => ctrl,
            crate::config::ControlQuery::Replace => {
                let mask = self
                    .embeddings
                    .forward(&Tensor::new(&[self.cfg.mask_token()], &self.device)?)?;
                ctrl.broadcast_sub(&mask)?
            }
        };
        let delta = match keep {
            Some(k) => delta.broadcast_mul(&k.to_dtype(delta.dtype())?.reshape((b, 1, 1))?)?,
            None => delta,
        };
        let pad = Tensor::zeros((b, cls, d), delta.dtype(), &self.device)?;
        Ok(Tensor::cat(&[&pad, &delta], 1)?.broadcast_add(&base)?)
    }

    /// Queries at rows `rows [b, n]`: the mask token, or their rows of a condition's table.
    fn queries(&self, rows: &Tensor, control: Option<&Tensor>) -> Result<Tensor> {
        let Some(table) = control else {
            return self.mask_queries(rows);
        };
        let (b, n) = rows.dims2()?;
        let d = self.cfg.dim;
        ensure!(
            table.dims3()? == (b, self.rope.rows(), d),
            "a condition table of shape {:?} for {b} sequences of {} rows",
            table.dims(),
            self.rope.rows()
        );
        let idx = rows.unsqueeze(2)?.broadcast_as((b, n, d))?.contiguous()?;
        Ok(table.gather(&idx, 1)?)
    }

    /// Both passes, for the training forward and the decoding step alike: `tokens` at rows
    /// `pos.keys` through the self-attention blocks under `masks.0` (extending `cache` when
    /// decoding, without committing it), the shared keys/values, then mask queries at rows
    /// `pos.queries` through the cross-attention blocks under `masks.1`. Logits in the compute
    /// dtype, or `None` without queries.
    fn passes(
        &self,
        tokens: &Tensor,
        pos: Positions,
        masks: (Option<CausalMask>, Option<CausalMask>),
        cache: Option<&KvCache>,
        mode: &mut Mode,
    ) -> Result<Option<Tensor>> {
        let (cos, sin) = self.rope.gather(pos.keys)?;
        let mut p = Pass {
            ops: Ops::for_mode(mode),
            mode,
            cos,
            sin,
            mask: masks.0,
            cache,
            n_head: self.cfg.n_head,
        };
        let mut x = p.drop(self.embed(tokens, pos.keys)?)?;
        for (i, blk) in self.self_dec.iter().enumerate() {
            x = blk.forward(&x, &mut p, i)?;
        }
        let xn = p.norm(&self.kv_norm, &x)?;
        let (k, v) = (p.rope(&self.to_k.forward(&xn)?)?, self.to_v.forward(&xn)?);
        let v = split_heads(&v, p.n_head)?;
        let (k, v) = match cache {
            Some(c) => c.append_shared(&k, &v)?,
            None => (k, v),
        };
        if pos.queries.dim(1)? == 0 {
            return Ok(None);
        }
        (p.cos, p.sin) = self.rope.gather(pos.queries)?;
        p.mask = masks.1;
        let mut q = self.queries(pos.queries, pos.control)?;
        for blk in &self.cross_dec {
            q = blk.forward(&q, &k, &v, &mut p)?;
        }
        Ok(Some(self.head.forward(&p.norm(&self.norm, &q)?)?))
    }

    /// [`Arpg::passes`] of an unmasked decoding step through the fused kernels.
    fn passes_fused(
        &self,
        w: &Fused,
        tokens: &Tensor,
        pos: Positions,
        cache: &KvCache,
    ) -> Result<Option<Tensor>> {
        let d = self.cfg.dim;
        let mut f = FusedPass {
            cache,
            at: cache.len(),
            m: tokens.dim(1)?,
            cs: self.rope.gather_packed(pos.keys)?,
        };
        let x = self.embed(tokens, pos.keys)?;
        let xn = self.self_dec[0].attn_norm.forward_inference(&x)?;
        let mut h = (x, xn);
        for (i, (blk, bw)) in self.self_dec.iter().zip(&w.self_dec).enumerate() {
            let next = self
                .self_dec
                .get(i + 1)
                .map_or(&self.kv_norm, |b| &b.attn_norm);
            h = blk.forward_fused(bw, h, next, &f, i)?;
        }
        let kv = w.kv.forward(&h.1)?;
        decode::kv_to_cache(cache.shared(), &kv, &f.cs, 0, d, f.at)?;
        if pos.queries.dim(1)? == 0 {
            return Ok(None);
        }
        f.cs = self.rope.gather_packed(pos.queries)?;
        let q = self.queries(pos.queries, pos.control)?;
        let qn = self.cross_dec[0].attn_norm.forward_inference(&q)?;
        let mut h = (q, qn);
        for (i, (blk, bw)) in self.cross_dec.iter().zip(&w.cross_dec).enumerate() {
            let next = self
                .cross_dec
                .get(i + 1)
                .map_or(&self.norm, |b| &b.attn_norm);
            h = blk.forward_fused(bw, h, next, &f)?;
        }
        Ok(Some(self.head.forward(&h.1)?))
    }

    /// Teacher-forced forward (training path): `tokens [b, L]` = class token then image tokens
    /// in generation order; `pos.queries [b, L]` the rows of the tokens to predict. Causal
    /// masks in both passes. Returns float32 logits `[b, L, vocab]` in generation order.
    pub fn forward(&self, tokens: &Tensor, pos: Positions, mode: &mut Mode) -> Result<Tensor> {
        let mask = Some(causal_mask(tokens.dim(1)?));
        let logits = self.passes(tokens, pos, (mask, mask), None, mode)?;
        let logits = logits.ok_or_else(|| anyhow::anyhow!("a forward without queries"))?;
        Ok(logits.to_dtype(layers::at_least_f32(self.dtype))?)
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
    /// through pass 2 against every cached key. No mask inside a step (the reference's
    /// parallel decoding: tokens drawn together see each other). Returns float32 logits
    /// `[b, n, vocab]`, or `None` when there are no queries (a prefill).
    pub fn step(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
    ) -> Result<Option<Tensor>> {
        self.step_with(cache, tokens, pos, false, true)
    }

    /// [`Arpg::step`] with a causal mask over the fed tokens, as in training: token `i` of
    /// the step sees the cache and the step's tokens `0..=i`. For feeding a class token and
    /// known tokens together, which training only ever saw in sequence (unmasked, the class
    /// token would attend to all of them and its key/value would change with the image).
    pub fn step_causal(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
    ) -> Result<Option<Tensor>> {
        self.step_with(cache, tokens, pos, true, true)
    }

    /// [`Arpg::step`] (or [`Arpg::step_causal`]) with the logits left in the compute dtype
    /// (bf16 logits are a quarter of the memory of f32 ones at the last, largest step, and
    /// widening them later is exact).
    pub fn step_native_logits(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
        causal: bool,
    ) -> Result<Option<Tensor>> {
        self.step_with(cache, tokens, pos, causal, false)
    }

    fn step_with(
        &self,
        cache: &mut KvCache,
        tokens: &Tensor,
        pos: Positions,
        causal: bool,
        f32_logits: bool,
    ) -> Result<Option<Tensor>> {
        let m = tokens.dim(1)?;
        if cache.len() + m > cache.capacity() {
            bail!(
                "KV cache overflow: {} + {m} tokens > capacity {}",
                cache.len(),
                cache.capacity()
            );
        }
        // Query i of the step sees the cache and the step's tokens 0..=i.
        let mask = (causal && m > 1).then(|| CausalMask::new(m, cache.len() + m));
        let logits = match (&self.fused, mask) {
            (Some(w), None) => self.passes_fused(w, tokens, pos, cache)?,
            _ => self.passes(
                tokens,
                pos,
                (mask, None),
                Some(cache),
                &mut Mode::inference(),
            )?,
        };
        cache.advance(m);
        Ok(match logits {
            Some(l) if f32_logits => Some(l.to_dtype(layers::at_least_f32(self.dtype))?),
            l => l,
        })
    }
}

/// The fused decoding step against the generic one on a small random model with heads of 64
/// (4 layers, dim 128, 3 sequences): the logits of a class-token prefill and steps feeding 5,
/// 3 and 7 tokens with 2, 5, 20 and 1 queries, max relative difference over all. `None` where
/// the fused step does not apply on `device` in `dtype`, unless `force` (its CPU versions).
pub fn fused_step_rel_diff(device: &Device, dtype: DType, force: bool) -> Result<Option<f64>> {
    let cfg: ArpgConfig = serde_json::from_value(serde_json::json!({
        "dim": 128, "n_layer": 4, "n_head": 2, "vocab_size": 256, "num_classes": 10,
        "block_size": 64,
    }))?;
    let build = || {
        Arpg::new(
            &cfg,
            crate::checkpoint::random_var_builder_dense(7, dtype, device),
        )
    };
    let plain = build()?;
    let mut fused = build()?;
    if !fused.fuse_for_decoding(force)? {
        return Ok(None);
    }
    let (b, feeds, queries) = (3usize, [1usize, 5, 3, 7], [2usize, 5, 20, 1]);
    let mut caches = [plain.new_cache(b, 16)?, fused.new_cache(b, 16)?];
    // Distinct cells in a scrambled order; the class token first.
    let cells: Vec<u32> = (0..cfg.block_size as u32)
        .map(|i| (i * 37 + 11) % 64)
        .collect();
    let (mut fed, mut asked, mut worst) = (0usize, 0usize, 0f64);
    for (&m, &n) in feeds.iter().zip(&queries) {
        let (mut ids, mut rows) = (Vec::new(), Vec::new());
        for s in 0..b {
            for j in 0..m {
                let (id, row) = match fed + j {
                    0 => ((cfg.vocab_size + 1 + s) as u32, 0),
                    t => (((t * 31 + s * 7) % cfg.vocab_size) as u32, 1 + cells[t - 1]),
                };
                ids.push(id);
                rows.push(row);
            }
        }
        let q: Vec<u32> = (0..b)
            .flat_map(|_| (0..n).map(|j| 1 + cells[(asked + j) % cells.len()]))
            .collect();
        let ids = Tensor::from_vec(ids, (b, m), device)?;
        let keys = Tensor::from_vec(rows, (b, m), device)?;
        let qrows = Tensor::from_vec(q, (b, n), device)?;
        let mut logits = Vec::new();
        for (model, cache) in [&plain, &fused].into_iter().zip(caches.iter_mut()) {
            let pos = Positions {
                keys: &keys,
                queries: &qrows,
                control: None,
            };
            logits.push(model.step(cache, &ids, pos)?.expect("queries were given"));
        }
        worst = worst.max(crate::kernels::rel_diff(&logits[1], &logits[0])?);
        fed += m;
        asked += n;
    }
    Ok(Some(worst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_decoding_step_gives_the_generic_steps_logits() {
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            let rel = fused_step_rel_diff(&Device::Cpu, dt, true)
                .unwrap()
                .unwrap();
            assert!(rel < tol, "{dt:?}: {rel}");
        }
        // Off CUDA the fused step is opt-in.
        assert!(fused_step_rel_diff(&Device::Cpu, DType::BF16, false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_sampler_draws_the_same_greedy_tokens_through_the_fused_step() {
        use crate::sampler::{sample, SampleConfig, TokenFilter};
        let cfg: ArpgConfig = serde_json::from_value(serde_json::json!({
            "dim": 128, "n_layer": 2, "n_head": 2, "vocab_size": 64, "num_classes": 4,
            "block_size": 16,
        }))
        .unwrap();
        let build = || {
            let vb = crate::checkpoint::random_var_builder_dense(3, DType::F32, &Device::Cpu);
            Arpg::new(&cfg, vb).unwrap()
        };
        let (plain, mut fused) = (build(), build());
        assert!(fused.fuse_for_decoding(true).unwrap() && fused.is_fused());
        let sc = SampleConfig {
            steps: 5,
            cfg: 3.0,
            filter: TokenFilter {
                temperature: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let orders: Vec<Vec<usize>> = (0..3)
            .map(|s| (0..16).map(|i| (i * 5 + s) % 16).collect())
            .collect();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let a = sample(&plain, &[0, 1, 3], &orders, &sc, &mut rng.clone()).unwrap();
        let b = sample(&fused, &[0, 1, 3], &orders, &sc, &mut rng).unwrap();
        assert_eq!(a, b);
    }

    /// A freshly initialised digits-sized model, its (zero-initialised) head randomised so
    /// that logits show the hidden state.
    fn random_model(abs_pos_embed: bool) -> Arpg {
        let cfg = ArpgConfig {
            abs_pos_embed,
            ..crate::zoo::digits_config()
        };
        let dev = Device::Cpu;
        let tr = crate::train::Trainer::new(&cfg, &Default::default(), DType::F32, &dev).unwrap();
        for (name, v) in tr.parameters() {
            if name == "head.weight" {
                v.set(&Tensor::randn(0f32, 0.5, v.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        tr.model().unwrap()
    }

    /// Logits of the first decoding step (only the class token known) for queries at
    /// raster cells 0 (a corner), 27 and 36 (the centre) of a random digits-sized model.
    fn first_step_logits(abs_pos_embed: bool) -> Vec<Vec<f32>> {
        let model = random_model(abs_pos_embed);
        let cfg = model.config().clone();
        let dev = Device::Cpu;
        let mut cache = model.new_cache(1, 65).unwrap();
        let ids = Tensor::new(&[[cfg.class_token(4)]], &dev).unwrap();
        let keys = Tensor::new(&[[0u32]], &dev).unwrap();
        let queries = Tensor::new(&[[1u32, 28, 37]], &dev).unwrap();
        let pos = Positions {
            keys: &keys,
            queries: &queries,
            control: None,
        };
        model
            .step(&mut cache, &ids, pos)
            .unwrap()
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()[0]
            .clone()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn only_the_absolute_position_embedding_tells_the_first_query_where_it_is() {
        // RoPE alone: one key to attend to, so every cell gets the same prediction.
        let l = first_step_logits(false);
        assert!(max_diff(&l[0], &l[1]) < 1e-6 && max_diff(&l[0], &l[2]) < 1e-6);
        let l = first_step_logits(true);
        assert!(max_diff(&l[0], &l[1]) > 1e-4, "{l:?}");
        assert!(max_diff(&l[1], &l[2]) > 1e-4, "{l:?}");
    }

    #[test]
    fn a_larger_grid_reads_the_training_grid_centred_and_clamped() {
        let cfg = ArpgConfig {
            abs_pos_embed: true,
            ..crate::zoo::digits_config()
        };
        let m = PosEmbed::map(&cfg, (8, 24), &Device::Cpu)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(m.len(), 1 + 8 * 24);
        assert_eq!(m[0], 0);
        // Row 2, columns 0, 8, 15, 23 of the 8x24 grid: clamped left, the digit's own
        // columns 0 and 7, clamped right.
        let at = |i: usize, j: usize| m[1 + i * 24 + j];
        assert_eq!(at(2, 0), 1 + 2 * 8);
        assert_eq!(at(2, 8), 1 + 2 * 8);
        assert_eq!(at(2, 15), 1 + 2 * 8 + 7);
        assert_eq!(at(2, 23), 1 + 2 * 8 + 7);
        let same = PosEmbed::map(&cfg, (8, 8), &Device::Cpu)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(same, (0..65).collect::<Vec<u32>>());
    }

    #[test]
    fn a_causal_prefill_sees_what_the_training_forward_sees() {
        let model = random_model(true);
        let cfg = model.config().clone();
        let dev = Device::Cpu;
        // Class 4, then 11 tokens in a random order; the query after the first 10 predicts
        // the 11th.
        let cells = [5u32, 17, 40, 2, 33, 60, 12, 27, 8, 50, 45];
        let mut toks = vec![cfg.class_token(4)];
        toks.extend(cells[..10].iter().map(|&c| (c * 7) % 17));
        let mut keys = vec![0u32];
        keys.extend(cells[..10].iter().map(|&c| c + 1));
        let queries: Vec<u32> = cells.iter().map(|&c| c + 1).collect();
        let t = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, v.len()), &dev).unwrap();
        let (toks, keys, queries) = (t(&toks), t(&keys), t(&queries));
        let train = model
            .forward(
                &toks,
                Positions {
                    keys: &keys,
                    queries: &queries,
                    control: None,
                },
                &mut Mode::inference(),
            )
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()[0][10]
            .clone();
        let last = queries.narrow(1, 10, 1).unwrap();
        let prefill = |causal: bool| {
            let mut cache = model.new_cache(1, 65).unwrap();
            let pos = Positions {
                keys: &keys.narrow(1, 0, 11).unwrap(),
                queries: &last,
                control: None,
            };
            let ids = toks.narrow(1, 0, 11).unwrap();
            let out = if causal {
                model.step_causal(&mut cache, &ids, pos)
            } else {
                model.step(&mut cache, &ids, pos)
            };
            out.unwrap().unwrap().to_vec3::<f32>().unwrap()[0][0].clone()
        };
        let (causal, unmasked) = (prefill(true), prefill(false));
        assert!(max_diff(&causal, &train) < 1e-4, "{causal:?} vs {train:?}");
        // Unmasked, the class token and each known token also see the tokens after them.
        assert!(max_diff(&unmasked, &train) > 1e-3, "{unmasked:?}");
    }
    #[test]
    fn the_shipped_digits_model_knows_a_corner_from_the_centre() {
        // Cell 0 is blank (level 0) in every training digit, cell 27 in 14% of them (61% of the
        // zeros, 2% of the ones). The first prediction (only the class known) must
        // tell them apart, for every class.
        let dev = Device::Cpu;
        let model = crate::zoo::ModelSpec {
            model: Some(crate::zoo::DIGITS.into()),
            ..Default::default()
        }
        .load(DType::F32, &dev)
        .unwrap();
        let cfg = model.config().clone();
        for c in 0..cfg.num_classes {
            let mut cache = model.new_cache(1, 65).unwrap();
            let ids = Tensor::new(&[[cfg.class_token(c)]], &dev).unwrap();
            let keys = Tensor::new(&[[0u32]], &dev).unwrap();
            let queries = Tensor::new(&[[1u32, 28]], &dev).unwrap();
            let pos = Positions {
                keys: &keys,
                queries: &queries,
                control: None,
            };
            let logits = model.step(&mut cache, &ids, pos).unwrap().unwrap();
            let p = candle_nn::ops::softmax_last_dim(&logits)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            let (corner, centre) = (p[0][0][0], p[0][1][0]);
            assert!(
                corner > 0.95 && centre < corner - 0.3,
                "class {c}: P(blank) {corner} at the corner, {centre} at the centre"
            );
        }
    }
}
