//! The model worker: one thread owns the model, takes jobs from a bounded queue, decodes
//! compatible ones together in one batch and streams each job's progress back.
//!
//! Batching rule: jobs with the same [`Key`] (kind, decoding settings, known-token count) that
//! are queued when the worker picks the oldest one, or arrive within the batch window after
//! it, are decoded in one forward batch of at most `max_batch` images; other keys wait their
//! turn in arrival order. Each job draws its orders and tokens from its own generator, seeded
//! from the request's seed (see [`decode_groups`]), so its images do not depend on the batch.

use crate::metrics::Metrics;
use anyhow::{Context, Result};
use arpg::editor::{fill_canvas, Canvas};
use arpg::model::Arpg;
use arpg::sampler::{self, random_order, Request, Rows, SampleConfig};
use arpg::tokenizer::ImageTokenizer;
use candle_core::Device;
use image::RgbImage;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Images `arpg sample` decodes per forward batch by default: a generation request is cut
/// into chunks of this many images, each drawing its order first, as `arpg sample` does, so
/// that the same seed gives the same images.
pub const SAMPLE_CHUNK: usize = 16;

/// What the model side holds.
pub struct Engine {
    pub model: Arpg,
    pub tokenizer: ImageTokenizer,
    pub device: Device,
}

/// A job's progress, streamed to its HTTP handler.
#[derive(Debug)]
pub enum Event {
    /// The worker started the job's batch (`batch` images in it).
    Started { batch: usize },
    /// A decoding step finished: `step` of `steps` for chunk `chunk` of `chunks`.
    Step {
        step: usize,
        steps: usize,
        chunk: usize,
        chunks: usize,
    },
    /// Finished images with their classes.
    Images(Vec<(usize, RgbImage)>),
    /// Every image was sent.
    Done,
    /// The job failed (the message is safe to show).
    Failed(String),
}

/// What a job decodes.
pub enum Work {
    /// Class-conditional sampling: chunks of class ids, decoded one after the other.
    Generate {
        chunks: VecDeque<Vec<usize>>,
        order_per_sample: bool,
    },
    /// Decode the unknown cells of a model-sized canvas, `samples` times.
    Inpaint {
        class: usize,
        samples: usize,
        known: Vec<(usize, u32)>,
        unknown: Vec<usize>,
    },
    /// Fill a larger canvas by sliding windows, `samples` times (never batched).
    Outpaint {
        class: usize,
        samples: usize,
        canvas: Canvas,
    },
}

/// Batching key: jobs decode together only when all of these agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    kind: &'static str,
    steps: usize,
    schedule: String,
    cfg: u32,
    cfg_schedule: String,
    temperature: u32,
    top_k: usize,
    top_p: u32,
    n_known: usize,
    /// 0 without a condition, 1 guided over it, 2 guided over the class alone: one batch
    /// shares one guidance rule.
    control: u8,
    /// Outpainting jobs are never batched: their own id.
    solo: u64,
}

pub struct Job {
    pub id: u64,
    pub work: Work,
    pub sc: SampleConfig,
    pub rng: ChaCha8Rng,
    pub tx: UnboundedSender<Event>,
    /// Set when the client went away or the request timed out: the job is dropped.
    pub cancel: Arc<AtomicBool>,
    pub enqueued: Instant,
    /// Test hook: panic inside the worker while decoding this job.
    pub panic: bool,
    /// A control model's condition `[1, C, H, W]` for every image of the job, and whether
    /// guidance acts on it.
    pub condition: Option<(candle_core::Tensor, bool)>,
    chunks_total: usize,
}

impl Job {
    pub fn new(
        id: u64,
        work: Work,
        sc: SampleConfig,
        seed: u64,
        tx: UnboundedSender<Event>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let chunks_total = match &work {
            Work::Generate { chunks, .. } => chunks.len(),
            _ => 1,
        };
        Self {
            id,
            work,
            sc,
            rng: <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed),
            tx,
            cancel,
            enqueued: Instant::now(),
            panic: false,
            condition: None,
            chunks_total,
        }
    }

    /// Effective decoding settings (inpainting caps the steps at the unknown count, as
    /// `arpg inpaint` does).
    fn settings(&self) -> SampleConfig {
        match &self.work {
            Work::Inpaint { unknown, .. } => SampleConfig {
                steps: self.sc.steps.min(unknown.len()),
                ..self.sc.clone()
            },
            _ => self.sc.clone(),
        }
    }

    fn key(&self) -> Key {
        let sc = self.settings();
        let (kind, n_known, solo) = match &self.work {
            Work::Generate { .. } => ("generate", 0, 0),
            Work::Inpaint { known, .. } => ("inpaint", known.len(), 0),
            Work::Outpaint { .. } => ("outpaint", 0, self.id + 1),
        };
        Key {
            kind,
            steps: sc.steps,
            schedule: format!("{:?}", sc.schedule),
            cfg: sc.cfg.to_bits(),
            cfg_schedule: format!("{:?}", sc.cfg_schedule),
            temperature: sc.filter.temperature.to_bits(),
            top_k: sc.filter.top_k,
            top_p: sc.filter.top_p.to_bits(),
            n_known,
            control: match &self.condition {
                None => 0,
                Some((_, true)) => 1,
                Some((_, false)) => 2,
            },
            solo,
        }
    }

    /// Images the job's next batch unit decodes.
    fn head_images(&self) -> usize {
        match &self.work {
            Work::Generate { chunks, .. } => chunks.front().map_or(0, |c| c.len()),
            Work::Inpaint { samples, .. } | Work::Outpaint { samples, .. } => *samples,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum Refused {
    Full,
    ShuttingDown,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The bounded job queue shared by the handlers and the worker.
pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    pub max_len: usize,
    pub window: Duration,
    pub max_batch: usize,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(max_len: usize, window: Duration, max_batch: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            max_len,
            window,
            max_batch,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queue inconsistent (every change is
        // one push or pop), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn submit(&self, job: Job) -> std::result::Result<(), Refused> {
        let mut s = self.lock();
        if s.closed {
            return Err(Refused::ShuttingDown);
        }
        if s.jobs.len() >= self.max_len {
            return Err(Refused::Full);
        }
        s.jobs.push_back(job);
        self.metrics.set_queue_depth(s.jobs.len());
        self.wake.notify_all();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stop taking jobs; the worker finishes those queued, then returns.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Jobs put back with work left (later chunks), ahead of newer ones.
    fn requeue_front(&self, jobs: Vec<Job>) {
        let mut s = self.lock();
        for j in jobs.into_iter().rev() {
            s.jobs.push_front(j);
        }
        self.metrics.set_queue_depth(s.jobs.len());
    }

    /// The next batch: the oldest job and every queued job with its key, up to `max_batch`
    /// images, waiting up to the batch window after the oldest job arrived for more to come.
    /// `None` once closed and empty.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut s = self.lock();
        loop {
            s.jobs.retain(|j| {
                let gone = j.cancelled();
                if gone {
                    let _ = j.tx.send(Event::Failed("cancelled".into()));
                }
                !gone
            });
            self.metrics.set_queue_depth(s.jobs.len());
            if let Some(first) = s.jobs.front() {
                let key = first.key();
                let deadline = first.enqueued + self.window;
                let fits = |s: &State| {
                    let mut n = 0;
                    for j in s.jobs.iter().filter(|j| j.key() == key) {
                        n += j.head_images();
                    }
                    n >= self.max_batch
                };
                let now = Instant::now();
                if now < deadline && !fits(&s) && !s.closed && key.solo == 0 {
                    s = self
                        .wake
                        .wait_timeout(s, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                let mut batch = Vec::new();
                let mut images = 0;
                let mut rest = VecDeque::new();
                while let Some(j) = s.jobs.pop_front() {
                    let n = j.head_images();
                    if j.key() == key && (batch.is_empty() || images + n <= self.max_batch) {
                        images += n;
                        batch.push(j);
                        if key.solo != 0 {
                            break;
                        }
                    } else {
                        rest.push_back(j);
                    }
                }
                rest.extend(s.jobs.drain(..));
                s.jobs = rest;
                self.metrics.set_queue_depth(s.jobs.len());
                return Some(batch);
            }
            if s.closed {
                return None;
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The worker loop: runs until the queue is closed and drained.
pub fn work(engine: Arc<Engine>, queue: Arc<Queue>, metrics: Arc<Metrics>) {
    while let Some(mut batch) = queue.next_batch() {
        let images: usize = batch.iter().map(|j| j.head_images()).sum();
        metrics.observe_batch(images);
        for j in &batch {
            let _ = j.tx.send(Event::Started { batch: images });
        }
        let t = Instant::now();
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| run_batch(&engine, &mut batch)));
        let made = match run {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!("batch failed: {e:#}");
                for j in batch.drain(..) {
                    let _ = j.tx.send(Event::Failed(format!("{e:#}")));
                }
                0
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                tracing::error!("a batch panicked: {msg}");
                metrics.count_panic();
                for j in batch.drain(..) {
                    let _ =
                        j.tx.send(Event::Failed(format!("internal error (panic): {msg}")));
                }
                0
            }
        };
        metrics.observe_images(made, t.elapsed());
        let mut again = Vec::new();
        for j in batch {
            let more = matches!(&j.work, Work::Generate { chunks, .. } if !chunks.is_empty());
            if more && !j.cancelled() {
                again.push(j);
            } else if !more {
                let _ = j.tx.send(Event::Done);
            }
        }
        queue.requeue_front(again);
    }
}

/// One batch unit per job: returns the images made.
fn run_batch(engine: &Engine, batch: &mut [Job]) -> Result<usize> {
    if batch.iter().any(|j| j.panic) {
        panic!("test hook: a panic while decoding");
    }
    let g = engine.model.config().grid_size();
    if let [job] = batch {
        if let Work::Outpaint {
            class,
            samples,
            canvas,
        } = &job.work
        {
            let mut made = 0;
            for i in 0..*samples {
                let filled = fill_canvas(&engine.model, canvas, *class, &job.sc, &mut job.rng)?;
                let toks = filled
                    .tokens()
                    .context("window filling left a cell unknown")?;
                let im =
                    engine
                        .tokenizer
                        .decode(&[toks], (canvas.rows, canvas.cols), &engine.device)?;
                let _ = job.tx.send(Event::Step {
                    step: i + 1,
                    steps: *samples,
                    chunk: 1,
                    chunks: 1,
                });
                let _ = job
                    .tx
                    .send(Event::Images(im.into_iter().map(|m| (*class, m)).collect()));
                made += 1;
            }
            return Ok(made);
        }
    }
    // Every job's next unit: its sequences (class, known tokens, order), drawn from its own
    // generator in the order `arpg sample` / `arpg inpaint` draw them.
    let sc = batch[0].settings();
    let mut units: Vec<Unit> = Vec::with_capacity(batch.len());
    for job in batch.iter_mut() {
        let chunk_no = job.chunks_total
            - match &job.work {
                Work::Generate { chunks, .. } => chunks.len(),
                _ => 1,
            }
            + 1;
        let unit = match &mut job.work {
            Work::Generate {
                chunks,
                order_per_sample,
            } => {
                let classes = chunks.pop_front().context("no chunk left")?;
                let all: Vec<usize> = (0..g * g).collect();
                let orders = if *order_per_sample {
                    classes
                        .iter()
                        .map(|_| random_order(&all, &mut job.rng))
                        .collect()
                } else {
                    vec![random_order(&all, &mut job.rng); classes.len()]
                };
                Unit {
                    known: vec![vec![]; classes.len()],
                    classes,
                    orders,
                    chunk: chunk_no,
                }
            }
            Work::Inpaint {
                class,
                samples,
                known,
                unknown,
            } => Unit {
                classes: vec![*class; *samples],
                known: vec![known.clone(); *samples],
                orders: (0..*samples)
                    .map(|_| random_order(unknown, &mut job.rng))
                    .collect(),
                chunk: 1,
            },
            Work::Outpaint { .. } => anyhow::bail!("outpainting is never batched"),
        };
        units.push(unit);
    }
    let tokens = decode_groups(engine, batch, &units, &sc)?;
    let mut made = 0;
    for ((job, unit), toks) in batch.iter().zip(&units).zip(tokens) {
        let ims = engine.tokenizer.decode(&toks, (g, g), &engine.device)?;
        made += ims.len();
        let _ = job.tx.send(Event::Images(
            unit.classes.iter().copied().zip(ims).collect(),
        ));
    }
    Ok(made)
}

/// One job's sequences in a batch.
struct Unit {
    classes: Vec<usize>,
    known: Vec<Vec<(usize, u32)>>,
    orders: Vec<Vec<usize>>,
    chunk: usize,
}

/// The one place the server calls the sampler: every unit's sequences in one forward batch,
/// each unit drawing from its job's generator ([`sampler::decode_rows`]), so a unit's tokens
/// are those it would get decoded alone. Returns the tokens per unit.
fn decode_groups(
    engine: &Engine,
    batch: &mut [Job],
    units: &[Unit],
    sc: &SampleConfig,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let classes: Vec<usize> = units.iter().flat_map(|u| u.classes.clone()).collect();
    let known: Vec<Vec<(usize, u32)>> = units.iter().flat_map(|u| u.known.clone()).collect();
    let orders: Vec<Vec<usize>> = units.iter().flat_map(|u| u.orders.clone()).collect();
    let of: Vec<usize> = units
        .iter()
        .enumerate()
        .flat_map(|(i, u)| std::iter::repeat_n(i, u.classes.len()))
        .collect();
    let mut rngs: Vec<ChaCha8Rng> = batch.iter().map(|j| j.rng.clone()).collect();
    let txs: Vec<(UnboundedSender<Event>, usize, usize)> = batch
        .iter()
        .zip(units)
        .map(|(j, u)| (j.tx.clone(), u.chunk, j.chunks_total))
        .collect();
    let mut on_step = |step: usize, steps: usize| {
        for (tx, chunk, chunks) in &txs {
            let _ = tx.send(Event::Step {
                step,
                steps,
                chunk: *chunk,
                chunks: *chunks,
            });
        }
    };
    // One condition row per sequence, each job's own (a batch shares its guidance rule).
    let cond_rows = match &batch[0].condition {
        Some((_, guide)) => {
            let mut rows = Vec::with_capacity(classes.len());
            for (j, u) in batch.iter().zip(units) {
                let (img, _) = j.condition.as_ref().context("a batch mixes conditions")?;
                rows.extend(std::iter::repeat_n(img.clone(), u.classes.len()));
            }
            Some((candle_core::Tensor::cat(&rows, 0)?, *guide))
        }
        None => None,
    };
    let req = Request {
        classes: &classes,
        known: &known,
        orders: &orders,
        condition: cond_rows
            .as_ref()
            .map(|(images, guide)| sampler::Condition {
                images,
                guide: *guide,
            }),
    };
    let out = sampler::decode_rows(
        &engine.model,
        &req,
        sc,
        &mut Rows {
            rngs: &mut rngs,
            of: &of,
            on_step: &mut on_step,
        },
    )?;
    for (j, r) in batch.iter_mut().zip(rngs) {
        j.rng = r;
    }
    let mut out = out.into_iter();
    Ok(units
        .iter()
        .map(|u| out.by_ref().take(u.classes.len()).collect())
        .collect())
}
