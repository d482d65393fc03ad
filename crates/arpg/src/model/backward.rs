//! The hand-written training step: the teacher-forced forward keeping only what the backward
//! reads, then every gradient by explicit GEMMs and the kernels' own backward ops, with no
//! autograd graph. Merged q|k|v and w1|w3 GEMMs each way. Checked against candle's autograd
//! through [`Arpg::forward`] (tests here; `arpg check-parity` on the GPU).

use super::layers::{causal_mask, CausalMask, RmsNorm};
use super::{Arpg, Positions};
use crate::kernels::dropout::{Dropout, Site};
use crate::kernels::{attn_softmax, cross_entropy, decode, embedding, heads, residual_norm};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, D};
use std::collections::{HashMap, HashSet};

/// One micro-batch: the mean cross entropy (f32 scalar, not read back) and the gradient of
/// `loss * loss_scale` for every parameter, by its state-dict name, in the compute dtype
/// (none with a [`GradSink`]: each went there).
pub struct LossAndGrads {
    pub loss: Tensor,
    pub grads: HashMap<String, Tensor>,
}

/// `[rows, in] x [out, in]^T`.
fn mm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// A weight's gradient `dy^T x`: `[out, in]` from `dy [rows, out]`, `x [rows, in]`.
fn wgrad(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(dy.t()?.matmul(x)?)
}

fn rows(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    Ok(x.reshape(((), d))?)
}

fn silu_mul(uz: &Tensor) -> Result<Tensor> {
    if decode::applies(uz.device(), uz.dtype()) {
        decode::silu_mul(uz)
    } else {
        decode::silu_mul_slow(uz)
    }
}

/// What one attention's backward reads: rotated queries and keys, values `[b, h, t, hd]`
/// and the probabilities.
struct Attn {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
}

/// Scaled dot-product attention under `mask`, keeping its inputs and probabilities.
fn attend(q: Tensor, k: Tensor, v: Tensor, mask: CausalMask) -> Result<(Tensor, Attn)> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let p = attn_softmax::probs(&q.matmul(&k.t()?)?, scale, Some(mask))?;
    let a = heads::merge(&p.matmul(&v)?, None)?;
    Ok((a, Attn { q, k, v, p }))
}

/// `da [b, h, t, hd]` back to `(dq, dk, dv)`.
fn attend_backward(s: &Attn, da: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let scale = 1.0 / (s.q.dim(D::Minus1)? as f64).sqrt();
    let dp = da.matmul(&s.v.t()?)?;
    let dv = s.p.t()?.matmul(da)?;
    let ds = attn_softmax::probs_backward(&s.p, &dp, scale)?;
    Ok((ds.matmul(&s.k)?, ds.t()?.matmul(&s.q)?, dv))
}

/// A block's activations: its input and the norm of it, the attention's, what the FFN read
/// and produced, and the dropout masks.
struct Saved {
    x: Tensor,
    xn: Tensor,
    attn: Attn,
    a: Tensor,
    m1: Option<Site>,
    x1: Tensor,
    hn: Tensor,
    /// The merged w1|w3 weight (the backward's GEMM reads it again).
    w13: Tensor,
    uz: Tensor,
    h: Tensor,
    m2: Option<Site>,
}

/// The RoPE angles of a pass (packed `[2, b, t, hd / 2]`) and the head layout.
struct Angles {
    cs: Tensor,
    n_head: usize,
    hd: usize,
}

impl Angles {
    /// Columns `col..` of `x [b, t, _]` as rotated heads `[b, h, t, hd]`.
    fn rotate(&self, x: &Tensor, col: usize) -> Result<Tensor> {
        heads::split(x, col, self.n_head, self.hd, Some(&self.cs))
    }
    /// The same without the rotation (values).
    fn split(&self, x: &Tensor, col: usize) -> Result<Tensor> {
        heads::split(x, col, self.n_head, self.hd, None)
    }
    /// The gradient of [`Self::rotate`]'s input, `[b, t, h*hd]`.
    fn unrotate(&self, g: &Tensor) -> Result<Tensor> {
        heads::merge(g, Some(&self.cs))
    }
}

/// Where [`Arpg::loss_and_grads_with`] hands each parameter's gradient (state-dict name,
/// compute dtype) the moment it is final, after the weight's last use: every parameter once,
/// in the order the backward finishes them (the data-parallel step all-reduces buckets of
/// them while the backward goes on).
pub type GradSink<'a> = dyn FnMut(&str, Tensor) -> Result<()> + 'a;

/// Gradients by parameter name, summed where a weight is used twice; with a sink, those
/// added since the last [`Grads::ready`] go there at that call (the layers' boundaries).
#[derive(Default)]
struct Grads<'s, 'f> {
    map: HashMap<String, Tensor>,
    /// Names added since the last `ready`, in the order they came.
    fresh: Vec<String>,
    /// Names already handed to the sink: a later `add` of one would be lost.
    sent: HashSet<String>,
    sink: Option<&'s mut GradSink<'f>>,
}

impl Grads<'_, '_> {
    fn add(&mut self, name: String, g: Tensor) -> Result<()> {
        ensure!(
            !self.sent.contains(&name),
            "the gradient of {name} grew after it was reported final"
        );
        let g = match self.map.remove(&name) {
            Some(prev) => (prev + g)?,
            None => {
                self.fresh.push(name.clone());
                g
            }
        };
        self.map.insert(name, g);
        Ok(())
    }

    /// Everything added since the last call is final (its weights are used no more): to the
    /// sink, if there is one.
    fn ready(&mut self) -> Result<()> {
        let Grads {
            map,
            fresh,
            sent,
            sink,
        } = self;
        let Some(sink) = sink.as_mut() else {
            fresh.clear();
            return Ok(());
        };
        for name in fresh.drain(..) {
            let g = map.remove(&name).context("a reported gradient")?;
            sink(&name, g)?;
            sent.insert(name);
        }
        Ok(())
    }
}

/// A residual stream and its norm (what the next layer reads).
type Normed = (Tensor, Tensor);

/// A residual stream's gradient, and the same after the dropout of the layer output that
/// joined the stream there (`total` again where none did).
struct Flow {
    total: Tensor,
    dropped: Tensor,
}

/// One norm's backward from `g`, the gradient of its output: its input's gradient plus the
/// residual's `res` where the input also flows on, that after the dropout at `site`, and the
/// weight's gradient.
fn norm_backward(
    n: &RmsNorm,
    x: &Tensor,
    g: &Tensor,
    res: Option<&Tensor>,
    site: Option<Site>,
    name: String,
    grads: &mut Grads,
) -> Result<Flow> {
    let r = residual_norm::backward(x, &n.weight, n.eps, g, res, site)?;
    grads.add(name, r.weight)?;
    Ok(Flow {
        total: r.total,
        dropped: r.dropped,
    })
}

/// The residual add after a layer (`x + dropout(y)`, `x` absent: `dropout(y)`) and the
/// norm the next layer reads: `(stream, normed)`.
fn add_norm(
    x: Option<&Tensor>,
    y: &Tensor,
    site: Option<Site>,
    next: &RmsNorm,
) -> Result<(Tensor, Tensor)> {
    let a = residual_norm::forward(x, y, site, &next.weight, next.eps)?;
    Ok((a.s, a.n))
}

impl Arpg {
    /// The training loss of a teacher-forced batch and the gradients of `loss * loss_scale`
    /// (see [`Arpg::forward`] for `tokens` and `pos`; `targets [b * L]`), by the hand-written
    /// backward. Dropout sites are numbered in the order the autograd forward applies them
    /// (token embeddings, then each block's attention and FFN outputs), so both paths drop
    /// the same elements for the same [`Dropout`]; the backward draws each mask again from
    /// its seed. Class-conditional models only (no control encoder).
    pub fn loss_and_grads(
        &self,
        tokens: &Tensor,
        pos: Positions,
        targets: &Tensor,
        loss_scale: f64,
        drop: Option<Dropout>,
    ) -> Result<LossAndGrads> {
        self.loss_and_grads_with(tokens, pos, targets, loss_scale, drop, None)
    }

    /// [`Arpg::loss_and_grads`], handing each gradient to `sink` (when given) as soon as it
    /// is final instead of returning it.
    pub fn loss_and_grads_with(
        &self,
        tokens: &Tensor,
        pos: Positions,
        targets: &Tensor,
        loss_scale: f64,
        drop: Option<Dropout>,
        sink: Option<&mut GradSink>,
    ) -> Result<LossAndGrads> {
        ensure!(
            self.control.is_none() && pos.control.is_none(),
            "the hand-written training step has no control encoder: train it with autograd"
        );
        let (cfg, nh) = (&self.cfg, self.cfg.n_head);
        let (b, l) = tokens.dims2()?;
        let d = cfg.dim;
        let mask = causal_mask(l);
        let dt = self.dtype;
        let mut sites = 0usize;
        let mut draw = || -> Option<Site> {
            let d = drop.filter(|d| d.p > 0.0)?;
            sites += 1;
            Some(d.site(sites - 1))
        };
        let angles = |rows: &Tensor| -> Result<Angles> {
            Ok(Angles {
                cs: self.rope.gather_packed(rows)?,
                n_head: nh,
                hd: cfg.head_dim(),
            })
        };
        let (ka, qa) = (angles(pos.keys)?, angles(pos.queries)?);

        // Forward, pass 1: the tokens through the causal self-attention blocks.
        let m0 = draw();
        let first = self
            .self_dec
            .first()
            .map_or(&self.kv_norm, |b| &b.attn_norm);
        let x = add_norm(None, &self.embed(tokens, pos.keys)?, m0, first)?;
        let (saved, qkv_w, (xkv, xkn)) = self.self_forward(x, &ka, mask, &mut draw)?;
        // The shared keys and values.
        let kv_w = Tensor::cat(&[&self.to_k.weight, &self.to_v.weight], 0)?;
        let kv = mm(&rows(&xkn)?, &kv_w)?.reshape((b, l, 2 * d))?;
        let keys = ka.rotate(&kv, 0)?;
        let values = ka.split(&kv, d)?;

        // Pass 2: mask-token queries through the cross-attention blocks.
        let q = self.mask_queries(pos.queries)?;
        let first = self.cross_dec.first().map_or(&self.norm, |b| &b.attn_norm);
        let mut q = (q.clone(), first.forward_train(&q)?);
        let mut csaved = Vec::with_capacity(self.cross_dec.len());
        for (i, blk) in self.cross_dec.iter().enumerate() {
            let qh = qa.rotate(&mm(&rows(&q.1)?, &blk.to_q.weight)?.reshape((b, l, d))?, 0)?;
            let (a, attn) = attend(qh, keys.clone(), values.clone(), mask)?;
            let next = self
                .cross_dec
                .get(i + 1)
                .map_or(&self.norm, |b| &b.attn_norm);
            let (s, out) = self.ffn_forward(
                blk.proj.weight.clone(),
                &blk.ffn_norm,
                &blk.ffn,
                next,
                q,
                a,
                attn,
                &mut draw,
            )?;
            q = out;
            csaved.push(s);
        }
        let (qf, hf) = q;
        let hf = rows(&hf)?;
        let logits = mm(&hf, &self.head.weight)?;

        // Backward: the cross entropy's gradient is softmax - one-hot, over the mean.
        let n = logits.dim(0)?;
        let (losses, dlogits) = match dt {
            DType::F32 | DType::BF16 => {
                cross_entropy::fused(&logits, targets, loss_scale / n as f64)?
            }
            _ => cross_entropy::slow(&logits, targets, loss_scale / n as f64)?,
        };
        let loss = losses.to_dtype(DType::F32)?.mean_all()?;
        let mut grads = Grads {
            sink,
            ..Grads::default()
        };
        grads.add("head.weight".into(), wgrad(&dlogits, &hf)?)?;
        let dhf = dlogits.matmul(&self.head.weight)?.reshape((b, l, d))?;
        let last = csaved.last().and_then(|s| s.m2);
        let dq = norm_backward(
            &self.norm,
            &qf,
            &dhf,
            None,
            last,
            "norm.weight".into(),
            &mut grads,
        )?;
        grads.ready()?;
        let (dq, dkeys, dvalues) = self.cross_backward(&csaved, dq, &qa, &mut grads)?;
        // The queries' gradient reaches the mask token's embedding (and positions).
        let dq0 = dq;
        let dkv = rows(&heads::merge_cat(
            &[(&dkeys, true), (&dvalues, false)],
            &ka.cs,
        )?)?;
        let dkv_w = wgrad(&dkv, &rows(&xkn)?)?;
        grads.add("layers.to_k.weight".into(), dkv_w.narrow(0, 0, d)?)?;
        grads.add("layers.to_v.weight".into(), dkv_w.narrow(0, d, d)?)?;
        let dxkn = dkv.matmul(&kv_w)?.reshape((b, l, d))?;
        let last = saved.last().and_then(|s| s.m2);
        let dx = norm_backward(
            &self.kv_norm,
            &xkv,
            &dxkn,
            None,
            last,
            "layers.norm.weight".into(),
            &mut grads,
        )?;
        grads.ready()?;
        let dx0 = self.self_backward(&saved, &qkv_w, dx, m0, &ka, &mut grads)?;
        self.embed_backward(tokens, pos.keys, &dx0, &dq0, pos.queries, &mut grads)?;
        grads.ready()?;
        Ok(LossAndGrads {
            loss,
            grads: grads.map,
        })
    }

    /// Pass 1's blocks from the (dropped-out) token embeddings and their norm `x`: what their
    /// backward reads, their merged q|k|v weights, and the last block's output and its norm
    /// by the keys' and values' norm.
    fn self_forward(
        &self,
        mut x: Normed,
        ka: &Angles,
        mask: CausalMask,
        draw: &mut dyn FnMut() -> Option<Site>,
    ) -> Result<(Vec<Saved>, Vec<Tensor>, Normed)> {
        let (b, l, d) = x.0.dims3()?;
        let mut saved = Vec::with_capacity(self.self_dec.len());
        let mut qkv_w = Vec::with_capacity(self.self_dec.len());
        for (i, blk) in self.self_dec.iter().enumerate() {
            let w = Tensor::cat(&[&blk.to_q.weight, &blk.to_k.weight, &blk.to_v.weight], 0)?;
            let qkv = mm(&rows(&x.1)?, &w)?.reshape((b, l, 3 * d))?;
            let q = ka.rotate(&qkv, 0)?;
            let k = ka.rotate(&qkv, d)?;
            let v = ka.split(&qkv, 2 * d)?;
            let (a, attn) = attend(q, k, v, mask)?;
            let next = self
                .self_dec
                .get(i + 1)
                .map_or(&self.kv_norm, |b| &b.attn_norm);
            let (s, out) = self.ffn_forward(
                blk.proj.weight.clone(),
                &blk.ffn_norm,
                &blk.ffn,
                next,
                x,
                a,
                attn,
                draw,
            )?;
            x = out;
            saved.push(s);
            qkv_w.push(w);
        }
        Ok((saved, qkv_w, x))
    }

    /// The cross-attention blocks' backward from the final queries' gradient `dq`: the
    /// gradient of the mask-token queries and the shared keys' and values' (summed over the
    /// blocks, in heads).
    fn cross_backward(
        &self,
        saved: &[Saved],
        mut dq: Flow,
        qa: &Angles,
        grads: &mut Grads,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, d) = dq.total.dims3()?;
        let (mut dkeys, mut dvalues): (Option<Tensor>, Option<Tensor>) = (None, None);
        for (i, (blk, s)) in self.cross_dec.iter().zip(saved).enumerate().rev() {
            let name = |p: &str| format!("layers.cross_dec.{i}.{p}");
            let (dx, da) = self.ffn_backward(
                &blk.proj.weight,
                &blk.ffn_norm,
                &blk.ffn,
                s,
                dq,
                &name,
                grads,
            )?;
            let (dqh, dk, dv) = attend_backward(&s.attn, &da)?;
            dkeys = Some(match dkeys {
                Some(acc) => (acc + dk)?,
                None => dk,
            });
            dvalues = Some(match dvalues {
                Some(acc) => (acc + dv)?,
                None => dv,
            });
            let dql = rows(&qa.unrotate(&dqh)?)?;
            grads.add(name("attn.to_q.weight"), wgrad(&dql, &rows(&s.xn)?)?)?;
            let dqn = dql.matmul(&blk.to_q.weight)?.reshape((b, l, d))?;
            // The block's input came through the previous block's FFN dropout (the first's:
            // the mask-token queries, none).
            let site = i.checked_sub(1).and_then(|p| saved[p].m2);
            let norm = &blk.attn_norm;
            dq = norm_backward(
                norm,
                &s.x,
                &dqn,
                Some(&dx),
                site,
                name("attn_norm.weight"),
                grads,
            )?;
            grads.ready()?;
        }
        let total = |t: Option<Tensor>| t.context("a model without cross-attention blocks");
        Ok((dq.total, total(dkeys)?, total(dvalues)?))
    }

    /// The self-attention blocks' backward from the last block output's gradient `dx`: the
    /// gradient of the token embeddings (before their dropout `m0`).
    fn self_backward(
        &self,
        saved: &[Saved],
        qkv_w: &[Tensor],
        mut dx: Flow,
        m0: Option<Site>,
        ka: &Angles,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (b, l, d) = dx.total.dims3()?;
        for (i, (blk, s)) in self.self_dec.iter().zip(saved).enumerate().rev() {
            let name = |p: &str| format!("layers.self_dec.{i}.{p}");
            let (dx1, da) = self.ffn_backward(
                &blk.proj.weight,
                &blk.ffn_norm,
                &blk.ffn,
                s,
                dx,
                &name,
                grads,
            )?;
            let (dqh, dk, dv) = attend_backward(&s.attn, &da)?;
            let dqkv = heads::merge_cat(&[(&dqh, true), (&dk, true), (&dv, false)], &ka.cs)?;
            let dqkv = rows(&dqkv)?;
            let dw = wgrad(&dqkv, &rows(&s.xn)?)?;
            for (j, p) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                grads.add(name(&format!("attn.{p}.weight")), dw.narrow(0, j * d, d)?)?;
            }
            let dxn = dqkv.matmul(&qkv_w[i])?.reshape((b, l, d))?;
            // The block's input came through the previous block's FFN dropout (the first's:
            // the embeddings' dropout).
            let site = match i {
                0 => m0,
                _ => saved[i - 1].m2,
            };
            let norm = &blk.attn_norm;
            dx = norm_backward(
                norm,
                &s.x,
                &dxn,
                Some(&dx1),
                site,
                name("attn_norm.weight"),
                grads,
            )?;
            grads.ready()?;
        }
        Ok(dx.dropped)
    }

    /// A block's tail after its attention output `a [b, t, d]` (`x`: the block's input and
    /// its norm): projection, dropout and residual with the FFN's norm, the SwiGLU FFN,
    /// dropout and residual with the `next` layer's norm. Returns what the backward reads
    /// and the block's output with its norm.
    #[allow(clippy::too_many_arguments)]
    fn ffn_forward(
        &self,
        proj: Tensor,
        ffn_norm: &RmsNorm,
        ffn: &super::layers::FeedForward,
        next: &RmsNorm,
        (x, xn): Normed,
        a: Tensor,
        attn: Attn,
        draw: &mut dyn FnMut() -> Option<Site>,
    ) -> Result<(Saved, Normed)> {
        let (b, l, d) = x.dims3()?;
        let o = mm(&rows(&a)?, &proj)?.reshape((b, l, d))?;
        let m1 = draw();
        let (x1, hn) = add_norm(Some(&x), &o, m1, ffn_norm)?;
        let w13 = Tensor::cat(&[&ffn.w1.weight, &ffn.w3.weight], 0)?;
        let uz = mm(&rows(&hn)?, &w13)?;
        let h = silu_mul(&uz)?;
        let f = mm(&h, &ffn.w2.weight)?.reshape((b, l, d))?;
        let m2 = draw();
        let out = add_norm(Some(&x1), &f, m2, next)?;
        let saved = Saved {
            x,
            xn,
            attn,
            a,
            m1,
            x1,
            hn,
            w13,
            uz,
            h,
            m2,
        };
        Ok((saved, out))
    }

    /// [`Self::ffn_forward`]'s backward from the block output's gradient `dy` (its `dropped`:
    /// through the FFN's dropout): the gradient of the block input through the residuals
    /// (the attention's part still to add) and of the attention output in heads,
    /// `[b, h, t, hd]`.
    #[allow(clippy::too_many_arguments)]
    fn ffn_backward(
        &self,
        proj: &Tensor,
        ffn_norm: &RmsNorm,
        ffn: &super::layers::FeedForward,
        s: &Saved,
        dy: Flow,
        name: &dyn Fn(&str) -> String,
        grads: &mut Grads,
    ) -> Result<(Tensor, Tensor)> {
        let (b, l, d) = s.x.dims3()?;
        let df = rows(&dy.dropped)?;
        grads.add(name("ffn.w2.weight"), wgrad(&df, &s.h)?)?;
        let dh = df.matmul(&ffn.w2.weight)?;
        let duz = decode::silu_mul_backward(&s.uz, &dh)?;
        let hid = dh.dim(1)?;
        let dw13 = wgrad(&duz, &rows(&s.hn)?)?;
        grads.add(name("ffn.w1.weight"), dw13.narrow(0, 0, hid)?)?;
        grads.add(name("ffn.w3.weight"), dw13.narrow(0, hid, hid)?)?;
        let dhn = duz.matmul(&s.w13)?.reshape((b, l, d))?;
        let name_w = name("ffn_norm.weight");
        let dx1 = norm_backward(ffn_norm, &s.x1, &dhn, Some(&dy.total), s.m1, name_w, grads)?;
        let dout = rows(&dx1.dropped)?;
        grads.add(name("attn.proj.weight"), wgrad(&dout, &rows(&s.a)?)?)?;
        let da = dout.matmul(proj)?.reshape((b, l, d))?;
        Ok((
            dx1.total,
            heads::split(&da, 0, self.cfg.n_head, self.cfg.head_dim(), None)?,
        ))
    }

    /// The embedding table's gradient from the tokens' (`dx0`) and the mask-token queries'
    /// (`dq0`), and the absolute position table's where the model has one.
    fn embed_backward(
        &self,
        tokens: &Tensor,
        keys: &Tensor,
        dx0: &Tensor,
        dq0: &Tensor,
        queries: &Tensor,
        grads: &mut Grads,
    ) -> Result<()> {
        let table = self.embeddings.embeddings();
        let ids = tokens.flatten_all()?;
        let mask_ids = Tensor::full(self.cfg.mask_token(), queries.elem_count(), table.device())?;
        let all_ids = Tensor::cat(&[&ids, &mask_ids], 0)?;
        let both = Tensor::cat(&[&rows(dx0)?, &rows(dq0)?], 0)?;
        let de = embedding::backward(&all_ids, &both, table.dim(0)?)?;
        grads.add("embeddings.weight".into(), de)?;
        if let Some(p) = &self.pos {
            let all_rows = Tensor::cat(&[&keys.flatten_all()?, &queries.flatten_all()?], 0)?;
            let idx = p.map.index_select(&all_rows, 0)?;
            let dp = embedding::backward(&idx, &both, p.table.dim(0)?)?;
            grads.add("pos_embeddings.weight".into(), dp)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_gradient_reported_final_cannot_grow() {
        let mut got = Vec::new();
        let mut sink = |name: &str, g: Tensor| -> Result<()> {
            got.push((name.to_string(), g.to_vec1::<f32>()?));
            Ok(())
        };
        let mut grads = Grads {
            sink: Some(&mut sink),
            ..Grads::default()
        };
        let t = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
        grads.add("a".into(), t.clone()).unwrap();
        grads.add("b".into(), t.clone()).unwrap();
        grads.add("a".into(), t.clone()).unwrap();
        grads.ready().unwrap();
        grads.ready().unwrap();
        let e = grads.add("a".into(), t).unwrap_err().to_string();
        assert!(e.contains("a grew after it was reported final"), "{e}");
        assert!(grads.map.is_empty());
        drop(grads);
        assert_eq!(
            got,
            [
                ("a".to_string(), vec![2.0; 2]),
                ("b".to_string(), vec![1.0; 2])
            ]
        );
    }
}
