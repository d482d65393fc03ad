//! Training: teacher forcing in a random order per sample (the paper's recipe).
//!
//! Each sample draws a permutation `o` of its positions; the model reads
//! `[class, t_o0 .. t_o(L-2)]` and its queries predict `[t_o0 .. t_o(L-1)]`, with causal masks
//! in both passes. Class labels drop to the null class with probability 0.1; dropout on token
//! embeddings, residuals and FFN outputs. AdamW, warmup + cosine, grad-norm clipping, EMA.

pub mod dist;
pub mod optim;
pub mod plot;
pub mod run;
pub mod setup;

use crate::config::ArpgConfig;
use crate::data::Packed;
use crate::kernels::dropout::{self, Dropout};
use crate::model::{Arpg, Mode, Positions};
use crate::util::{seed_for, SeedFor};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use dist::Collective;
use optim::AdamW;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The recipe's knobs; defaults are the paper's where the paper has one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Samples per optimizer step over all processes and accumulation micro-batches.
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Peak learning rate (already scaled: see `scaled_lr`).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub ema_decay: Option<f64>,
    pub class_dropout: f64,
    /// Dropout on token embeddings, residuals (after proj) and FFN outputs.
    pub dropout: f64,
    pub seed: u64,
    /// How the warm-up counts its steps (the paper's flags take the paper's way).
    #[serde(default)]
    pub warmup: optim::Warmup,
    /// Data parallel: each rank keeps the AdamW moments of its share of the tensors
    /// (ZeRO stage 1, [`dist::zero1_owners`]), updates those and broadcasts them.
    #[serde(default)]
    pub zero1: bool,
    /// Which forward + backward computes the gradients.
    #[serde(default)]
    pub step_kind: StepKind,
    /// Data parallel: the gradients travel in buckets of about this many MiB of f32, each
    /// all-reduced as soon as the backward has finished all of its gradients
    /// ([`dist::BucketReducer`]); PyTorch DDP's `bucket_cap_mb`, and its default.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
}

fn default_bucket_mb() -> f64 {
    25.0
}

/// How a training step computes its gradients.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// The hand-written step on CUDA, candle's autograd elsewhere (and for control models).
    #[default]
    Auto,
    /// candle's autograd through [`Arpg::forward`]: the reference the hand-written step is
    /// checked against, and the CPU's path.
    Autograd,
    /// [`Arpg::loss_and_grads`]: an explicit backward, no autograd graph (no control encoder).
    Hand,
}

impl std::str::FromStr for StepKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "autograd" => Self::Autograd,
            "hand" => Self::Hand,
            _ => anyhow::bail!("--step {s}: expected auto, autograd or hand"),
        })
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            grad_accum: 1,
            lr: 1e-4,
            min_lr: 1e-5,
            warmup_steps: 0,
            steps: 1000,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            ema_decay: None,
            class_dropout: 0.1,
            dropout: 0.1,
            seed: 0,
            warmup: optim::Warmup::FromFirstStep,
            zero1: false,
            step_kind: StepKind::Auto,
            bucket_mb: default_bucket_mb(),
        }
    }
}

/// The paper's rule: the learning rate is given per 256 samples of global batch.
pub fn scaled_lr(lr_per_256: f64, global_batch: usize) -> f64 {
    lr_per_256 * global_batch as f64 / 256.0
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be at least 1");
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.grad_accum > 0, "--grad-accum must be at least 1");
        ensure!(
            self.batch_size.is_multiple_of(self.grad_accum),
            "--batch-size {} must be a multiple of --grad-accum {}",
            self.batch_size,
            self.grad_accum
        );
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "--lr must be positive"
        );
        ensure!(
            self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "--min-lr {} must be in [0, the peak learning rate {:.3e}]",
            self.min_lr,
            self.lr
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay {} must be a number >= 0",
            self.weight_decay
        );
        ensure!(
            self.grad_clip.is_finite() && self.grad_clip >= 0.0,
            "--grad-clip {} must be a number >= 0 (0 = off)",
            self.grad_clip
        );
        ensure!(
            self.warmup_steps < self.steps || self.warmup_steps == 0,
            "--warmup-steps {} must be shorter than the run's --steps {}",
            self.warmup_steps,
            self.steps
        );
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            ensure!((0.0..1.0).contains(&b), "{name} {b} must be in [0, 1)");
        }
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "--dropout must be in [0, 1)"
        );
        ensure!(
            (0.0..=1.0).contains(&self.class_dropout),
            "--class-dropout must be in [0, 1]"
        );
        if let Some(d) = self.ema_decay {
            ensure!((0.0..1.0).contains(&d), "--ema decay must be in [0, 1)");
        }
        ensure!(
            self.bucket_mb > 0.0 && self.bucket_mb.is_finite(),
            "--bucket-mb {} must be a positive number of MiB",
            self.bucket_mb
        );
        Ok(())
    }
}

/// Statistics of one optimizer step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// With `ARPG_PROFILE_STEPS` set: milliseconds in forward + backward (data-parallel: with
    /// the gradients' all-reduce, which overlaps the last micro-batch's backward), the loss's
    /// all-reduce, and clipping + optimizer (the device is synchronised between phases).
    pub phases_ms: Option<[f64; 3]>,
}

/// A teacher-forced batch: `[class, tokens in order]`, their RoPE rows, the rows the queries
/// predict, and the flattened targets; for a control model, the conditions `[b, C, H, W]`
/// (in [0, 1]) and which of them are kept `[b]` (0 = dropped to the null condition).
pub struct Batch {
    pub tokens: Tensor,
    pub keys: Tensor,
    pub queries: Tensor,
    pub targets: Tensor,
    pub control: Option<(Tensor, Tensor)>,
}

/// One sequence of a teacher-forced batch: its first token (class, or null class), its
/// tokens in raster order, and the order they are generated in (a permutation of the cells).
pub struct TeacherSeq<'a> {
    pub first: u32,
    pub raster: &'a [u32],
    pub order: &'a [usize],
}

impl Batch {
    /// The teacher-forced batch of `seqs` (the paper's recipe, and what the fixtures'
    /// `teacher_forcing` feeds): each reads `[first, t_o0 .. t_o(L-2)]` at RoPE rows
    /// `[0, 1 + o0 ..]`, its queries sit at rows `1 + o0 .. 1 + o(L-1)` and predict
    /// `t_o0 .. t_o(L-1)`. The one builder of these inputs (training, parity, diagnostics).
    pub fn teacher_forced(seqs: &[TeacherSeq], device: &Device) -> Result<Batch> {
        let b = seqs.len();
        ensure!(b > 0, "a teacher-forced batch of no sequences");
        let l = seqs[0].order.len();
        let (mut toks, mut kpos, mut qpos, mut tgt) = (
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
        );
        for s in seqs {
            ensure!(
                s.order.len() == l && s.raster.len() == l,
                "a sequence of {} tokens in an order of {} cells, expected {l}",
                s.raster.len(),
                s.order.len()
            );
            toks.push(s.first);
            kpos.push(0u32);
            for (k, &p) in s.order.iter().enumerate() {
                ensure!(p < l, "order position {p} is out of range (0..{l})");
                let tok = s.raster[p];
                if k + 1 < l {
                    toks.push(tok);
                    kpos.push(p as u32 + 1);
                }
                qpos.push(p as u32 + 1);
                tgt.push(tok);
            }
        }
        Ok(Batch {
            tokens: Tensor::from_vec(toks, (b, l), device)?,
            keys: Tensor::from_vec(kpos, (b, l), device)?,
            queries: Tensor::from_vec(qpos, (b, l), device)?,
            targets: Tensor::from_vec(tgt, b * l, device)?,
            control: None,
        })
    }

    /// Samples `start..start + len` (this rank's share of a global batch).
    pub fn rows(&self, start: usize, len: usize) -> Result<Batch> {
        let l = self.tokens.dim(1)?;
        Ok(Batch {
            tokens: self.tokens.narrow(0, start, len)?,
            keys: self.keys.narrow(0, start, len)?,
            queries: self.queries.narrow(0, start, len)?,
            targets: self.targets.narrow(0, start * l, len * l)?,
            control: match &self.control {
                Some((c, k)) => Some((c.narrow(0, start, len)?, k.narrow(0, start, len)?)),
                None => None,
            },
        })
    }
}

/// Serves every parameter as its f32 master `Var`, cast to the compute dtype (a differentiable
/// op, so gradients reach the master weights: bf16 autocast with f32 masters).
struct MasterWeights {
    vars: HashMap<String, Var>,
    /// Casts with no autograd graph (the hand-written step's weights).
    detached: bool,
}

impl MasterWeights {
    fn cast(&self, v: &Var, dtype: DType) -> candle_core::Result<Tensor> {
        match self.detached {
            true => v.as_tensor().detach().to_dtype(dtype),
            false => v.as_tensor().to_dtype(dtype),
        }
    }
}

impl SimpleBackend for MasterWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let v = self
            .vars
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))?;
        if v.shape() != &s {
            candle_core::bail!("parameter {name}: {:?} vs {:?}", v.shape(), s);
        }
        self.cast(v, dtype)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.cast(&self.vars[name], dtype)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }
}

pub struct Trainer {
    pub model_cfg: ArpgConfig,
    pub cfg: TrainConfig,
    names: Vec<String>,
    params: Vec<Var>,
    opt: AdamW,
    ema: Option<Vec<Tensor>>,
    pub step: usize,
    /// Batches: sample picks, crops, orders, class drops. Identical on every rank.
    rng: ChaCha8Rng,
    /// Dropout masks on the CPU; a stream of its own per rank.
    drop_rng: ChaCha8Rng,
    group: Option<Box<dyn Collective>>,
    /// Under ZeRO-1, the rank that owns each tensor's moments.
    owners: Option<Vec<usize>>,
    /// Compute dtype of the forward/backward pass; masters and optimizer state stay f32.
    pub dtype: DType,
    device: Device,
    perm_cache: Option<(usize, Vec<usize>)>,
    /// Whether this process has taken an optimizer step (to tell a bad start from divergence).
    stepped: bool,
    /// The autograd path drops what the hand-written step drops (the counter-based masks of
    /// [`dropout`]'s sites) instead of its own stream: for comparing the two.
    hashed_masks: bool,
}

/// Refuse a model or batch that cannot fit before allocating it: f32 weights, gradients and
/// two AdamW moments (and the EMA), plus a lower bound on one micro-batch's activations.
fn check_training_memory(m: &ArpgConfig, c: &TrainConfig) -> Result<()> {
    let params = m.num_parameters() as u128;
    let copies = 4 + c.ema_decay.is_some() as u128;
    crate::util::check_memory(
        params * 4 * copies,
        &format!("training {params} parameters (weights, gradients, AdamW moments)"),
    )?;
    let micro = (c.batch_size / c.grad_accum.max(1)) as u128;
    let per_token = m.n_layer as u128 * m.dim as u128 * 8 + m.vocab_size as u128;
    crate::util::check_memory(
        params * 4 * copies + micro * m.block_size as u128 * per_token * 4,
        &format!(
            "a training micro-batch of {micro} samples of {} tokens (--batch-size {} / --grad-accum {})",
            m.block_size, c.batch_size, c.grad_accum
        ),
    )
}

impl Trainer {
    /// Fresh weights initialised as the reference does: normal(0, 0.02) for linears and the
    /// embedding table, ones for norms, zeros for the output head.
    pub fn new(
        model_cfg: &ArpgConfig,
        cfg: &TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        model_cfg.validate()?;
        cfg.validate()?;
        check_training_memory(model_cfg, cfg)?;
        let mut init_rng = ChaCha8Rng::seed_from_u64(seed_for(cfg.seed, SeedFor::TrainInit));
        let mut names = Vec::new();
        let mut params = Vec::new();
        for (name, shape) in model_cfg.parameter_shapes()? {
            let n: usize = shape.iter().product();
            // A zero control output makes a new encoder start as the class-only model.
            let zero_control = model_cfg
                .control
                .as_ref()
                .is_some_and(|c| c.query == crate::config::ControlQuery::Add)
                && name == "control.out.weight";
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name == "head.weight" || zero_control {
                vec![0.0; n]
            } else {
                (0..n)
                    .map(|_| 0.02 * crate::util::normal(&mut init_rng))
                    .collect()
            };
            params.push(Var::from_vec(data, shape, device)?);
            names.push(name);
        }
        let opt = AdamW::new(&params, cfg.beta1, cfg.beta2, cfg.weight_decay)?;
        let ema = match cfg.ema_decay {
            Some(_) => Some(
                params
                    .iter()
                    .map(|p| p.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?,
            ),
            None => None,
        };
        if !device.is_cpu() {
            device.set_seed(cfg.seed)?;
        }
        Ok(Self {
            model_cfg: model_cfg.clone(),
            cfg: cfg.clone(),
            names,
            params,
            opt,
            ema,
            step: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            drop_rng: ChaCha8Rng::seed_from_u64(seed_for(cfg.seed, SeedFor::TrainDropout)),
            group: None,
            owners: None,
            dtype,
            device: device.clone(),
            perm_cache: None,
            stepped: false,
            hashed_masks: false,
        })
    }

    /// The first parameter (by name) holding NaN or Inf, if any.
    fn non_finite_parameter(&self) -> Result<Option<String>> {
        for (n, p) in self.names.iter().zip(&self.params) {
            let ok = p
                .as_tensor()
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                .is_finite();
            if !ok {
                return Ok(Some(n.clone()));
            }
        }
        Ok(None)
    }

    /// Train data-parallel: this process becomes one rank of `group`. Weights stay equal on
    /// all ranks because they start equal (same seed or checkpoint) and every rank applies
    /// the same averaged gradient.
    pub fn set_group(&mut self, group: Box<dyn Collective>) -> Result<()> {
        let (rank, world) = (group.rank(), group.world_size());
        ensure!(
            self.cfg
                .batch_size
                .is_multiple_of(self.cfg.grad_accum * world),
            "--batch-size {} must be a multiple of --grad-accum {} x {world} processes",
            self.cfg.batch_size,
            self.cfg.grad_accum
        );
        self.drop_rng.set_stream(rank as u64);
        if !self.device.is_cpu() {
            self.device
                .set_seed(seed_for(self.cfg.seed, SeedFor::TrainRank(rank as u64)))?;
        }
        if self.cfg.zero1 && world > 1 {
            let sizes: Vec<usize> = self.params.iter().map(|p| p.elem_count()).collect();
            let owners = dist::zero1_owners(&sizes, world);
            for (i, &o) in owners.iter().enumerate() {
                if o != rank {
                    self.opt.m[i] = Tensor::zeros(0, DType::F32, &self.device)?;
                    self.opt.v[i] = Tensor::zeros(0, DType::F32, &self.device)?;
                }
            }
            self.owners = Some(owners);
        }
        self.group = Some(group);
        Ok(())
    }

    /// Optimizer-moment values this process holds (both moments): all of them, or under
    /// ZeRO-1 about 1/world.
    pub fn moment_elements(&self) -> usize {
        self.opt
            .m
            .iter()
            .chain(&self.opt.v)
            .map(|t| t.elem_count())
            .sum()
    }

    /// (rank, world size); (0, 1) without a group.
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world_size()))
    }

    /// True on every rank if `flag` is true on any (to stop all ranks at the same step).
    pub fn any_rank(&self, flag: bool) -> Result<bool> {
        match &self.group {
            Some(g) if g.world_size() > 1 => {
                let t = Tensor::new(&[flag as u8 as f32], &self.device)?;
                Ok(g.all_reduce_sum(&t)?.to_vec1::<f32>()?[0] > 0.0)
            }
            _ => Ok(flag),
        }
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    /// The model as it is now, in the compute dtype, sharing the master weights.
    pub fn model(&self) -> Result<Arpg> {
        self.model_with(false)
    }

    /// The model in the compute dtype, its weights cast from the masters with (`detached`
    /// false: autograd reaches the masters) or without an autograd graph.
    fn model_with(&self, detached: bool) -> Result<Arpg> {
        let vars = self
            .names
            .iter()
            .cloned()
            .zip(self.params.iter().cloned())
            .collect();
        let vb = VarBuilder::from_backend(
            Box::new(MasterWeights { vars, detached }),
            self.dtype,
            self.device.clone(),
        );
        Arpg::new(&self.model_cfg, vb)
    }

    /// Sample indices of micro-batch `micro` (counted over the whole run): epochs are
    /// permutations seeded by (seed, epoch), so resuming needs only the step count.
    pub fn batch_indices(&mut self, micro: usize, size: usize, n: usize) -> Vec<usize> {
        (0..size)
            .map(|k| {
                let pos = micro * size + k;
                let epoch = pos / n;
                if self.perm_cache.as_ref().map(|c| c.0) != Some(epoch) {
                    let mut r = ChaCha8Rng::seed_from_u64(seed_for(
                        self.cfg.seed,
                        SeedFor::Epoch(epoch as u64),
                    ));
                    let mut p: Vec<usize> = (0..n).collect();
                    rand::seq::SliceRandom::shuffle(&mut p[..], &mut r);
                    self.perm_cache = Some((epoch, p));
                }
                self.perm_cache.as_ref().unwrap().1[pos % n]
            })
            .collect()
    }

    /// Why the gradient norm is `grad_norm`, not finite: a parameter already is, or this
    /// run's first step (the weights or the config, not the learning rate), or divergence.
    fn diverged(&self, grad_norm: f64) -> Result<anyhow::Error> {
        // The first step's gradient does not depend on the learning rate at all.
        if let Some(bad) = self.non_finite_parameter()? {
            return Ok(anyhow::anyhow!(
                "step {}: parameter {bad} holds NaN or Inf (from the checkpoint resumed, \
                 or diverged); the gradient norm is {grad_norm}",
                self.step
            ));
        }
        if !self.stepped {
            return Ok(anyhow::anyhow!(
                "step {}: the gradient norm is {grad_norm} on the first step of this run, \
                 before any update: the weights or the model config (e.g. norm_eps, \
                 rope_base) produce it, not --lr",
                self.step
            ));
        }
        Ok(anyhow::anyhow!(
            "step {}: the gradient norm is {grad_norm} (diverged); lower --lr",
            self.step
        ))
    }

    /// One optimizer step over `cfg.batch_size` samples of `data`.
    pub fn train_step(&mut self, data: &Packed) -> Result<StepStats> {
        let mc = self.model_cfg.clone();
        let l = mc.block_size;
        ensure!(
            data.seq_len == l,
            "{}: samples have {} tokens, the model {l}",
            data.path.display(),
            data.seq_len
        );
        let world = self.rank_and_world().1;
        let profile = std::env::var_os("ARPG_PROFILE_STEPS").is_some();
        let mut clock = std::time::Instant::now();
        let mut phases = [0f64; 3];
        let mut lap = |dev: &Device, k: usize| -> Result<()> {
            if profile {
                dev.synchronize()?;
                phases[k] += clock.elapsed().as_secs_f64() * 1e3;
                clock = std::time::Instant::now();
            }
            Ok(())
        };
        let group = self.group.take();
        let summed = self.accumulate(data, group.as_deref());
        self.group = group;
        let (grads, losses) = summed?;
        let mut losses = Tensor::cat(&losses, 0)?;
        lap(&self.device, 0)?;
        if let Some(g) = self.group.as_ref().filter(|g| g.world_size() > 1) {
            // Each rank's loss was already divided by the world size, so the sum is the mean.
            losses = (g.all_reduce_sum(&losses)? / world as f64)?;
        }
        lap(&self.device, 1)?;
        let loss_sum: f64 = losses.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum();
        let grad_norm = optim::grad_norm(&grads)?;
        // Clipping is folded into the optimizer's passes (the same roundings as scaling first).
        let clip = optim::clip_factor(grad_norm, self.cfg.grad_clip);
        let lr = optim::lr_with(
            self.cfg.warmup,
            self.step,
            self.cfg.warmup_steps,
            self.cfg.steps,
            self.cfg.lr,
            self.cfg.min_lr,
        );
        if !grad_norm.is_finite() {
            return Err(self.diverged(grad_norm)?);
        }
        self.stepped = true;
        match (&self.owners, &self.group) {
            (Some(owners), Some(g)) => {
                let mine: Vec<bool> = owners.iter().map(|&o| o == g.rank()).collect();
                self.opt
                    .step_owned(&self.params, &grads, lr, clip, Some(&mine))?;
                for (p, &o) in self.params.iter().zip(owners) {
                    p.set(&g.broadcast(p.as_tensor(), o)?)?;
                }
            }
            _ => self.opt.step_owned(&self.params, &grads, lr, clip, None)?,
        }
        if let (Some(ema), Some(d)) = (self.ema.as_mut(), self.cfg.ema_decay) {
            for (e, p) in ema.iter_mut().zip(&self.params) {
                *e = ((&*e * d)? + (p.as_tensor() * (1.0 - d))?)?;
            }
        }
        lap(&self.device, 2)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: loss_sum / self.cfg.grad_accum as f64,
            lr,
            grad_norm,
            phases_ms: profile.then_some(phases),
        })
    }

    /// The step's micro-batches: their losses and the f32 gradients of the step's mean loss,
    /// summed over the micro-batches and, with a `group` of several ranks, over the ranks.
    /// The all-reduce goes in buckets ([`dist::BucketReducer`]) during the last micro-batch's
    /// backward; the earlier ones only accumulate (DDP's `no_sync`), so what is reduced is
    /// the accumulated sum. Tensors stay apart (no flat buffer: one measured 2x slower on two
    /// H200s, 170 vs 342 images/s, for its copy and clipping + AdamW on views of it); a
    /// bucket is one NCCL group of all-reduces.
    fn accumulate(
        &mut self,
        data: &Packed,
        group: Option<&dyn Collective>,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
        let accum = self.cfg.grad_accum;
        let micro_size = self.cfg.batch_size / accum;
        let local = micro_size / world;
        let divisor = (accum * world) as f64;
        let n = self.params.len();
        // The hand step's f32 gradient is a cast of its own from a lower precision; otherwise
        // it may share storage, and a bucket may be summed in place: a copy makes it ours.
        let fresh = self.hand_step() && self.dtype != DType::F32;
        let mut grads: Vec<Option<Tensor>> = vec![None; n];
        let mut losses = Vec::with_capacity(accum);
        for j in 0..accum {
            let micro = self.step * accum + j;
            let idx = self.batch_indices(micro, micro_size, data.len());
            // Every rank draws the whole global batch (cheap host work) and keeps its rows.
            let mut batch = self.make_batch(data, &idx)?;
            if world > 1 {
                batch = batch.rows(rank * local, local)?;
            }
            let loss = match group.filter(|_| world > 1 && j + 1 == accum) {
                Some(g) => {
                    let cap = dist::bucket_bytes(self.cfg.bucket_mb);
                    let mut buckets = dist::BucketReducer::new(g, n, cap);
                    let loss = self.grads_into(&batch, divisor, &mut |i, gi| {
                        let gi = match grads[i].take() {
                            Some(acc) => (acc + gi)?,
                            None if fresh => gi,
                            None => gi.copy()?,
                        };
                        buckets.push(i, gi)
                    })?;
                    grads = buckets.finish()?;
                    loss
                }
                None => self.grads_into(&batch, divisor, &mut |i, gi| {
                    grads[i] = Some(match grads[i].take() {
                        Some(acc) => (acc + gi)?,
                        None => gi,
                    });
                    Ok(())
                })?,
            };
            losses.push(loss.to_dtype(DType::F32)?.reshape(1)?);
        }
        let grads = self.received(grads)?;
        Ok((grads, losses))
    }

    /// Every parameter's gradient, or an error naming one that received none.
    fn received(&self, grads: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        grads
            .into_iter()
            .zip(&self.names)
            .map(|(g, name)| g.with_context(|| format!("parameter {name} received no gradient")))
            .collect()
    }

    /// Whether this trainer's steps take the hand-written backward ([`StepKind`]).
    pub fn hand_step(&self) -> bool {
        match self.cfg.step_kind {
            StepKind::Auto => self.device.is_cuda() && self.model_cfg.control.is_none(),
            StepKind::Autograd => false,
            StepKind::Hand => true,
        }
    }

    /// A micro-batch's mean cross entropy and the f32 gradients of `loss / divisor`, one per
    /// parameter in order, by the step [`Trainer::hand_step`] picks.
    pub fn loss_and_grads(&mut self, batch: &Batch, divisor: f64) -> Result<(Tensor, Vec<Tensor>)> {
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let loss = self.grads_into(batch, divisor, &mut |i, g| {
            grads[i] = Some(g);
            Ok(())
        })?;
        let grads = self.received(grads)?;
        Ok((loss, grads))
    }

    /// [`Trainer::loss_and_grads`], handing each parameter's f32 gradient to `sink` (by its
    /// index, every parameter once) as soon as it is final: during the hand-written backward
    /// (each one traced as `arpg::train::grads`), after autograd's.
    fn grads_into(
        &mut self,
        batch: &Batch,
        divisor: f64,
        sink: &mut dyn FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        if !self.hand_step() {
            let loss = {
                let _enter = tracing::trace_span!("train.forward").entered();
                self.loss(batch)?
            };
            let _enter = tracing::trace_span!("train.backward").entered();
            let g = (&loss / divisor)?.backward()?;
            for (i, (p, name)) in self.params.iter().zip(&self.names).enumerate() {
                let gi = g
                    .get(p)
                    .cloned()
                    .with_context(|| format!("parameter {name} received no gradient"))?;
                sink(i, gi)?;
            }
            return Ok(loss);
        }
        ensure!(
            batch.control.is_none(),
            "the hand-written training step has no control encoder (use --step autograd)"
        );
        let _enter = tracing::trace_span!("train.hand_step").entered();
        let model = self.model_with(true)?;
        let drop = self.draw_dropout();
        let pos = Positions {
            keys: &batch.keys,
            queries: &batch.queries,
            control: None,
        };
        let scale = 1.0 / divisor;
        let index: HashMap<&str, usize> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut seen = vec![false; self.names.len()];
        let mut report = |name: &str, g: Tensor| -> Result<()> {
            let &i = index
                .get(name)
                .with_context(|| format!("the backward reported {name}, not a parameter"))?;
            ensure!(!seen[i], "the backward reported {name} twice");
            seen[i] = true;
            tracing::trace!(target: "arpg::train::grads", param = name, "gradient final");
            sink(i, crate::kernels::widen::to_f32(&g)?)
        };
        let out = model.loss_and_grads_with(
            &batch.tokens,
            pos,
            &batch.targets,
            scale,
            drop,
            Some(&mut report),
        )?;
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!("parameter {} received no gradient", self.names[i]);
        }
        Ok(out.loss)
    }

    /// This micro-batch's dropout: a seed from the trainer's generator (one draw, so runs
    /// and resumed runs repeat), `None` without dropout.
    fn draw_dropout(&mut self) -> Option<Dropout> {
        (self.cfg.dropout > 0.0).then(|| Dropout {
            p: self.cfg.dropout,
            seed: self.drop_rng.random::<u64>(),
        })
    }

    /// Mean cross entropy of a batch, with dropout as configured (a differentiable graph).
    pub fn loss(&mut self, batch: &Batch) -> Result<Tensor> {
        let model = self.model()?;
        let p = self.cfg.dropout;
        let hashed = match self.hashed_masks {
            true => self.draw_dropout(),
            false => None,
        };
        let (dev, rng) = (self.device.clone(), &mut self.drop_rng);
        let mut site = 0usize;
        let mut apply = |x: &Tensor| -> Result<Tensor> {
            let Some(d) = hashed else {
                return dropout(x, p, rng, &dev);
            };
            // The hand-written step's masks, materialised: the same sites in the same order.
            site += 1;
            let m = dropout::mask(x.shape(), x.dtype(), &dev, d.site(site - 1))?;
            Ok((x * m)?)
        };
        let mut mode = Mode {
            differentiable: true,
            dropout: if p > 0.0 { Some(&mut apply) } else { None },
        };
        let table = match &batch.control {
            Some((cond, keep)) => Some(model.control_queries(cond, Some(keep), &mut mode)?),
            None => None,
        };
        let logits = model.forward(
            &batch.tokens,
            Positions {
                keys: &batch.keys,
                queries: &batch.queries,
                control: table.as_ref(),
            },
            &mut mode,
        )?;
        Ok(candle_nn::loss::cross_entropy(
            &logits.flatten_to(1)?,
            &batch.targets,
        )?)
    }

    /// Inputs, positions and targets of a teacher-forced batch of samples `idx`, each in a
    /// fresh random order (and with class dropout).
    pub fn make_batch(&mut self, data: &Packed, idx: &[usize]) -> Result<Batch> {
        let mc = &self.model_cfg;
        let l = mc.block_size;
        let b = idx.len();
        // A control model reads each sample's condition; its dropout draws after the class's.
        let control = match &mc.control {
            Some(c) => {
                let want = mc.control_shape().expect("a control block");
                ensure!(
                    data.condition_shape() == Some(want),
                    "{}: the model's control encoder takes {want:?} conditions, the data has {}",
                    data.path.display(),
                    match data.condition_shape() {
                        Some(s) => format!("{s:?}"),
                        None => "none (pack it with --control)".into(),
                    }
                );
                Some((c.dropout, want))
            }
            None => None,
        };
        let mut conds: Vec<u8> = Vec::new();
        let mut keep: Vec<f32> = Vec::new();
        // Per sample, in the generator's order: crop, class drop, control drop, order.
        let mut seqs: Vec<(u32, Vec<u32>, Vec<usize>)> = Vec::with_capacity(b);
        for &i in idx {
            let crop = self.rng.random_range(0..data.n_crops(i));
            let t = data.tokens(i, crop);
            let label = data.label(i) as usize;
            ensure!(
                label < mc.num_classes,
                "{}: label {label} >= num_classes {}",
                data.path.display(),
                mc.num_classes
            );
            let drop_class = self.rng.random::<f64>() < self.cfg.class_dropout;
            let first = if drop_class {
                mc.null_class_token()
            } else {
                mc.class_token(label)
            };
            if let Some((rate, _)) = control {
                let dropped = rate > 0.0 && self.rng.random::<f64>() < rate;
                keep.push(if dropped { 0.0 } else { 1.0 });
                conds.extend_from_slice(data.condition(i, crop));
            }
            let mut order: Vec<usize> = (0..l).collect();
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut self.rng);
            if let Some(&tok) = t.iter().find(|&&x| x as usize >= mc.vocab_size) {
                bail!(
                    "{}: token {tok} >= vocab_size {}",
                    data.path.display(),
                    mc.vocab_size
                );
            }
            seqs.push((first, t.iter().map(|&x| x as u32).collect(), order));
        }
        let d = &self.device;
        let views: Vec<TeacherSeq> = seqs
            .iter()
            .map(|(first, raster, order)| TeacherSeq {
                first: *first,
                raster,
                order,
            })
            .collect();
        let mut batch = Batch::teacher_forced(&views, d)?;
        batch.control = match control {
            Some((_, (c, h, w))) => {
                let cond = Tensor::from_vec(conds, (b, c, h, w), d)?.to_dtype(DType::F32)?;
                Some(((cond / 255.0)?, Tensor::from_vec(keep, b, d)?))
            }
            None => None,
        };
        Ok(batch)
    }

    /// Inference weights in the official key layout: the EMA if kept, else the model.
    pub fn export_weights(&self) -> HashMap<String, Tensor> {
        let src: Vec<Tensor> = match &self.ema {
            Some(e) => e.clone(),
            None => self.params.iter().map(|p| p.as_tensor().clone()).collect(),
        };
        self.names.iter().cloned().zip(src).collect()
    }

    /// Everything needed to continue bit for bit: weights, EMA, optimizer moments, step,
    /// RNG position and both configs. Written atomically. Under ZeRO-1 the moments are spread
    /// over the ranks: use [`Self::checkpoint`] on every rank instead.
    pub fn save(&self, path: &Path) -> Result<()> {
        ensure!(
            self.owners.is_none(),
            "under ZeRO-1 every rank must take part in a checkpoint (Trainer::checkpoint)"
        );
        self.write(path, &self.opt.m, &self.opt.v)
    }

    /// A checkpoint taken by every rank at the same step: under ZeRO-1 the moments are first
    /// gathered from their owners (a collective); the rank given a `path` (rank 0) writes it.
    pub fn checkpoint(&mut self, path: Option<&Path>) -> Result<()> {
        let (Some(owners), Some(g)) = (&self.owners, &self.group) else {
            return match path {
                Some(p) => self.save(p),
                None => Ok(()),
            };
        };
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, p) in self.params.iter().enumerate() {
            let mine = owners[i] == g.rank();
            for (src, dst) in [(&self.opt.m[i], &mut m), (&self.opt.v[i], &mut v)] {
                let local = match mine {
                    true => src.clone(),
                    false => p.as_tensor().zeros_like()?,
                };
                let full = g.broadcast(&local, owners[i])?;
                // Only the writer keeps the gathered moments.
                if path.is_some() {
                    dst.push(full);
                }
            }
        }
        match path {
            Some(p) => self.write(p, &m, &v),
            None => Ok(()),
        }
    }

    fn write(&self, path: &Path, m: &[Tensor], v: &[Tensor]) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            t.insert(format!("model.{n}"), self.params[i].as_tensor().clone());
            t.insert(format!("optim.m.{n}"), m[i].clone());
            t.insert(format!("optim.v.{n}"), v[i].clone());
            if let Some(e) = &self.ema {
                t.insert(format!("ema.{n}"), e[i].clone());
            }
        }
        let meta: HashMap<String, String> = [
            ("format", "arpg-train-v1".to_string()),
            ("step", self.step.to_string()),
            ("optim_t", self.opt.t.to_string()),
            ("rng_word_pos", self.rng.get_word_pos().to_string()),
            (
                "drop_rng_word_pos",
                self.drop_rng.get_word_pos().to_string(),
            ),
            ("model_config", serde_json::to_string(&self.model_cfg)?),
            ("train_config", serde_json::to_string(&self.cfg)?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        crate::checkpoint::save_safetensors_with_metadata(&t, meta, path)
    }

    /// Continue from a checkpoint written by [`Trainer::save`]. `cfg` may change the schedule
    /// length; the model configuration must match.
    pub fn resume(
        path: &Path,
        cfg: Option<&TrainConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (tensors, meta) = crate::checkpoint::load_safetensors_with_metadata(path)?;
        let get = |k: &str| {
            meta.get(k)
                .map(String::as_str)
                .with_context(|| format!("{}: not a training checkpoint (no {k})", path.display()))
        };
        let num = |k: &str| -> Result<u64> {
            let v = get(k)?;
            v.parse().with_context(|| {
                format!(
                    "{}: metadata {k} = {v:?} is not a non-negative integer",
                    path.display()
                )
            })
        };
        let bad = |k: &str| format!("{}: metadata {k} is invalid", path.display());
        let model_cfg: ArpgConfig =
            serde_json::from_str(get("model_config")?).with_context(|| bad("model_config"))?;
        model_cfg.validate().with_context(|| bad("model_config"))?;
        let saved: TrainConfig =
            serde_json::from_str(get("train_config")?).with_context(|| bad("train_config"))?;
        let tc = cfg.cloned().unwrap_or(saved);
        let mut tr = Self::new(&model_cfg, &tc, dtype, device)?;
        let take = |k: String, want: &[usize]| -> Result<Tensor> {
            let t = tensors
                .get(&k)
                .with_context(|| format!("{}: missing {k}", path.display()))?;
            ensure!(
                t.dims() == want,
                "{}: {k} has shape {:?}, the model config {want:?}",
                path.display(),
                t.dims()
            );
            let finite = t
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                .is_finite();
            ensure!(finite, "{}: {k} holds NaN or Inf", path.display());
            Ok(t.to_device(device)?)
        };
        for i in 0..tr.names.len() {
            let n = tr.names[i].clone();
            let dims = tr.params[i].dims().to_vec();
            tr.params[i].set(&take(format!("model.{n}"), &dims)?)?;
            tr.opt.m[i] = take(format!("optim.m.{n}"), &dims)?;
            tr.opt.v[i] = take(format!("optim.v.{n}"), &dims)?;
            if let Some(e) = tr.ema.as_mut() {
                e[i] = match tensors.contains_key(&format!("ema.{n}")) {
                    true => take(format!("ema.{n}"), &dims)?,
                    false => take(format!("model.{n}"), &dims)?,
                };
            }
        }
        tr.step = usize::try_from(num("step")?)?;
        tr.opt.t = usize::try_from(num("optim_t")?)?;
        let word = |k: &str| -> Result<u128> {
            let v = get(k)?;
            v.parse().with_context(|| {
                format!("{}: metadata {k} = {v:?} is not an integer", path.display())
            })
        };
        tr.rng.set_word_pos(word("rng_word_pos")?);
        tr.drop_rng.set_word_pos(word("drop_rng_word_pos")?);
        Ok(tr)
    }

    /// Start from the weights of an inference checkpoint (`.pt` or `.safetensors`, official
    /// key layout), e.g. a class-conditional model before training a control encoder on
    /// it: every parameter must be there with its shape, except the `control.` ones, which
    /// stay freshly initialised; a key the model does not have is an error. Returns the
    /// names left fresh.
    pub fn init_from(&mut self, path: &Path) -> Result<Vec<String>> {
        let sd = crate::checkpoint::StateDict::load(path, crate::checkpoint::Weights::Model)?;
        let mut fresh = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            let Some(t) = sd.tensors.get(n) else {
                ensure!(
                    n.starts_with("control."),
                    "--init-from {}: no weight {n} (is it a checkpoint of this model?)",
                    path.display()
                );
                fresh.push(n.clone());
                continue;
            };
            ensure!(
                t.dims() == self.params[i].dims(),
                "--init-from {}: {n} has shape {:?}, the model {:?}",
                path.display(),
                t.dims(),
                self.params[i].dims()
            );
            self.params[i].set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        if let Some(extra) = sd.tensors.keys().find(|k| !self.names.contains(k)) {
            bail!(
                "--init-from {}: weight {extra} does not belong to this model config",
                path.display()
            );
        }
        if let Some(ema) = self.ema.as_mut() {
            for (e, p) in ema.iter_mut().zip(&self.params) {
                *e = p.as_tensor().copy()?;
            }
        }
        ensure!(
            self.non_finite_parameter()?.is_none(),
            "--init-from {}: a weight holds NaN or Inf",
            path.display()
        );
        Ok(fresh)
    }

    /// The master parameters, by name (for tests and export).
    pub fn parameters(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.names.iter().zip(&self.params)
    }
}

/// The autograd path's own dropout (unless [`Trainer::hashed_masks`]): on the CPU the mask
/// comes from our seeded generator element by element, so runs (and resumed runs) repeat bit
/// for bit, as the shipped digits model's run does; on GPUs from the device's generator.
fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if device.is_cpu() {
        let n = x.elem_count();
        let scale = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
            .collect();
        let m = Tensor::from_vec(mask, x.shape(), device)?.to_dtype(x.dtype())?;
        Ok((x * m)?)
    } else {
        Ok(candle_nn::ops::dropout(x, p as f32)?)
    }
}

/// A trainer of `cfg` on `device` whose every weight is random (a fresh head is zero and the
/// norms one: their gradients would test little) at about the paper's initial scale (std
/// 0.02; norms 1 +- 0.1), and a teacher-forced batch of `b` random sequences in shuffled
/// orders: what the hand-written step is checked on. The same weights and batch whatever
/// the compute dtype.
fn random_trainer(
    cfg: &ArpgConfig,
    dropout: f64,
    b: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Trainer, Batch)> {
    let tc = TrainConfig {
        dropout,
        batch_size: b,
        ..Default::default()
    };
    let tr = Trainer::new(cfg, &tc, dtype, device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, v) in tr.parameters() {
        let (base, half) = match name.ends_with("norm.weight") {
            true => (1.0, 0.1),
            false => (0.0, 0.02 * 3f32.sqrt()),
        };
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| base + half * (2.0 * rng.random::<f32>() - 1.0))
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), device)?)?;
    }
    let l = cfg.block_size;
    let raster: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            (0..l)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect()
        })
        .collect();
    let orders: Vec<Vec<usize>> = (0..b)
        .map(|_| {
            let mut o: Vec<usize> = (0..l).collect();
            o.shuffle(&mut rng);
            o
        })
        .collect();
    let seqs: Vec<TeacherSeq> = (0..b)
        .map(|s| TeacherSeq {
            first: cfg.class_token(s % cfg.num_classes),
            raster: &raster[s],
            order: &orders[s],
        })
        .collect();
    let batch = Batch::teacher_forced(&seqs, device)?;
    Ok((tr, batch))
}

/// One random batch's loss and gradients by `kind` in `dtype` (f32 gradients, names in
/// order); the dropout masks come from the trainer's seeded CPU generator.
fn random_step(
    cfg: &ArpgConfig,
    dropout: f64,
    b: usize,
    dtype: DType,
    device: &Device,
    kind: StepKind,
) -> Result<(f64, Vec<(String, Tensor)>)> {
    let (mut tr, batch) = random_trainer(cfg, dropout, b, dtype, device)?;
    tr.cfg.step_kind = kind;
    tr.hashed_masks = true;
    let (loss, grads) = tr.loss_and_grads(&batch, 2.0)?;
    let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((loss, tr.names.iter().cloned().zip(grads).collect()))
}

/// [`hand_step_check`]'s findings.
#[derive(Debug, Clone, Serialize)]
pub struct HandStepCheck {
    /// The losses' relative difference, hand against autograd.
    pub loss_rel_diff: f64,
    /// Per parameter, worst first: the gradients' relative difference (hand against
    /// autograd), then each one's against autograd one precision up (f64 for f32, f32 for
    /// bf16): `(name, hand vs autograd, hand vs truth, autograd vs truth)`.
    pub worst: Vec<(String, f64, f64, f64)>,
}

impl HandStepCheck {
    /// Where the hand step falls short: a gradient over `tol` from autograd's and further
    /// from the higher-precision gradient than autograd's is (otherwise autograd is the one
    /// off: it sums the embedding's gradient in bf16, for one).
    pub fn failures(&self, tol: f64) -> Vec<String> {
        let mut out = Vec::new();
        if self.loss_rel_diff.is_nan() || self.loss_rel_diff > tol {
            out.push(format!("loss {:.3e} > {tol:.0e}", self.loss_rel_diff));
        }
        for (name, d, eh, ea) in &self.worst {
            if d.is_nan() || eh.is_nan() || (*d > tol && eh > ea) {
                out.push(format!(
                    "{name} {d:.3e} > {tol:.0e} (against the next precision up: {eh:.3e}, autograd {ea:.3e})"
                ));
            }
        }
        out
    }
}

/// The hand-written step against autograd on ARPG-L-shaped layers (dim 1024, 16 heads,
/// vocabulary 16,384, 256 cells; one self- and one cross-attention block), batch 2, dropout
/// 0, in `dtype`, and both against autograd one precision up. CUDA only.
pub fn hand_step_check(dtype: DType, device: &Device) -> Result<Option<HandStepCheck>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    let cfg = ArpgConfig {
        n_layer: 2,
        ..ArpgConfig::preset("ARPG-L")?
    };
    hand_step_against(&cfg, 0.0, 2, dtype, device).map(Some)
}

/// [`hand_step_check`] for any model, dropout, batch and device: both steps on the same
/// random batch, weights and dropout masks, and autograd one precision up.
fn hand_step_against(
    cfg: &ArpgConfig,
    dropout: f64,
    b: usize,
    dtype: DType,
    device: &Device,
) -> Result<HandStepCheck> {
    let up = if dtype == DType::F32 {
        DType::F64
    } else {
        DType::F32
    };
    let (_, truth) = random_step(cfg, dropout, b, up, device, StepKind::Autograd)?;
    let (lh, hand) = random_step(cfg, dropout, b, dtype, device, StepKind::Hand)?;
    let (la, auto) = random_step(cfg, dropout, b, dtype, device, StepKind::Autograd)?;
    let mut worst = Vec::with_capacity(truth.len());
    for (((name, t), (_, h)), (_, a)) in truth.iter().zip(&hand).zip(&auto) {
        ensure!(
            a.dims() == h.dims(),
            "{name}: {:?} vs {:?}",
            a.dims(),
            h.dims()
        );
        let t = t.to_dtype(DType::F32)?;
        let rel = crate::kernels::rel_diff;
        worst.push((name.clone(), rel(h, a)?, rel(h, &t)?, rel(a, &t)?));
    }
    worst.sort_by(|x, y| y.1.total_cmp(&x.1));
    Ok(HandStepCheck {
        loss_rel_diff: (la - lh).abs() / la.abs().max(1e-12),
        worst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rel_diff;

    #[test]
    fn the_hand_written_step_gives_autograds_loss_and_gradients() {
        for (abs_pos_embed, dropout) in [(false, 0.0), (true, 0.2)] {
            let cfg = ArpgConfig {
                abs_pos_embed,
                ..crate::zoo::digits_config()
            };
            let c = hand_step_against(&cfg, dropout, 3, DType::F32, &Device::Cpu).unwrap();
            let dl = c.loss_rel_diff;
            assert!(dl < 1e-6, "loss relative difference {dl:e}");
            let n = Arpg::parameter_shapes(&cfg).unwrap().len();
            assert_eq!(c.worst.len(), n, "every parameter compared");
            for (name, r, _, _) in c.worst {
                assert!(
                    r < 1e-5,
                    "{name}: relative difference {r:e} (dropout {dropout})"
                );
            }
        }
    }

    #[test]
    fn the_check_passes_the_hand_step_and_holds_it_to_the_next_precision() {
        let cfg = crate::zoo::digits_config();
        let c = hand_step_against(&cfg, 0.0, 2, DType::F32, &Device::Cpu).unwrap();
        assert!(c.failures(1e-5).is_empty(), "{:?}", c.failures(1e-5));
        // Both within 1e-5 of the f64 gradients.
        assert!(
            c.worst.iter().all(|w| w.2 < 1e-5 && w.3 < 1e-5),
            "{:?}",
            c.worst[0]
        );
        let off = HandStepCheck {
            loss_rel_diff: 0.0,
            worst: vec![
                ("w".into(), 0.05, 0.04, 0.01),
                ("e".into(), 0.05, 0.01, 0.04),
            ],
        };
        assert_eq!(
            off.failures(2e-2).len(),
            1,
            "only the hand step's own error fails"
        );
    }

    #[test]
    fn the_hand_backward_reports_each_gradient_once_when_final_as_it_returns_it() {
        for abs_pos_embed in [true, false] {
            let cfg = ArpgConfig {
                abs_pos_embed,
                ..crate::zoo::digits_config()
            };
            let (tr, batch) = random_trainer(&cfg, 0.2, 3, DType::F32, &Device::Cpu).unwrap();
            let model = tr.model_with(true).unwrap();
            let pos = || Positions {
                keys: &batch.keys,
                queries: &batch.queries,
                control: None,
            };
            let drop = Some(Dropout { p: 0.2, seed: 11 });
            let (tokens, targets) = (&batch.tokens, &batch.targets);
            let plain = model
                .loss_and_grads(tokens, pos(), targets, 0.5, drop)
                .unwrap();
            let mut reported: Vec<(String, Tensor)> = Vec::new();
            let mut sink = |name: &str, g: Tensor| -> Result<()> {
                reported.push((name.to_string(), g));
                Ok(())
            };
            let sunk = model
                .loss_and_grads_with(tokens, pos(), targets, 0.5, drop, Some(&mut sink))
                .unwrap();
            assert!(sunk.grads.is_empty(), "the sink took every gradient");
            let loss = |t: &Tensor| t.to_scalar::<f32>().unwrap();
            assert_eq!(loss(&sunk.loss), loss(&plain.loss));
            let names: Vec<&str> = reported.iter().map(|r| r.0.as_str()).collect();
            let mut once = names.clone();
            once.sort_unstable();
            once.dedup();
            assert_eq!(
                once.len(),
                names.len(),
                "a gradient reported twice: {names:?}"
            );
            let mut params: Vec<&str> = tr.names.iter().map(String::as_str).collect();
            params.sort_unstable();
            assert_eq!(once, params, "every parameter reported");
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (name, g) in &reported {
                assert!(flat(g) == flat(&plain.grads[name]), "{name} differs");
            }
            // The order the backward finishes them: the output first, the blocks from the
            // last to the first, the shared keys and values after every cross block (their
            // last use), the embeddings (used by both passes) last.
            let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
            assert_eq!(names[0], "head.weight");
            let last = match abs_pos_embed {
                true => ["embeddings.weight", "pos_embeddings.weight"],
                false => ["layers.self_dec.0.attn_norm.weight", "embeddings.weight"],
            };
            assert_eq!(names[names.len() - 2..], last, "{names:?}");
            let (k, v) = (at("layers.to_k.weight"), at("layers.to_v.weight"));
            for (i, n) in names.iter().enumerate() {
                if n.starts_with("layers.cross_dec.") {
                    assert!(i < k.min(v), "{n} after the shared keys: {names:?}");
                }
                if n.starts_with("layers.self_dec.") {
                    assert!(i > k.max(v), "{n} before the shared keys: {names:?}");
                }
            }
            let block = |pass: &str, b: usize| at(&format!("layers.{pass}.{b}.ffn.w2.weight"));
            assert!(block("cross_dec", 1) < block("cross_dec", 0));
            assert!(block("self_dec", 1) < block("self_dec", 0));
        }
    }

    #[test]
    fn a_wrong_gradient_fails_the_comparison() {
        // The check above must be able to fail: one weight's gradient scaled by 1.001.
        let cfg = crate::zoo::digits_config();
        let (mut tr, batch) = random_trainer(&cfg, 0.0, 3, DType::F32, &Device::Cpu).unwrap();
        tr.cfg.step_kind = StepKind::Autograd;
        let (_, ga) = tr.loss_and_grads(&batch, 1.0).unwrap();
        let off = (&ga[3] * 1.001).unwrap();
        assert!(rel_diff(&off, &ga[3]).unwrap() > 1e-5);
    }
}
