//! Randomized parallel decoding with a KV cache: the paper's sampling algorithm.
//!
//! [`decode`] is the whole loop: prefill the class token (and any known tokens), then at each
//! step predict a scheduled number of tokens at once, in a random order, each query carrying
//! the position of the token it predicts; mix conditional and unconditional logits (CFG),
//! filter and draw one token per query, and feed the drawn tokens back.

pub mod draw;
pub mod filter;
pub mod graph;
pub mod schedule;

pub use draw::Draw;
pub use filter::TokenFilter;
pub use graph::DecodeGraphs;
pub use schedule::{token_counts, CfgSchedule, MaskSchedule};

use crate::model::{Arpg, KvCache, Positions};
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// [`sample`] with CUDA graphs: the first batch of a shape runs eagerly and is captured, later
/// ones replay the capture (see [`DecodeGraphs`]).
pub fn sample_with<R: Rng>(
    model: &Arpg,
    classes: &[usize],
    orders: &[Vec<usize>],
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: &mut DecodeGraphs,
) -> Result<Vec<Vec<u32>>> {
    let known = vec![vec![]; classes.len()];
    let req = Request {
        classes,
        known: &known,
        orders,
    };
    decode_with(model, &req, cfg, rng, Some(graphs))
}

/// Decode every unknown position of each sequence. Returns tokens in raster order over the
/// model's grid; known tokens are returned unchanged.
pub fn decode<R: Rng>(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    decode_with(model, req, cfg, rng, None)
}

/// [`decode`], replaying CUDA graphs from `graphs` where the device path allows.
pub fn decode_with<R: Rng>(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
) -> Result<Vec<Vec<u32>>> {
    let device_draw = on_device(model.device(), &cfg.filter);
    decode_impl(model, req, cfg, rng, graphs, device_draw)
}

/// One generator per group of sequences, and a step callback, for [`decode_rows`].
pub struct Rows<'a> {
    /// The groups' generators: sequence `s` draws every token from `rngs[of[s]]`.
    pub rngs: &'a mut [rand_chacha::ChaCha8Rng],
    /// The group of each sequence.
    pub of: &'a [usize],
    /// Called after each step with (steps done, steps in all).
    pub on_step: &'a mut dyn FnMut(usize, usize),
}

/// [`decode`] with one generator per group of sequences (e.g. one per server request batched
/// together): a group's tokens are drawn from its own generator, in the order a decode of that
/// group alone draws them, so they do not depend on what else is in the batch. Always draws
/// on the host (the device draw's noise depends on the row index in the batch), so on the CPU
/// a group gets the tokens that [`decode`] gives it alone with the same generator.
pub fn decode_rows(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rows: &mut Rows,
) -> Result<Vec<Vec<u32>>> {
    ensure!(
        rows.of.len() == req.classes.len() && rows.of.iter().all(|&g| g < rows.rngs.len()),
        "one generator group per sequence"
    );
    let mut unused = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    decode_impl_rows(model, req, cfg, &mut unused, None, false, Some(rows))
}

/// The loop on either path: `device_draw` draws on the device (the GPU path, also runnable on
/// the CPU for tests), else logits come back to the host every step.
fn decode_impl<R: Rng>(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
    device_draw: bool,
) -> Result<Vec<Vec<u32>>> {
    decode_impl_rows(model, req, cfg, rng, graphs, device_draw, None)
}

/// [`decode_impl`]; with `rows`, the host path draws each sequence's tokens from its group's
/// generator instead of `rng` and reports every step.
fn decode_impl_rows<R: Rng>(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
    device_draw: bool,
    mut rows_rng: Option<&mut Rows>,
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
    let guidance = |decoded: usize| match halves {
        Halves::Both => Some(match cfg.cfg_schedule {
            CfgSchedule::Constant => cfg.cfg as f64,
            CfgSchedule::Linear => 1.0 + (cfg.cfg as f64 - 1.0) * decoded as f64 / n_unknown as f64,
        }),
        _ => None,
    };

    if device_draw {
        ensure!(
            cfg.filter.top_k == 0 && cfg.filter.top_p >= 1.0,
            "top-k / top-p are drawn on the host"
        );
        let mut decoded = 0;
        let draws = counts
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                decoded += n;
                Draw {
                    guidance: guidance(decoded).map(|w| w as f32),
                    temperature: cfg.filter.temperature,
                    salt: s as u32,
                }
            })
            .collect();
        let plan = Plan {
            model_id: model.id(),
            b,
            copies,
            n_known,
            n_unknown,
            counts,
            draws,
        };
        let inputs = Inputs {
            first_ids: fed_ids,
            first_pos: fed_pos,
            q_rows,
            seed: rng.random::<i64>(),
        };
        let drawn = match graphs {
            Some(g) => g.run(model, &plan, &inputs)?,
            None => {
                let mut buf = Buffers::new(model, &plan)?;
                buf.load(&inputs)?;
                device_loop(model, &plan, &mut buf)?;
                buf.drawn.to_vec2::<u32>()?
            }
        };
        for (s, row) in drawn.iter().enumerate() {
            for (j, &tok) in row.iter().enumerate() {
                out[s][req.orders[s][j]] = tok;
            }
        }
        return Ok(out);
    }

    // The host path: logits come back every step and each token is drawn with `rng`.
    let mut cache = model.new_cache(rows, cache_capacity(n_known, &counts))?;
    let q_rows = Tensor::from_vec(q_rows, (rows, n_unknown), dev)?;
    let mut ids = Tensor::from_vec(fed_ids, (rows, 1 + n_known), dev)?;
    let mut kpos = Tensor::from_vec(fed_pos, (rows, 1 + n_known), dev)?;
    let mut done = 0usize;
    for (step, &n) in counts.iter().enumerate() {
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
        let logits = match guidance(decoded) {
            Some(w) => {
                let c = logits.narrow(0, 0, b)?;
                let u = logits.narrow(0, b, b)?;
                (&u + ((c - &u)? * w)?)?
            }
            None => logits,
        };
        let mut host = logits.to_vec3::<f32>()?;
        let mut toks = Vec::with_capacity(b * n);
        for (s, row) in host.iter_mut().enumerate() {
            for (j, l) in row.iter_mut().enumerate() {
                let tok = match rows_rng.as_deref_mut() {
                    Some(g) => cfg.filter.sample(l, &mut g.rngs[g.of[s]]),
                    None => cfg.filter.sample(l, rng),
                };
                out[s][req.orders[s][done + j]] = tok;
                toks.push(tok);
            }
        }
        let picked = Tensor::from_vec(toks, (b, n), dev)?;
        // The same drawn tokens are fed to both guidance halves.
        ids = if copies == 2 {
            Tensor::cat(&[&picked, &picked], 0)?
        } else {
            picked
        };
        kpos = qpos;
        done = decoded;
        if let Some(g) = rows_rng.as_deref_mut() {
            (g.on_step)(step + 1, counts.len());
        }
    }
    Ok(out)
}

/// Content tokens a decode feeds: the class token, the known tokens, and every drawn token but
/// the last step's (never fed back, so never cached: the reference's cache is that long too).
fn cache_capacity(n_known: usize, counts: &[usize]) -> usize {
    1 + n_known + counts.iter().sum::<usize>() - counts.last().copied().unwrap_or(0)
}

/// A device decode's shapes and settings: everything a captured CUDA graph bakes in.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    model_id: u64,
    b: usize,
    copies: usize,
    n_known: usize,
    n_unknown: usize,
    counts: Vec<usize>,
    draws: Vec<Draw>,
}

impl Plan {
    fn rows(&self) -> usize {
        self.b * self.copies
    }
}

/// What varies between decodes of one plan, uploaded before the loop runs.
struct Inputs {
    first_ids: Vec<u32>,
    first_pos: Vec<u32>,
    q_rows: Vec<u32>,
    seed: i64,
}

/// The device memory the loop reads and writes, at fixed addresses so that a captured graph
/// can replay it: inputs, the KV cache, and the drawn tokens `[b, n_unknown]` in order.
struct Buffers {
    cache: KvCache,
    first_ids: Tensor,
    first_pos: Tensor,
    q_rows: Tensor,
    seed: Tensor,
    drawn: Tensor,
}

impl Buffers {
    fn new(model: &Arpg, plan: &Plan) -> Result<Self> {
        let dev = model.device();
        let rows = plan.rows();
        let first = (rows, 1 + plan.n_known);
        Ok(Self {
            cache: model.new_cache(rows, cache_capacity(plan.n_known, &plan.counts))?,
            first_ids: Tensor::zeros(first, DType::U32, dev)?,
            first_pos: Tensor::zeros(first, DType::U32, dev)?,
            q_rows: Tensor::zeros((rows, plan.n_unknown), DType::U32, dev)?,
            seed: Tensor::zeros(1, DType::I64, dev)?,
            drawn: Tensor::zeros((plan.b, plan.n_unknown), DType::U32, dev)?,
        })
    }

    /// Copy a decode's inputs into the buffers, in place.
    fn load(&mut self, x: &Inputs) -> Result<()> {
        let dev = self.seed.device().clone();
        let put = |dst: &Tensor, v: &[u32]| -> Result<()> {
            let src = Tensor::from_slice(v, dst.shape(), &dev)?;
            Ok(dst.slice_set(&src, 0, 0)?)
        };
        put(&self.first_ids, &x.first_ids)?;
        put(&self.first_pos, &x.first_pos)?;
        put(&self.q_rows, &x.q_rows)?;
        self.seed
            .slice_set(&Tensor::from_slice(&[x.seed], 1, &dev)?, 0, 0)?;
        Ok(())
    }
}

/// The decoding loop on the device: no host round trip, every tensor it keeps lives in `buf`,
/// so the same call runs eagerly or under CUDA graph capture.
fn device_loop(model: &Arpg, plan: &Plan, buf: &mut Buffers) -> Result<()> {
    buf.cache.reset();
    let mut ids = buf.first_ids.clone();
    let mut kpos = buf.first_pos.clone();
    let mut done = 0;
    for (&n, &d) in plan.counts.iter().zip(&plan.draws) {
        let qpos = buf.q_rows.narrow(1, done, n)?.contiguous()?;
        // The first step feeds the class token and the known tokens in sequence, as training
        // saw them; later steps the tokens drawn together, unmasked (the reference's way).
        let logits = model
            .step_native_logits(
                &mut buf.cache,
                &ids,
                Positions {
                    keys: &kpos,
                    queries: &qpos,
                },
                done == 0,
            )?
            .expect("queries were given");
        let picked = draw::draw(&logits, &buf.seed, d)?;
        buf.drawn.slice_set(&picked, 1, done)?;
        // The same drawn tokens are fed to both guidance halves.
        ids = if plan.copies == 2 {
            Tensor::cat(&[&picked, &picked], 0)?
        } else {
            picked
        };
        kpos = qpos;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::random_var_builder;
    use crate::config::ArpgConfig;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn tiny() -> Arpg {
        let cfg = ArpgConfig {
            dim: 32,
            n_layer: 4,
            n_head: 2,
            vocab_size: 13,
            num_classes: 3,
            block_size: 16,
            multiple_of: 16,
            norm_eps: 1e-5,
            rope_base: 10000.0,
            ffn_dim_multiplier: None,
            cls_token_num: 1,
            abs_pos_embed: false,
        };
        Arpg::new(&cfg, random_var_builder(3, DType::F32, &Device::Cpu)).unwrap()
    }

    fn settings(temperature: f32, schedule: CfgSchedule) -> SampleConfig {
        SampleConfig {
            steps: 5,
            cfg: 3.0,
            cfg_schedule: schedule,
            filter: TokenFilter {
                temperature,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_device_loop_decodes_greedily_as_the_host_loop_does_with_known_tokens_and_guidance() {
        let m = tiny();
        let mut r = ChaCha8Rng::seed_from_u64(1);
        let known: Vec<Vec<(usize, u32)>> = vec![vec![(3, 5), (9, 1)], vec![(0, 12), (15, 2)]];
        let orders: Vec<Vec<usize>> = known
            .iter()
            .map(|k| {
                let free: Vec<usize> = (0..16)
                    .filter(|p| k.iter().all(|&(q, _)| q != *p))
                    .collect();
                random_order(&free, &mut r)
            })
            .collect();
        let req = Request {
            classes: &[2, 0],
            known: &known,
            orders: &orders,
        };
        for schedule in [CfgSchedule::Constant, CfgSchedule::Linear] {
            let sc = settings(0.0, schedule);
            let host = decode_impl(&m, &req, &sc, &mut r, None, false).unwrap();
            let dev = decode_impl(&m, &req, &sc, &mut r, None, true).unwrap();
            assert_eq!(host, dev);
            assert_eq!((dev[0][3], dev[0][9], dev[1][0], dev[1][15]), (5, 1, 12, 2));
            assert!(dev.iter().flatten().all(|&t| t < 13));
        }
    }

    #[test]
    fn a_graph_cache_repeats_the_eager_draws_for_the_same_seed_and_reuses_its_buffers() {
        let m = tiny();
        let orders = vec![(0..16).rev().collect::<Vec<_>>(); 2];
        let sc = settings(1.0, CfgSchedule::Linear);
        let known = vec![vec![]; 2];
        let req = Request {
            classes: &[1, 2],
            known: &known,
            orders: &orders,
        };
        let mut graphs = DecodeGraphs::default();
        let mut draws = Vec::new();
        for seed in [7, 7, 8] {
            let eager = decode_impl(
                &m,
                &req,
                &sc,
                &mut ChaCha8Rng::seed_from_u64(seed),
                None,
                true,
            )
            .unwrap();
            let cached = decode_impl(
                &m,
                &req,
                &sc,
                &mut ChaCha8Rng::seed_from_u64(seed),
                Some(&mut graphs),
                true,
            )
            .unwrap();
            assert_eq!(eager, cached);
            draws.push(cached);
        }
        assert_eq!(draws[0], draws[1]);
        assert_ne!(draws[0], draws[2], "another seed, other tokens");
        // No CUDA here: nothing captured, and nothing replayed.
        assert_eq!((graphs.captures(), graphs.replays()), (0, 0));
    }
}
