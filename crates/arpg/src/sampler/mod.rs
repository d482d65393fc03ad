//! Randomized parallel decoding with a KV cache: the paper's sampling algorithm.
//!
//! [`decode`] is the whole loop: prefill the class token (and any known tokens), then at each
//! step predict a scheduled number of tokens at once, in a random order, each query carrying
//! the position of the token it predicts; mix conditional and unconditional logits (CFG),
//! filter and draw one token per query, and feed the drawn tokens back.

pub mod filter;
pub mod schedule;

pub use filter::TokenFilter;
pub use schedule::{token_counts, CfgSchedule, MaskSchedule};

use crate::model::{Arpg, Positions};
use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::Rng;

/// Sampling settings; defaults are the paper's (64 steps, arccos, CFG 4.0 linear).
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub steps: usize,
    /// 0 = unconditional (null class only), 1 = conditional only, else guided.
    pub cfg: f32,
    pub cfg_schedule: CfgSchedule,
    pub schedule: MaskSchedule,
    pub filter: TokenFilter,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            steps: 64,
            cfg: 4.0,
            cfg_schedule: CfgSchedule::Linear,
            schedule: MaskSchedule::Arccos,
            filter: TokenFilter::default(),
        }
    }
}

/// What one decoding call works on: a batch of sequences on the model's current grid.
pub struct Request<'a> {
    /// Class id of each sequence.
    pub classes: &'a [usize],
    /// Tokens already known, per sequence, as (raster position, token); all sequences of a
    /// batch must know the same number of tokens.
    pub known: &'a [Vec<(usize, u32)>],
    /// The generation order of the unknown positions, per sequence.
    pub orders: &'a [Vec<usize>],
}

/// Which halves of the classifier-free-guidance batch run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Halves {
    Cond,
    Uncond,
    Both,
}

/// Whether tokens are drawn on the device: on GPUs, unless top-k / top-p filtering is asked
/// for (those sort each row, done on the host). On the CPU the host path is the device path
/// and uses the seeded generator, so CPU runs repeat exactly.
fn on_device(dev: &candle_core::Device, f: &TokenFilter) -> bool {
    !dev.is_cpu() && f.top_k == 0 && f.top_p >= 1.0
}

/// One token per row by the Gumbel-max trick, `argmax(logits / T + G)`, which draws from
/// `softmax(logits / T)` without leaving the device; `T = 0` is argmax.
fn gumbel_max(logits: &Tensor, temperature: f32) -> Result<Tensor> {
    let scores = if temperature == 0.0 {
        logits.clone()
    } else {
        // Uniforms kept inside (0, 1): u = 1 would give an infinite Gumbel draw.
        let u = Tensor::rand(0f32, 1f32, logits.shape(), logits.device())?
            .clamp(1e-30f32, 1.0 - 6e-8)?;
        let g = u.log()?.neg()?.log()?.neg()?;
        ((logits / temperature.max(1e-5) as f64)? + g)?
    };
    Ok(scores
        .argmax(candle_core::D::Minus1)?
        .to_dtype(candle_core::DType::U32)?)
}

/// A random order of `positions`, e.g. of `0..256`.
pub fn random_order<R: Rng>(positions: &[usize], rng: &mut R) -> Vec<usize> {
    let mut o = positions.to_vec();
    o.shuffle(rng);
    o
}

/// Plain class-conditional sampling: every position unknown, one order per sequence.
pub fn sample<R: Rng>(
    model: &Arpg,
    classes: &[usize],
    orders: &[Vec<usize>],
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    let known = vec![vec![]; classes.len()];
    decode(
        model,
        &Request {
            classes,
            known: &known,
            orders,
        },
        cfg,
        rng,
    )
}

/// Decode every unknown position of each sequence. Returns tokens in raster order over the
/// model's grid; known tokens are returned unchanged.
pub fn decode<R: Rng>(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    let mc = model.config();
    let b = req.classes.len();
    let cells = model.rope().rows() - mc.cls_token_num;
    ensure!(b > 0, "empty batch");
    ensure!(
        req.known.len() == b && req.orders.len() == b,
        "one known set and one order per sequence"
    );
    cfg.filter.validate()?;
    if !cfg.cfg.is_finite() || cfg.cfg < 0.0 {
        bail!("--cfg {} must be >= 0", cfg.cfg);
    }
    for &c in req.classes {
        if c >= mc.num_classes {
            bail!(
                "class id {c} is out of range: the model has {} classes (0..={})",
                mc.num_classes,
                mc.num_classes - 1
            );
        }
    }
    let n_known = req.known[0].len();
    let n_unknown = cells - n_known;
    for (s, (known, order)) in req.known.iter().zip(req.orders).enumerate() {
        ensure!(
            known.len() == n_known,
            "every sequence of a batch must know the same number of tokens"
        );
        let mut seen = vec![false; cells];
        for &(p, t) in known {
            ensure!(
                p < cells && !seen[p],
                "known position {p} is out of range or repeated"
            );
            ensure!(
                (t as usize) < mc.vocab_size,
                "known token {t} is out of range (vocab {})",
                mc.vocab_size
            );
            seen[p] = true;
        }
        ensure!(
            order.len() == n_unknown,
            "sequence {s}: the order has {} positions, {n_unknown} are unknown",
            order.len()
        );
        for &p in order {
            ensure!(
                p < cells && !seen[p],
                "sequence {s}: order position {p} is out of range, known or repeated"
            );
            seen[p] = true;
        }
    }
    let counts = token_counts(n_unknown, cfg.steps, cfg.schedule)?;

    let halves = if cfg.cfg == 0.0 {
        Halves::Uncond
    } else if cfg.cfg == 1.0 {
        Halves::Cond
    } else {
        Halves::Both
    };
    let copies = if halves == Halves::Both { 2 } else { 1 };
    let rows = b * copies;
    let dev = model.device();

    // Step 0 feeds the class token (row 0 of the RoPE table) and every known token.
    let mut fed_ids: Vec<u32> = Vec::with_capacity(rows * (1 + n_known));
    let mut fed_pos: Vec<u32> = Vec::with_capacity(rows * (1 + n_known));
    for half in 0..copies {
        let uncond = halves == Halves::Uncond || half == 1;
        for s in 0..b {
            fed_ids.push(if uncond {
                mc.null_class_token()
            } else {
                mc.class_token(req.classes[s])
            });
            fed_pos.push(0);
            for &(p, t) in &req.known[s] {
                fed_ids.push(t);
                fed_pos.push((p + mc.cls_token_num) as u32);
            }
        }
    }
    let mut cache = model.new_cache(rows, 1 + cells)?;
    let mut out: Vec<Vec<u32>> = (0..b).map(|_| vec![u32::MAX; cells]).collect();
    for (s, known) in req.known.iter().enumerate() {
        for &(p, t) in known {
            out[s][p] = t;
        }
    }
    // Every query's RoPE row is known from the orders: one upload for the whole decode, so
    // the loop needs no host round trip on the device path.
    let q_rows: Vec<u32> = (0..copies)
        .flat_map(|_| {
            req.orders
                .iter()
                .flat_map(|o| o.iter().map(|&p| (p + mc.cls_token_num) as u32))
        })
        .collect();
    let q_rows = Tensor::from_vec(q_rows, (rows, n_unknown), dev)?;
    let mut ids = Tensor::from_vec(fed_ids, (rows, 1 + n_known), dev)?;
    let mut kpos = Tensor::from_vec(fed_pos, (rows, 1 + n_known), dev)?;
    let device_draw = on_device(dev, &cfg.filter);
    let mut drawn_on_device = Vec::new();

    let mut done = 0usize;
    for &n in &counts {
        let qpos = q_rows.narrow(1, done, n)?.contiguous()?;
        let positions = Positions {
            keys: &kpos,
            queries: &qpos,
        };
        // The first step feeds the class token and the known tokens together: in sequence,
        // as training saw them. Later steps feed the tokens drawn together, unmasked.
        let logits = if done == 0 {
            model.step_causal(&mut cache, &ids, positions)?
        } else {
            model.step(&mut cache, &ids, positions)?
        }
        .expect("queries were given");
        let decoded = done + n;
        let logits = match halves {
            Halves::Both => {
                let w = match cfg.cfg_schedule {
                    CfgSchedule::Constant => cfg.cfg as f64,
                    CfgSchedule::Linear => {
                        1.0 + (cfg.cfg as f64 - 1.0) * decoded as f64 / n_unknown as f64
                    }
                };
                let c = logits.narrow(0, 0, b)?;
                let u = logits.narrow(0, b, b)?;
                (&u + ((c - &u)? * w)?)?
            }
            _ => logits,
        };
        let picked = if device_draw {
            let t = gumbel_max(&logits, cfg.filter.temperature)?;
            drawn_on_device.push(t.clone());
            t
        } else {
            let mut host = logits.to_vec3::<f32>()?;
            let mut toks = Vec::with_capacity(b * n);
            for (s, row) in host.iter_mut().enumerate() {
                for (j, l) in row.iter_mut().enumerate() {
                    let tok = cfg.filter.sample(l, rng);
                    out[s][req.orders[s][done + j]] = tok;
                    toks.push(tok);
                }
            }
            Tensor::from_vec(toks, (b, n), dev)?
        };
        // The same drawn tokens are fed to both guidance halves.
        ids = if copies == 2 {
            Tensor::cat(&[&picked, &picked], 0)?
        } else {
            picked
        };
        kpos = qpos;
        done = decoded;
    }
    if device_draw {
        let all = Tensor::cat(&drawn_on_device, 1)?.to_vec2::<u32>()?;
        for (s, row) in all.iter().enumerate() {
            for (j, &tok) in row.iter().enumerate() {
                out[s][req.orders[s][j]] = tok;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gumbel_max_is_argmax_at_zero_temperature_and_samples_the_softmax_otherwise() {
        let dev = Device::Cpu;
        let l = Tensor::new(&[[[0.1f32, 2.0, -1.0], [3.0, 0.0, 0.0]]], &dev).unwrap();
        assert_eq!(
            gumbel_max(&l, 0.0).unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![1, 0]]
        );
        // 0.7 / 0.2 / 0.1 over many rows at once.
        let p = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let rows = Tensor::new(&p, &dev)
            .unwrap()
            .broadcast_as((1, 20000, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        let t = gumbel_max(&rows, 1.0)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
            .concat();
        let f0 = t.iter().filter(|&&x| x == 0).count() as f64 / t.len() as f64;
        let f2 = t.iter().filter(|&&x| x == 2).count() as f64 / t.len() as f64;
        assert!(
            (f0 - 0.7).abs() < 0.02 && (f2 - 0.1).abs() < 0.02,
            "{f0} {f2}"
        );
    }
}
