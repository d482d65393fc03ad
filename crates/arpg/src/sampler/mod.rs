//! Randomized parallel decoding with a KV cache: the paper's sampling algorithm.
//!
//! A [`Request`] (classes, known tokens, orders) and a [`SampleConfig`] are checked once, by
//! [`Request::validate`], into a [`ValidRequest`]; [`generate`] runs it through the one loop
//! (`run_loop`): prefill the class token (and any known tokens), then at each step predict a
//! scheduled number of tokens at once, in a random order, each query carrying the position of
//! the token it predicts; mix conditional and unconditional logits (CFG), select one token per
//! query (on the device, or filtered on the host), and feed the selected tokens back.

pub mod draw;
pub mod filter;
pub mod graph;
pub mod run;
pub mod schedule;

pub use draw::Draw;
pub use filter::TokenFilter;
pub use graph::DecodeGraphs;
pub use schedule::{token_counts, CfgSchedule, MaskSchedule};

use crate::config::ArpgConfig;
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

/// Most sequences one request decodes at once: far above any GPU's memory at ARPG-L's size
/// (the CFG batch doubles it), so a larger number is a mistake, not a workload.
pub const MAX_BATCH: usize = 1 << 16;

/// What a request is checked against: the classes, codebook and token grid of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    pub num_classes: usize,
    pub vocab_size: usize,
    /// Token cells of the grid decoded (the model's RoPE grid).
    pub cells: usize,
    /// For a model with a control encoder: the condition shape `[C, H, W]` it takes, and
    /// whether it was trained with condition dropout (so can do without a condition).
    pub control: Option<((usize, usize, usize), bool)>,
}

impl DecodeShape {
    /// The shape a loaded model decodes (its current RoPE grid).
    pub fn of(model: &Arpg) -> Self {
        let mc = model.config();
        Self {
            num_classes: mc.num_classes,
            vocab_size: mc.vocab_size,
            cells: model.rope().rows() - mc.cls_token_num,
            control: Self::control_of(mc),
        }
    }

    fn control_of(mc: &ArpgConfig) -> Option<((usize, usize, usize), bool)> {
        Some((mc.control_shape()?, mc.control.as_ref()?.dropout > 0.0))
    }

    /// The shape of a configuration's own grid, to check a request before loading weights.
    pub fn of_config(mc: &ArpgConfig) -> Self {
        Self {
            num_classes: mc.num_classes,
            vocab_size: mc.vocab_size,
            cells: mc.block_size,
            control: Self::control_of(mc),
        }
    }
}

/// What one decoding call works on: a batch of sequences, unchecked. [`Request::validate`]
/// checks it.
pub struct Request<'a> {
    /// Class id of each sequence.
    pub classes: &'a [usize],
    /// Tokens already known, per sequence, as (raster position, token); all sequences of a
    /// batch must know the same number of tokens.
    pub known: &'a [Vec<(usize, u32)>],
    /// The generation order of the unknown positions, per sequence.
    pub orders: &'a [Vec<usize>],
    /// A condition for a control model (see [`Condition`]); `None` samples without one.
    pub condition: Option<Condition<'a>>,
}

/// What steers a control model's queries, and how guidance treats it.
#[derive(Clone, Copy)]
pub struct Condition<'a> {
    /// Condition images `[b, C, H, W]` (one per sequence) or `[1, C, H, W]` (one for all),
    /// values in [0, 1], any device.
    pub images: &'a Tensor,
    /// Guide over the condition as well as the class: the unconditional half of the CFG
    /// batch drops both (needs a model trained with condition dropout). Otherwise both halves
    /// keep the condition and guidance acts on the class alone.
    pub guide: bool,
}

/// A request and its settings, checked against a [`DecodeShape`]: the only input [`generate`]
/// takes, so nothing downstream checks again.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    shape: DecodeShape,
    classes: Vec<usize>,
    known: Vec<Vec<(usize, u32)>>,
    orders: Vec<Vec<usize>>,
    cfg: SampleConfig,
    /// Tokens selected at each step.
    counts: Vec<usize>,
    /// Condition images `[b, C, H, W]` (f32, on the CPU) and the guidance choice.
    condition: Option<(Tensor, bool)>,
}

impl Request<'_> {
    /// Check every field once: batch size, classes in range, guidance and filter settings,
    /// known tokens inside the grid and the codebook, each order a permutation of the unknown
    /// cells, and the number of steps possible for them.
    pub fn validate(&self, shape: DecodeShape, cfg: &SampleConfig) -> Result<ValidRequest> {
        let b = self.classes.len();
        ensure!(b > 0, "empty batch: no class to sample");
        ensure!(
            b <= MAX_BATCH,
            "a batch of {b} sequences is over the limit of {MAX_BATCH}"
        );
        ensure!(
            self.known.len() == b && self.orders.len() == b,
            "one known set and one order per sequence ({b} classes, {} known sets, {} orders)",
            self.known.len(),
            self.orders.len()
        );
        validate_settings(shape, cfg)?;
        for &c in self.classes {
            if c >= shape.num_classes {
                bail!(
                    "class id {c} is out of range: the model has {} classes (0..={})",
                    shape.num_classes,
                    shape.num_classes - 1
                );
            }
        }
        let cells = shape.cells;
        let n_known = self.known[0].len();
        ensure!(
            n_known < cells,
            "nothing to decode: all {cells} tokens are known"
        );
        for (s, (known, order)) in self.known.iter().zip(self.orders).enumerate() {
            ensure!(
                known.len() == n_known,
                "every sequence of a batch must know the same number of tokens"
            );
            let mut seen = vec![false; cells];
            for &(p, t) in known {
                ensure!(
                    p < cells && !seen[p],
                    "known position {p} is out of range (0..{cells}) or repeated"
                );
                ensure!(
                    (t as usize) < shape.vocab_size,
                    "known token {t} is out of range (vocab {})",
                    shape.vocab_size
                );
                seen[p] = true;
            }
            for &p in order {
                ensure!(
                    p < cells && !seen[p],
                    "sequence {s}: order position {p} is out of range (0..{cells}), known or repeated"
                );
                seen[p] = true;
            }
            ensure!(
                order.len() == cells - n_known,
                "sequence {s}: the order has {} positions, {} are unknown",
                order.len(),
                cells - n_known
            );
        }
        let condition = self.validate_condition(shape, b)?;
        Ok(ValidRequest {
            condition,
            shape,
            classes: self.classes.to_vec(),
            known: self.known.to_vec(),
            orders: self.orders.to_vec(),
            cfg: cfg.clone(),
            counts: token_counts(cells - n_known, cfg.steps, cfg.schedule)?,
        })
    }
}

impl Request<'_> {
    /// A condition only for a control model, of its shape, finite and in [0, 1]; none only
    /// for a model that learned the null condition.
    fn validate_condition(&self, shape: DecodeShape, b: usize) -> Result<Option<(Tensor, bool)>> {
        let (c, control) = match (&self.condition, shape.control) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                bail!("this model has no control encoder: it takes no condition (--condition)")
            }
            (None, Some((_, dropout))) => {
                ensure!(
                    dropout,
                    "this control model was trained without condition dropout (control.dropout \
                     = 0 in its config), so it cannot sample without a condition: give one \
                     (--condition)"
                );
                return Ok(None);
            }
            (Some(c), Some(control)) => (c, control),
        };
        let ((ch, h, w), dropout) = control;
        let dims = c.images.dims();
        ensure!(
            dims.len() == 4 && (dims[0] == b || dims[0] == 1) && dims[1..] == [ch, h, w],
            "a condition of shape {dims:?}: the model takes [{b} or 1, {ch}, {h}, {w}] \
             ({ch} channel(s), {h}x{w} pixels)"
        );
        ensure!(
            !c.guide || dropout,
            "guidance over the condition needs a model trained with condition dropout \
             (control.dropout = 0 in its config): keep the condition in both halves \
             (--control-guidance class)"
        );
        let imgs = c
            .images
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?;
        let (lo, hi) = (
            imgs.min_all()?.to_scalar::<f32>()?,
            imgs.max_all()?.to_scalar::<f32>()?,
        );
        let finite = imgs.sum_all()?.to_scalar::<f32>()?.is_finite();
        ensure!(
            finite && lo >= 0.0 && hi <= 1.0,
            "condition values must be finite and in [0, 1], found {lo}..{hi}"
        );
        let imgs = imgs.broadcast_as((b, ch, h, w))?.contiguous()?;
        Ok(Some((imgs, c.guide)))
    }
}

/// The settings' own ranges (guidance, temperature, top-k, top-p) and the steps for a full
/// Largest guidance scale taken.
pub const MAX_CFG: f32 = 1e4;

/// grid: what a command line can check before it loads a model.
pub fn validate_settings(shape: DecodeShape, cfg: &SampleConfig) -> Result<()> {
    cfg.filter.validate()?;
    if !cfg.cfg.is_finite() || cfg.cfg < 0.0 {
        bail!("--cfg {} must be a finite number >= 0", cfg.cfg);
    }
    // The paper's scales are 4-8; far beyond, the guided logits overflow and every draw
    // becomes token 0 (checked on the host path, not inside the device's draw kernel).
    if cfg.cfg > MAX_CFG {
        bail!(
            "--cfg {} is beyond {MAX_CFG}: the guided logits would overflow",
            cfg.cfg
        );
    }
    if cfg.filter.top_k > shape.vocab_size {
        bail!(
            "--top-k {} is larger than the codebook ({} tokens); 0 turns it off",
            cfg.filter.top_k,
            shape.vocab_size
        );
    }
    if cfg.steps == 0 || cfg.steps > shape.cells {
        bail!(
            "--steps {} is impossible for {} tokens: use 1..={}",
            cfg.steps,
            shape.cells,
            shape.cells
        );
    }
    Ok(())
}

impl ValidRequest {
    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.classes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
    pub fn shape(&self) -> DecodeShape {
        self.shape
    }
    pub fn config(&self) -> &SampleConfig {
        &self.cfg
    }
    pub fn classes(&self) -> &[usize] {
        &self.classes
    }
    /// Tokens selected at each step.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }
    fn n_known(&self) -> usize {
        self.known[0].len()
    }
    fn n_unknown(&self) -> usize {
        self.shape.cells - self.n_known()
    }

    /// Which halves of the classifier-free-guidance batch run.
    fn halves(&self) -> Halves {
        if self.cfg.cfg == 0.0 {
            Halves::Uncond
        } else if self.cfg.cfg == 1.0 {
            Halves::Cond
        } else {
            Halves::Both
        }
    }

    /// Guidance weight after each step (`None` when one half runs): constant, or linear in the
    /// tokens decoded after the step (the reference's `pos` after its increment).
    fn weights(&self) -> Vec<Option<f64>> {
        let (w, total) = (self.cfg.cfg as f64, self.n_unknown() as f64);
        let mut decoded = 0;
        self.counts
            .iter()
            .map(|&n| {
                decoded += n;
                (self.halves() == Halves::Both).then(|| match self.cfg.cfg_schedule {
                    CfgSchedule::Constant => w,
                    CfgSchedule::Linear => 1.0 + (w - 1.0) * decoded as f64 / total,
                })
            })
            .collect()
    }
}

/// Which halves of the classifier-free-guidance batch run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halves {
    Cond,
    Uncond,
    Both,
}

/// Where tokens are selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrawOn {
    /// Guidance, temperature and a Gumbel-max draw in one kernel ([`draw::draw`]), noise from
    /// a seed tensor: no host round trip, so CUDA graphs can capture it.
    Device,
    /// Logits come back every step; top-k / top-p ([`TokenFilter`]) and the draw use the rng.
    Host,
}

impl DrawOn {
    /// On GPUs the device, unless top-k / top-p filtering is asked for (those sort each row,
    /// done on the host). On the CPU the host, with the seeded generator, so CPU runs repeat.
    fn pick(dev: &candle_core::Device, f: &TokenFilter) -> Self {
        if !dev.is_cpu() && f.top_k == 0 && f.top_p >= 1.0 {
            Self::Device
        } else {
            Self::Host
        }
    }
}

/// A random order of `positions`, e.g. of `0..256`.
pub fn random_order<R: Rng>(positions: &[usize], rng: &mut R) -> Vec<usize> {
    let mut o = positions.to_vec();
    o.shuffle(rng);
    o
}

/// How a run orders the images of each batch.
#[derive(Debug, Clone)]
pub enum Orders {
    /// The reference's way: one random order shared by the batch.
    Shared,
    /// An independent random order per image.
    PerImage,
    /// This order for every image.
    Fixed(Vec<usize>),
}

impl Orders {
    /// The orders of a batch of `n` images over `positions`.
    pub fn draw<R: Rng>(&self, n: usize, positions: &[usize], rng: &mut R) -> Vec<Vec<usize>> {
        match self {
            Self::Fixed(o) => vec![o.clone(); n],
            Self::PerImage => (0..n).map(|_| random_order(positions, rng)).collect(),
            Self::Shared => vec![random_order(positions, rng); n],
        }
    }
}

/// Checks `classes`, each in `order` (default: raster order) with nothing known, as a request
/// would be checked: what a command line can check of its classes before a model loads.
pub fn check_classes(
    shape: DecodeShape,
    cfg: &SampleConfig,
    classes: &[usize],
    order: Option<&[usize]>,
    condition: Option<Condition>,
) -> Result<()> {
    let raster: Vec<usize> = (0..shape.cells).collect();
    let orders = vec![order.unwrap_or(&raster).to_vec(); classes.len()];
    let known = vec![vec![]; classes.len()];
    let req = Request {
        classes,
        known: &known,
        orders: &orders,
        condition,
    };
    req.validate(shape, cfg).map(|_| ())
}

/// Decode a validated request on `model`: tokens `[b, cells]` (u32, raster order over the
/// model's grid, known tokens unchanged), left on the model's device for the VQ decoder;
/// `.to_vec2::<u32>()` brings them to the host. With `graphs`, the device path captures the
/// first decode of a shape as a CUDA graph and replays it for later ones ([`DecodeGraphs`]).
pub fn generate<R: Rng>(
    model: &Arpg,
    req: &ValidRequest,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
) -> Result<Tensor> {
    let on = DrawOn::pick(model.device(), &req.cfg.filter);
    generate_on(model, req, rng, graphs, on)
}

/// Shorthand for plain class-conditional sampling with host tokens: every position unknown,
/// one order per sequence; validates, then [`generate`].
pub fn sample<R: Rng>(
    model: &Arpg,
    classes: &[usize],
    orders: &[Vec<usize>],
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    sample_graphs(model, classes, orders, cfg, rng, None)
}

/// [`sample`] with CUDA graphs kept in `graphs` across batches (see [`DecodeGraphs`]).
pub fn sample_with<R: Rng>(
    model: &Arpg,
    classes: &[usize],
    orders: &[Vec<usize>],
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: &mut DecodeGraphs,
) -> Result<Vec<Vec<u32>>> {
    sample_graphs(model, classes, orders, cfg, rng, Some(graphs))
}

fn sample_graphs<R: Rng>(
    model: &Arpg,
    classes: &[usize],
    orders: &[Vec<usize>],
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
) -> Result<Vec<Vec<u32>>> {
    Ok(generate_classes(model, classes, orders, cfg, rng, graphs)?.to_vec2()?)
}

/// Class-conditional sampling, every position unknown: validate, then [`generate`]; tokens
/// `[b, cells]` stay on the device.
pub fn generate_classes<R: Rng>(
    model: &Arpg,
    classes: &[usize],
    orders: &[Vec<usize>],
    cfg: &SampleConfig,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
) -> Result<Tensor> {
    let known = vec![vec![]; classes.len()];
    let req = Request {
        classes,
        known: &known,
        orders,
        condition: None,
    };
    let req = req.validate(DecodeShape::of(model), cfg)?;
    generate(model, &req, rng, graphs)
}

/// Shorthand: validate `req`, [`generate`], tokens on the host.
pub fn decode<R: Rng>(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    let req = req.validate(DecodeShape::of(model), cfg)?;
    Ok(generate(model, &req, rng, None)?.to_vec2()?)
}

/// [`generate`] with the selection place chosen (tests run the device path on the CPU).
fn generate_on<R: Rng>(
    model: &Arpg,
    req: &ValidRequest,
    rng: &mut R,
    graphs: Option<&mut DecodeGraphs>,
    on: DrawOn,
) -> Result<Tensor> {
    ensure!(
        req.shape == DecodeShape::of(model),
        "the request was checked for {:?}, the model decodes {:?}",
        req.shape,
        DecodeShape::of(model)
    );
    let plan = Plan::new(model, req);
    let drawn = match on {
        DrawOn::Device => {
            let seeds = draw::sequence_seeds(rng.random::<i64>(), req.len());
            let inputs = Inputs::new(model, req, seeds);
            match graphs {
                Some(g) => g.run(model, &plan, &inputs)?,
                None => {
                    let mut buf = Buffers::new(model, &plan)?;
                    buf.load(model, &inputs)?;
                    run_loop(model, &plan, &mut buf, &mut DeviceDraw)?;
                    buf.check_finite(plan.counts.len())?;
                    buf.drawn
                }
            }
        }
        DrawOn::Host => {
            let mut buf = Buffers::new(model, &plan)?;
            buf.load(model, &Inputs::new(model, req, vec![0; req.len()]))?;
            let mut host = HostDraw {
                filter: req.cfg.filter,
                weights: req.weights(),
                b: req.len(),
                rng,
            };
            run_loop(model, &plan, &mut buf, &mut host)?;
            buf.drawn
        }
    };
    to_raster(req, &drawn)
}

/// Tokens `[b, cells]` in raster order from the drawn ones `[b, n_unknown]` in generation
/// order and the known ones: one gather on the device (the index comes from the request).
fn to_raster(req: &ValidRequest, drawn: &Tensor) -> Result<Tensor> {
    let (b, nk, cells) = (req.len(), req.n_known(), req.shape.cells);
    let dev = drawn.device();
    let mut idx = vec![0u32; b * cells];
    let mut known = Vec::with_capacity(b * nk);
    for (s, (k, order)) in req.known.iter().zip(&req.orders).enumerate() {
        for (i, &(p, t)) in k.iter().enumerate() {
            idx[s * cells + p] = i as u32;
            known.push(t);
        }
        for (j, &p) in order.iter().enumerate() {
            idx[s * cells + p] = (nk + j) as u32;
        }
    }
    let src = if nk == 0 {
        drawn.clone()
    } else {
        Tensor::cat(&[&Tensor::from_vec(known, (b, nk), dev)?, drawn], 1)?
    };
    Ok(src.gather(&Tensor::from_vec(idx, (b, cells), dev)?, 1)?)
}

/// Content tokens a decode feeds: the class token, the known tokens, and every drawn token but
/// the last step's (never fed back, so never cached: the reference's cache is that long too).
fn cache_capacity(n_known: usize, counts: &[usize]) -> usize {
    1 + n_known + counts.iter().sum::<usize>() - counts.last().copied().unwrap_or(0)
}

/// A decode's shapes and settings: everything a captured CUDA graph bakes in.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    model_id: u64,
    b: usize,
    copies: usize,
    n_known: usize,
    n_unknown: usize,
    counts: Vec<usize>,
    draws: Vec<Draw>,
    /// Whether the queries read a condition's table.
    control: bool,
}

impl Plan {
    fn new(model: &Arpg, req: &ValidRequest) -> Self {
        let draws = req
            .weights()
            .into_iter()
            .enumerate()
            .map(|(s, w)| Draw {
                guidance: w.map(|w| w as f32),
                temperature: req.cfg.filter.temperature,
                salt: s as u32,
            })
            .collect();
        Self {
            model_id: model.id(),
            b: req.len(),
            copies: if req.halves() == Halves::Both { 2 } else { 1 },
            n_known: req.n_known(),
            n_unknown: req.n_unknown(),
            counts: req.counts.clone(),
            draws,
            control: req.condition.is_some(),
        }
    }

    fn rows(&self) -> usize {
        self.b * self.copies
    }
}

/// What varies between decodes of one plan, uploaded before the loop runs.
struct Inputs {
    first_ids: Vec<u32>,
    first_pos: Vec<u32>,
    q_rows: Vec<u32>,
    /// One per sequence (see [`draw::sequence_seeds`]).
    seeds: Vec<i64>,
    /// Conditions `[rows, C, H, W]` and which are kept `[rows]` (the CFG halves' choice).
    condition: Option<(Tensor, Tensor)>,
}

impl Inputs {
    /// Step 0 feeds the class token (row 0 of the RoPE table) and every known token; every
    /// query's RoPE row is known from the orders, so one upload serves the whole decode.
    fn new(model: &Arpg, req: &ValidRequest, seeds: Vec<i64>) -> Self {
        let mc = model.config();
        let halves = req.halves();
        let copies = if halves == Halves::Both { 2 } else { 1 };
        let (mut first_ids, mut first_pos, mut q_rows) = (vec![], vec![], vec![]);
        let mut keep = vec![];
        let guide = req.condition.as_ref().is_some_and(|c| c.1);
        for half in 0..copies {
            let uncond = halves == Halves::Uncond || half == 1;
            keep.extend(std::iter::repeat_n(
                if uncond && guide { 0f32 } else { 1.0 },
                req.len(),
            ));
            for (s, &c) in req.classes.iter().enumerate() {
                first_ids.push(match uncond {
                    true => mc.null_class_token(),
                    false => mc.class_token(c),
                });
                first_pos.push(0);
                for &(p, t) in &req.known[s] {
                    first_ids.push(t);
                    first_pos.push((p + mc.cls_token_num) as u32);
                }
                q_rows.extend(req.orders[s].iter().map(|&p| (p + mc.cls_token_num) as u32));
            }
        }
        let condition = req.condition.as_ref().map(|(imgs, _)| {
            let imgs = match copies {
                2 => Tensor::cat(&[imgs, imgs], 0).expect("same shapes"),
                _ => imgs.clone(),
            };
            let n = keep.len();
            (
                imgs,
                Tensor::from_vec(keep, n, &candle_core::Device::Cpu).expect("sized"),
            )
        });
        Self {
            first_ids,
            first_pos,
            q_rows,
            seeds,
            condition,
        }
    }
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
    /// The condition's query table `[rows, grid rows, dim]` (see [`Arpg::control_queries`]).
    control: Option<Tensor>,
    /// The sum of the last step's logits, written inside the loop: NaN or infinite when the
    /// model produced non-finite logits, which the device draw would turn into token 0.
    last_sum: Tensor,
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
            seed: Tensor::zeros(plan.b, DType::I64, dev)?,
            drawn: Tensor::zeros((plan.b, plan.n_unknown), DType::U32, dev)?,
            control: match plan.control {
                true => {
                    let (r, d) = (model.rope().rows(), model.config().dim);
                    Some(Tensor::zeros((rows, r, d), model.dtype(), dev)?)
                }
                false => None,
            },
            last_sum: Tensor::zeros(1, DType::F32, dev)?,
        })
    }

    /// Refuse a decode whose last step's logits were not finite (a device draw does not
    /// look at them; one read after the loop instead of one per step).
    fn check_finite(&self, steps: usize) -> Result<()> {
        let sum = self.last_sum.to_vec1::<f32>()?[0];
        finite(&[sum], steps - 1)
    }

    /// Copy a decode's inputs into the buffers, in place (a condition is encoded here, once
    /// per decode, outside any captured graph).
    fn load(&mut self, model: &Arpg, x: &Inputs) -> Result<()> {
        let dev = self.seed.device().clone();
        if let (Some(dst), Some((imgs, keep))) = (&self.control, &x.condition) {
            let (imgs, keep) = (imgs.to_device(&dev)?, keep.to_device(&dev)?);
            let mut mode = crate::model::Mode::inference();
            let table = model.control_queries(&imgs, Some(&keep), &mut mode)?;
            dst.slice_set(&table, 0, 0)?;
        }
        let put = |dst: &Tensor, v: &[u32]| -> Result<()> {
            let src = Tensor::from_slice(v, dst.shape(), &dev)?;
            Ok(dst.slice_set(&src, 0, 0)?)
        };
        put(&self.first_ids, &x.first_ids)?;
        put(&self.first_pos, &x.first_pos)?;
        put(&self.q_rows, &x.q_rows)?;
        let seeds = Tensor::from_slice(&x.seeds, self.seed.shape(), &dev)?;
        self.seed.slice_set(&seeds, 0, 0)?;
        Ok(())
    }
}

/// How one step's logits `[copies * b, n, vocab]` (compute dtype) become tokens `[b, n]`.
trait Select {
    fn select(
        &mut self,
        logits: &Tensor,
        step: usize,
        plan: &Plan,
        seed: &Tensor,
    ) -> Result<Tensor>;
}

/// Guidance, temperature and Gumbel-max in one kernel; noise from the seed buffer.
struct DeviceDraw;

impl Select for DeviceDraw {
    fn select(&mut self, logits: &Tensor, s: usize, plan: &Plan, seed: &Tensor) -> Result<Tensor> {
        draw::draw(logits, seed, plan.draws[s])
    }
}

/// The CFG mix on the device, then each row on the host: top-k / top-p and a draw from `rng`.
struct HostDraw<'r, R> {
    filter: TokenFilter,
    weights: Vec<Option<f64>>,
    b: usize,
    rng: &'r mut R,
}

impl<R: Rng> Select for HostDraw<'_, R> {
    fn select(&mut self, logits: &Tensor, s: usize, _: &Plan, _: &Tensor) -> Result<Tensor> {
        let (filter, rng) = (self.filter, &mut *self.rng);
        host_select(logits, self.weights[s], self.b, s, |_, l| {
            filter.sample(l, rng)
        })
    }
}

/// The host draws' common part: the CFG mix of `[copies * b, n, vocab]` logits with weight
/// `w`, then `draw(row, logits)` for each query of each row (checked finite first).
fn host_select(
    logits: &Tensor,
    w: Option<f64>,
    b: usize,
    step: usize,
    mut draw: impl FnMut(usize, &mut [f32]) -> u32,
) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let logits = match w {
        Some(w) => {
            let c = logits.narrow(0, 0, b)?;
            let u = logits.narrow(0, b, b)?;
            (&u + ((c - &u)? * w)?)?
        }
        None => logits,
    };
    let (b, n, _) = logits.dims3()?;
    let mut toks = Vec::with_capacity(b * n);
    for (r, row) in logits.to_vec3::<f32>()?.iter_mut().enumerate() {
        for l in row.iter_mut() {
            finite(l, step)?;
            toks.push(draw(r, l));
        }
    }
    Ok(Tensor::from_vec(toks, (b, n), logits.device())?)
}

/// Non-finite logits would all draw token 0 and pass for a result: refuse them.
fn finite(logits: &[f32], step: usize) -> Result<()> {
    if logits.iter().all(|x| x.is_finite()) {
        return Ok(());
    }
    bail!(
        "the model produced non-finite logits at decoding step {}: check the weights and the \
         config (rope_base, norm_eps) and the guidance scale",
        step + 1
    )
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

/// Validate `req` and decode it with one generator per group of sequences (e.g. one per server
/// request batched together): a group's tokens are drawn from its own generator, in the order
/// a decode of that group alone draws them, so they do not depend on what else is in the
/// batch: a group gets the tokens that [`generate`] gives it alone with the same generator,
/// on the device as on the host. On a GPU (no top-k / top-p) each group draws its decode seed
/// first and its sequences draw on the device ([`draw::sequence_seeds`]); elsewhere every
/// token is drawn on the host. Tokens on the host, raster order.
pub fn decode_rows(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rows: &mut Rows,
) -> Result<Vec<Vec<u32>>> {
    let on = DrawOn::pick(model.device(), &cfg.filter);
    decode_rows_on(model, req, cfg, rows, on)
}

fn decode_rows_on(
    model: &Arpg,
    req: &Request,
    cfg: &SampleConfig,
    rows: &mut Rows,
    on: DrawOn,
) -> Result<Vec<Vec<u32>>> {
    ensure!(
        rows.of.len() == req.classes.len() && rows.of.iter().all(|&g| g < rows.rngs.len()),
        "one generator group per sequence"
    );
    let req = req.validate(DecodeShape::of(model), cfg)?;
    let plan = Plan::new(model, &req);
    let mut buf = Buffers::new(model, &plan)?;
    let steps = plan.counts.len();
    match on {
        DrawOn::Device => {
            // Each group's seeds as a decode of the group alone derives them.
            let mut group_seeds: Vec<Option<Vec<i64>>> = vec![None; rows.rngs.len()];
            let mut next = vec![0; rows.rngs.len()];
            let mut seeds = Vec::with_capacity(req.len());
            for &g in rows.of {
                let mine = group_seeds[g].get_or_insert_with(|| {
                    let n = rows.of.iter().filter(|&&h| h == g).count();
                    draw::sequence_seeds(rows.rngs[g].random::<i64>(), n)
                });
                seeds.push(mine[next[g]]);
                next[g] += 1;
            }
            buf.load(model, &Inputs::new(model, &req, seeds))?;
            let on_step = &mut *rows.on_step;
            let mut pick = DeviceSteps { on_step, steps };
            run_loop(model, &plan, &mut buf, &mut pick)?;
            buf.check_finite(steps)?;
        }
        DrawOn::Host => {
            buf.load(model, &Inputs::new(model, &req, vec![0; req.len()]))?;
            let mut pick = RowsDraw {
                filter: req.cfg.filter,
                weights: req.weights(),
                b: req.len(),
                steps,
                rows,
            };
            run_loop(model, &plan, &mut buf, &mut pick)?;
        }
    }
    Ok(to_raster(&req, &buf.drawn)?.to_vec2()?)
}

/// [`DeviceDraw`] with a step callback, called once the step's tokens are drawn.
struct DeviceSteps<'a> {
    on_step: &'a mut dyn FnMut(usize, usize),
    steps: usize,
}

impl Select for DeviceSteps<'_> {
    fn select(&mut self, logits: &Tensor, s: usize, plan: &Plan, seed: &Tensor) -> Result<Tensor> {
        let toks = draw::draw(logits, seed, plan.draws[s])?;
        // Progress means done: wait for the step (a server's decode is not graph-captured).
        toks.device().synchronize()?;
        (self.on_step)(s + 1, self.steps);
        Ok(toks)
    }
}

/// [`HostDraw`] with each sequence's generator taken from its group, and a step callback.
struct RowsDraw<'a, 'r> {
    filter: TokenFilter,
    weights: Vec<Option<f64>>,
    b: usize,
    steps: usize,
    rows: &'a mut Rows<'r>,
}

impl Select for RowsDraw<'_, '_> {
    fn select(&mut self, logits: &Tensor, s: usize, _: &Plan, _: &Tensor) -> Result<Tensor> {
        let (filter, rows) = (self.filter, &mut *self.rows);
        let toks = host_select(logits, self.weights[s], self.b, s, |r, l| {
            filter.sample(l, &mut rows.rngs[rows.of[r]])
        })?;
        (rows.on_step)(s + 1, self.steps);
        Ok(toks)
    }
}

/// The decoding loop, as the reference's `generate` reads: per step of the schedule, run the
/// fed tokens through pass 1 and the step's queries through pass 2, select a token per query
/// (the guidance mix happens in `pick`), and feed the selected tokens back. Every tensor it
/// keeps lives in `buf`, so with [`DeviceDraw`] the same call runs eagerly or under CUDA graph
/// capture.
fn run_loop(model: &Arpg, plan: &Plan, buf: &mut Buffers, pick: &mut dyn Select) -> Result<()> {
    buf.cache.reset();
    let mut ids = buf.first_ids.clone();
    let mut kpos = buf.first_pos.clone();
    let mut done = 0;
    for (s, &n) in plan.counts.iter().enumerate() {
        let qpos = buf.q_rows.narrow(1, done, n)?.contiguous()?;
        // The first step feeds the class token and the known tokens in sequence, as training
        // saw them; later steps the tokens drawn together, unmasked (the reference's way).
        let positions = Positions {
            keys: &kpos,
            queries: &qpos,
            control: buf.control.as_ref(),
        };
        let logits = model
            .step_native_logits(&mut buf.cache, &ids, positions, done == 0)?
            .expect("queries were given");
        if s + 1 == plan.counts.len() {
            // f16 would overflow summing finite logits (bf16 and f32 cannot): widen first.
            let sum = match logits.dtype() {
                DType::F16 => logits.to_dtype(DType::F32)?.sum_all()?,
                _ => logits.sum_all()?.to_dtype(DType::F32)?,
            };
            buf.last_sum.slice_set(&sum.reshape(1)?, 0, 0)?;
        }
        let picked = pick.select(&logits, s, plan, &buf.seed)?;
        buf.drawn.slice_set(&picked, 1, done)?;
        // The same drawn tokens are fed to both guidance halves.
        ids = match plan.copies {
            2 => Tensor::cat(&[&picked, &picked], 0)?,
            _ => picked,
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

    #[test]
    fn host_draw_refuses_non_finite_logits() {
        assert!(finite(&[0.0, -3.5, 1e30], 0).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = finite(&[0.0, bad], 4).unwrap_err().to_string();
            assert!(e.contains("non-finite logits at decoding step 5"), "{e}");
        }
    }

    #[test]
    fn the_device_draw_refuses_non_finite_logits_too() {
        let cfg = crate::zoo::digits_config();
        let tr = crate::train::Trainer::new(&cfg, &Default::default(), DType::F32, &Device::Cpu)
            .unwrap();
        for (name, v) in tr.parameters() {
            if name == "head.weight" {
                let nan = (v.as_tensor().ones_like().unwrap() * f64::NAN).unwrap();
                v.set(&nan).unwrap();
            }
        }
        let m = tr.model().unwrap();
        let known = vec![vec![]; 2];
        let orders = vec![(0..64).collect::<Vec<_>>(); 2];
        let req = Request {
            classes: &[1, 2],
            known: &known,
            orders: &orders,
            condition: None,
        };
        let cfg = SampleConfig {
            steps: 4,
            ..Default::default()
        };
        for device_draw in [true, false] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let e = decode_impl(&m, &req, &cfg, &mut rng, None, device_draw).unwrap_err();
            assert!(
                e.to_string().contains("non-finite logits"),
                "{device_draw}: {e}"
            );
        }
        // Through the graph cache (on the CPU: the eager loop) as well.
        let mut g = DecodeGraphs::new(true);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let e = decode_impl(&m, &req, &cfg, &mut rng, Some(&mut g), true).unwrap_err();
        assert!(e.to_string().contains("non-finite logits"), "{e}");
    }

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
            control: None,
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

    /// The pre-refactor entry point's signature, over the one loop: validate, decode on the
    /// device path or the host path, tokens to the host.
    fn decode_impl<R: Rng>(
        model: &Arpg,
        req: &Request,
        cfg: &SampleConfig,
        rng: &mut R,
        graphs: Option<&mut DecodeGraphs>,
        device_draw: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let req = req.validate(DecodeShape::of(model), cfg)?;
        let on = if device_draw {
            DrawOn::Device
        } else {
            DrawOn::Host
        };
        Ok(generate_on(model, &req, rng, graphs, on)?.to_vec2()?)
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
            condition: None,
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
    fn device_drawn_groups_get_the_tokens_they_get_decoded_alone() {
        let m = tiny();
        let sc = settings(1.0, CfgSchedule::Linear);
        let all: Vec<usize> = (0..16).collect();
        // Groups interleaved in the batch: 0, 1, 0, 2, 1.
        let of = [0usize, 1, 0, 2, 1];
        let classes = [0usize, 2, 1, 2, 0];
        let mut rngs: Vec<ChaCha8Rng> = (0..3).map(|g| ChaCha8Rng::seed_from_u64(40 + g)).collect();
        let orders: Vec<Vec<usize>> = of
            .iter()
            .map(|&g| random_order(&all, &mut rngs[g]))
            .collect();
        let alone: Vec<Vec<Vec<u32>>> = (0..3)
            .map(|g| {
                let mine: Vec<usize> = (0..of.len()).filter(|&i| of[i] == g).collect();
                let c: Vec<usize> = mine.iter().map(|&i| classes[i]).collect();
                let o: Vec<Vec<usize>> = mine.iter().map(|&i| orders[i].clone()).collect();
                let known = vec![vec![]; c.len()];
                let req = Request {
                    classes: &c,
                    known: &known,
                    orders: &o,
                    condition: None,
                };
                decode_impl(&m, &req, &sc, &mut rngs[g].clone(), None, true).unwrap()
            })
            .collect();
        let known = vec![vec![]; of.len()];
        let req = Request {
            classes: &classes,
            known: &known,
            orders: &orders,
            condition: None,
        };
        let mut steps = 0;
        let mut on_step = |_: usize, _: usize| steps += 1;
        let mut rows = Rows {
            rngs: &mut rngs,
            of: &of,
            on_step: &mut on_step,
        };
        let batched = decode_rows_on(&m, &req, &sc, &mut rows, DrawOn::Device).unwrap();
        let mut next = [0usize; 3];
        for (i, &g) in of.iter().enumerate() {
            assert_eq!(batched[i], alone[g][next[g]], "sequence {i} (group {g})");
            next[g] += 1;
        }
        assert_eq!(steps, 5);
        // Not all alike: the noise differs between sequences.
        assert_ne!(batched[0], batched[2]);
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
            condition: None,
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

    fn sc(
        steps: usize,
        cfg: f32,
        cfg_schedule: CfgSchedule,
        schedule: MaskSchedule,
        temperature: f32,
        top_k: usize,
        top_p: f32,
    ) -> SampleConfig {
        SampleConfig {
            steps,
            cfg,
            cfg_schedule,
            schedule,
            filter: TokenFilter {
                temperature,
                top_k,
                top_p,
            },
        }
    }

    /// Expected tokens printed by the code before the one-loop refactor (commit f78af33: two
    /// loops in `decode_impl`), run on the CPU with the cases below; not generated by the code
    /// under test. Except the two `device_*` cases: their noise is now per sequence
    /// (`draw::sequence_seeds`, for the server's batching), so they were printed again when
    /// that changed; every host case and the outpaint are the old ones.
    const GOLDEN: &[(&str, [[u32; 16]; 2])] = &[
        (
            "host_linear",
            [
                [0, 1, 0, 7, 5, 5, 6, 3, 2, 5, 2, 1, 4, 2, 12, 12],
                [1, 4, 1, 6, 3, 2, 7, 8, 11, 9, 12, 3, 5, 4, 4, 11],
            ],
        ),
        (
            "host_filter",
            [
                [0, 7, 3, 5, 9, 9, 2, 2, 1, 3, 10, 10, 4, 9, 10, 6],
                [1, 4, 1, 7, 5, 10, 7, 7, 10, 10, 4, 5, 4, 5, 9, 7],
            ],
        ),
        (
            "host_uncond",
            [
                [5, 7, 10, 5, 3, 3, 7, 3, 0, 10, 8, 9, 3, 2, 9, 8],
                [10, 7, 1, 11, 7, 8, 11, 6, 0, 1, 6, 9, 6, 6, 2, 4],
            ],
        ),
        (
            "host_cond",
            [
                [12, 3, 6, 4, 8, 9, 2, 1, 5, 11, 11, 3, 2, 12, 12, 7],
                [0, 3, 8, 1, 1, 10, 10, 8, 11, 2, 4, 12, 8, 3, 4, 1],
            ],
        ),
        (
            "host_known",
            [
                [8, 9, 4, 5, 2, 1, 5, 3, 10, 1, 0, 10, 4, 0, 4, 5],
                [12, 7, 10, 9, 4, 8, 3, 7, 0, 4, 1, 1, 11, 0, 10, 2],
            ],
        ),
        (
            "device_linear",
            [
                [11, 12, 11, 8, 11, 12, 2, 6, 8, 12, 2, 9, 6, 9, 8, 2],
                [12, 9, 12, 6, 12, 12, 12, 1, 0, 4, 4, 10, 6, 9, 4, 10],
            ],
        ),
        (
            "device_known",
            [
                [6, 1, 3, 5, 6, 5, 9, 6, 5, 1, 0, 6, 4, 11, 7, 7],
                [12, 2, 3, 1, 12, 6, 3, 7, 1, 12, 0, 2, 9, 9, 1, 2],
            ],
        ),
        (
            "inpaint",
            [
                [6, 1, 2, 10, 4, 5, 6, 7, 8, 8, 10, 11, 11, 0, 1, 1],
                [5, 1, 2, 9, 4, 5, 7, 7, 8, 8, 10, 11, 0, 0, 1, 12],
            ],
        ),
    ];
    const OUTPAINT_GOLDEN: [u32; 28] = [
        1, 1, 1, 1, 3, 6, 3, 1, 1, 1, 1, 3, 7, 2, 1, 1, 1, 1, 3, 7, 0, 1, 1, 1, 1, 4, 10, 9,
    ];

    // Long: a table of golden token cases (every draw path and schedule), each run alike.
    #[test]
    fn tokens_equal_those_of_the_code_before_the_refactor() {
        use CfgSchedule::*;
        use MaskSchedule::*;
        let m = tiny();
        let cases = [
            (
                "host_linear",
                sc(5, 3.0, Linear, Arccos, 1.0, 0, 1.0),
                11u64,
                false,
                false,
            ),
            (
                "host_filter",
                sc(4, 2.0, Constant, Cosine, 0.8, 4, 0.8),
                12,
                false,
                false,
            ),
            (
                "host_uncond",
                sc(3, 0.0, Linear, Arccos, 1.0, 0, 1.0),
                13,
                false,
                false,
            ),
            (
                "host_cond",
                sc(6, 1.0, Linear, Arccos, 1.3, 0, 1.0),
                14,
                false,
                false,
            ),
            (
                "host_known",
                sc(4, 2.5, Linear, Arccos, 1.0, 0, 1.0),
                15,
                true,
                false,
            ),
            (
                "device_linear",
                sc(5, 3.0, Linear, Arccos, 1.0, 0, 1.0),
                16,
                false,
                true,
            ),
            (
                "device_known",
                sc(4, 2.5, Constant, Cosine, 0.7, 0, 1.0),
                17,
                true,
                true,
            ),
        ];
        let mut got = Vec::new();
        for (name, cfg, seed, with_known, dev) in cases {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            let known: Vec<Vec<(usize, u32)>> = if with_known {
                vec![
                    vec![(3, 5), (9, 1), (10, 0)],
                    vec![(0, 12), (15, 2), (7, 7)],
                ]
            } else {
                vec![vec![]; 2]
            };
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
                condition: None,
            };
            got.push((
                name,
                decode_impl(&m, &req, &cfg, &mut r, None, dev).unwrap(),
            ));
        }
        let mut r = ChaCha8Rng::seed_from_u64(21);
        let canvas = crate::editor::Canvas::from_tokens(
            4,
            4,
            &(0..16).map(|i| (i % 13) as u32).collect::<Vec<_>>(),
            &(0..16).map(|i| i % 3 == 0).collect::<Vec<_>>(),
        )
        .unwrap();
        let cfg = sc(8, 3.0, Linear, Arccos, 1.0, 0, 1.0);
        got.push((
            "inpaint",
            crate::editor::inpaint(&m, &canvas, 1, 2, &cfg, None, &mut r).unwrap(),
        ));
        let big = crate::editor::Canvas::from_tokens(4, 4, &[1; 16], &[false; 16])
            .unwrap()
            .pad(0, 0, 0, 3);
        let cfg = sc(3, 2.0, Linear, Arccos, 1.0, 0, 1.0);
        let mut windows = vec![];
        let out = crate::editor::fill_canvas_progress(&m, &big, 2, &cfg, &mut r, &mut |d, t| {
            windows.push((d, t))
        })
        .unwrap();
        assert_eq!(out.tokens().unwrap(), OUTPAINT_GOLDEN);
        assert_eq!(
            windows,
            [(0, 3), (1, 3), (2, 3)],
            "progress before each window"
        );
        for ((name, toks), (want_name, want)) in got.iter().zip(GOLDEN) {
            assert_eq!(name, want_name);
            assert_eq!(toks, &want.map(|r| r.to_vec()).to_vec(), "{name}");
        }
    }

    #[test]
    fn tokens_stay_on_the_device_in_raster_order() {
        let m = tiny();
        let known = vec![vec![(4, 9)]];
        let orders = vec![(0..16).filter(|&p| p != 4).collect::<Vec<_>>()];
        let req = Request {
            classes: &[1],
            known: &known,
            orders: &orders,
            condition: None,
        }
        .validate(DecodeShape::of(&m), &settings(1.0, CfgSchedule::Linear))
        .unwrap();
        let t = generate(&m, &req, &mut ChaCha8Rng::seed_from_u64(3), None).unwrap();
        assert_eq!((t.dims(), t.dtype()), (&[1usize, 16][..], DType::U32));
        assert!(t.device().same_device(m.device()));
        assert_eq!(t.to_vec2::<u32>().unwrap()[0][4], 9);
    }

    #[test]
    fn a_request_is_checked_once_with_errors_naming_the_field() {
        let m = tiny();
        let shape = DecodeShape::of(&m);
        let all: Vec<usize> = (0..16).collect();
        let err =
            |classes: &[usize], known: Vec<(usize, u32)>, order: Vec<usize>, c: SampleConfig| {
                let n = classes.len();
                Request {
                    classes,
                    known: &vec![known; n],
                    orders: &vec![order; n],
                    condition: None,
                }
                .validate(shape, &c)
                .unwrap_err()
                .to_string()
            };
        let ok = SampleConfig {
            steps: 4,
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut SampleConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c
        };
        assert!(err(&[3], vec![], all.clone(), ok.clone()).contains("class id 3"));
        assert!(err(&[], vec![], all.clone(), ok.clone()).contains("empty batch"));
        assert!(err(&[0], vec![], all.clone(), with(&|c| c.cfg = f32::NAN)).contains("--cfg NaN"));
        assert!(err(&[0], vec![], all.clone(), with(&|c| c.steps = 17)).contains("--steps 17"));
        assert!(
            err(&[0], vec![], all.clone(), with(&|c| c.filter.top_p = 0.0)).contains("--top-p")
        );
        assert!(
            err(&[0], vec![], all.clone(), with(&|c| c.filter.top_k = 14)).contains("--top-k 14")
        );
        assert!(err(
            &[0],
            vec![],
            all.clone(),
            with(&|c| c.filter.temperature = -1.0)
        )
        .contains("--temperature"));
        assert!(err(&[0], vec![], vec![0, 0], ok.clone()).contains("repeated"));
        assert!(err(&[0], vec![], all[1..].to_vec(), ok.clone()).contains("15 positions, 16"));
        assert!(err(&[0], vec![(2, 13)], all.clone(), ok.clone()).contains("known token 13"));
        assert!(err(&[0], vec![(16, 1)], all.clone(), ok.clone()).contains("known position 16"));
        // Known cells may not be in the order; with them left out it validates.
        assert!(err(&[0], vec![(2, 1)], all.clone(), ok.clone()).contains("order position 2"));
        let free: Vec<usize> = (0..16).filter(|&p| p != 2).collect();
        let v = Request {
            classes: &[0],
            known: &[vec![(2, 1)]],
            orders: &[free],
            condition: None,
        }
        .validate(shape, &ok)
        .unwrap();
        assert_eq!(v.counts().iter().sum::<usize>(), 15);
        // A request checked for one grid is refused by a model on another.
        let mut big = tiny();
        big.set_grid((4, 8)).unwrap();
        let e = generate(&big, &v, &mut ChaCha8Rng::seed_from_u64(0), None).unwrap_err();
        assert!(e.to_string().contains("was checked for"), "{e}");
    }
}
