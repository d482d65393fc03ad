//! Throughput measurements (`arpg bench`): sampling, and optionally the VQ decode, images
//! out end to end, and training steps, on random or real weights. Each result is a key of
//! one JSON object, which the command line prints.

use crate::data::{PackWriter, Packed, Sample};
use crate::model::Arpg;
use crate::sampler::{random_order, sample, sample_with, DecodeGraphs, SampleConfig};
use crate::train::{TrainConfig, Trainer};
use crate::zoo::VqSpec;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::time::Instant;

/// What to time, and how often.
#[derive(Debug, Clone)]
pub struct Bench {
    pub batch_size: usize,
    /// Decoding steps of each sampled batch.
    pub steps: usize,
    /// Guidance scale (not 0 or 1: both halves run, as in the paper's timing).
    pub cfg: f32,
    pub warmup: usize,
    pub repeats: usize,
    /// Also time the VQ decode of one batch.
    pub vq: bool,
    /// The VQ decoder's precision (as [`crate::zoo::resolve_vq_dtype`] takes it).
    pub vq_dtype: String,
    /// Also time this many batches of images out, end to end.
    pub e2e: Option<usize>,
    /// Also time training steps.
    pub train: bool,
    /// Which training step (auto: the hand-written one on CUDA).
    pub train_step: crate::train::StepKind,
    /// Time training steps only (no model is loaded for sampling).
    pub train_only: bool,
    pub cuda_graph: bool,
}

/// Orders plus the KV caches of both guidance halves of a batch: refused before the model
/// loads when memory cannot hold them.
pub fn check_memory(cfg: &crate::ArpgConfig, batch: usize, dtype: DType) -> Result<()> {
    let (b, cells) = (batch as u128, cfg.block_size as u128);
    let kv = 2 * 2 * cfg.n_layer as u128 * cfg.dim as u128 * dtype.size_in_bytes() as u128;
    crate::util::check_memory(b * cells * (16 + kv), &format!("--batch-size {batch}"))
}

/// The median over `repeats` runs of `f` (after `warmup` runs), in seconds, the device
/// synchronised around each.
fn time<F: FnMut() -> Result<()>>(
    dev: &Device,
    warmup: usize,
    repeats: usize,
    mut f: F,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::new();
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// With ARPG_PROFILE set: `{part: [milliseconds, calls]}` gathered since the last call, over
/// all timed runs; `None` when nothing was gathered.
fn profile_json() -> Option<Value> {
    let prof = crate::util::take_profile();
    (!prof.is_empty()).then(|| {
        serde_json::json!(prof
            .iter()
            .map(|(k, (ms, n))| (k.to_string(), serde_json::json!([ms, n])))
            .collect::<serde_json::Map<_, _>>())
    })
}

fn gib(bytes: u64) -> Value {
    (bytes as f64 / (1u64 << 30) as f64).into()
}

/// Every measurement `b` asks for on the model `spec` describes, into `out`.
pub fn run(
    spec: &crate::zoo::ModelSpec,
    dtype: DType,
    dev: &Device,
    b: &Bench,
    out: &mut Value,
) -> Result<()> {
    let cfg = spec.config()?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    if b.train_only {
        return training(&cfg, dtype, dev, b, &mut rng, out);
    }
    let model = spec.load(dtype, dev)?;
    let sc = SampleConfig {
        steps: b.steps,
        cfg: b.cfg,
        ..Default::default()
    };
    let mut graphs = DecodeGraphs::new(b.cuda_graph);
    let last = sampling(&model, &sc, b, &mut rng, &mut graphs, out)?;
    let vq_dtype = crate::zoo::resolve_vq_dtype(&b.vq_dtype, dtype, dev)?;
    if let Some(n) = b.e2e {
        e2e(&model, &sc, b.batch_size, vq_dtype, n, &mut graphs, out)?;
    }
    drop(graphs);
    drop(model);
    if b.vq {
        let g = cfg.grid_size();
        let codes = Tensor::from_vec(last.concat(), (b.batch_size, cfg.block_size), dev)?;
        vq_decode(&codes, (g, g), vq_dtype, b, out)?;
    }
    if b.train {
        training(&cfg, dtype, dev, b, &mut rng, out)?;
    }
    Ok(())
}

/// Sampling throughput (and, when CUDA graphs replay, that a replay draws what an eager
/// decode draws); returns the last batch's tokens.
fn sampling(
    model: &Arpg,
    sc: &SampleConfig,
    b: &Bench,
    rng: &mut ChaCha8Rng,
    graphs: &mut DecodeGraphs,
    out: &mut Value,
) -> Result<Vec<Vec<u32>>> {
    let cfg = model.config();
    let dev = model.device();
    let positions: Vec<usize> = (0..cfg.block_size).collect();
    let batch = |rng: &mut ChaCha8Rng| {
        let classes: Vec<usize> = (0..b.batch_size)
            .map(|_| rng.random_range(0..cfg.num_classes))
            .collect();
        let orders = vec![random_order(&positions, rng); b.batch_size];
        (classes, orders)
    };
    let mut last = Vec::new();
    crate::device::reset_peak_memory(dev)?;
    let secs = {
        // Warm-up and timed decodes, for a profiler started with `--profile-from-start off`.
        let _range = crate::device::profiler_range(dev);
        time(dev, b.warmup, b.repeats, || {
            let (classes, orders) = batch(rng);
            last = sample_with(model, &classes, &orders, sc, rng, graphs)?;
            Ok(())
        })?
    };
    out["fused_decoding_step"] = model.is_fused().into();
    out["sample_seconds"] = secs.into();
    out["images_per_sec"] = (b.batch_size as f64 / secs).into();
    out["ms_per_step"] = (secs * 1e3 / b.steps as f64).into();
    out["cuda_graph_replays"] = graphs.replays().into();
    if let Some(p) = crate::device::peak_memory(dev)? {
        // Allocator level, weights included (as torch.cuda.max_memory_allocated).
        out["peak_pool_gib"] = gib(p.pool);
        out["peak_graph_gib"] = gib(p.graphs);
    }
    if graphs.replays() > 0 {
        // A replay must draw what an eager decode draws from the same generator state.
        let (classes, orders) = batch(rng);
        let eager = sample(model, &classes, &orders, sc, &mut rng.clone())?;
        let replayed = sample_with(model, &classes, &orders, sc, rng, graphs)?;
        out["graph_equals_eager"] = (eager == replayed).into();
    }
    Ok(last)
}

/// The VQ-16 decode of `codes` (random weights) in `vq_dtype`; in low precision, also its
/// error against f32.
fn vq_decode(
    codes: &Tensor,
    grid: (usize, usize),
    vq_dtype: DType,
    b: &Bench,
    out: &mut Value,
) -> Result<()> {
    let dev = codes.device();
    let random = VqSpec {
        random: true,
        ..Default::default()
    };
    let vq = random.load(vq_dtype, dev)?;
    // One decode first (cuDNN times its algorithms then), outside the profile.
    vq.decode(codes, grid)?;
    dev.synchronize()?;
    crate::util::take_profile();
    let s = {
        let _range = crate::device::profiler_range(dev);
        time(dev, b.warmup, b.repeats, || {
            vq.decode(codes, grid)?;
            Ok(())
        })?
    };
    out["vq_decode_seconds"] = s.into();
    if let Some(p) = profile_json() {
        out["vq_profile_ms"] = p;
    }
    out["vq_decode_images_per_sec"] = (b.batch_size as f64 / s).into();
    out["cudnn_version"] = crate::kernels::cudnn::version().into();
    if let Some(p) = crate::device::peak_memory(dev)? {
        out["vq_peak_pool_gib"] = gib(p.pool);
    }
    out["vq_dtype"] = format!("{vq_dtype:?}").into();
    out["vq_format"] = format!("{:?}", vq.format()).into();
    let (planned, fused) = crate::kernels::cudnn::fused_plans();
    out["cudnn_plans_fused"] = serde_json::json!([fused, planned]);
    let tf32 = crate::kernels::cudnn::allow_tf32();
    out["vq_tf32"] = tf32.into();
    if vq_dtype == DType::F32 && !tf32 {
        return Ok(());
    }
    // The low-precision decode against f32 with the same weights: the decoder's output and
    // the uint8 pixels that are stored.
    let lo = vq.decode(codes, grid)?;
    drop(vq);
    // Exact f32 loads in its own (NCHW) layout: TF32 off before loading.
    crate::kernels::cudnn::set_allow_tf32(false);
    let vq32 = random.load(DType::F32, dev)?;
    let hi = vq32.decode(codes, grid)?;
    crate::kernels::cudnn::set_allow_tf32(tf32);
    let diff = (&lo - &hi)?;
    let l2 =
        |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64) };
    out["vq_lowp_max_abs_err"] = (diff.abs()?.max_all()?.to_scalar::<f32>()? as f64).into();
    out["vq_lowp_rel_l2_err"] = (l2(&diff)? / l2(&hi)?).into();
    let pixels = |t: &Tensor| -> Result<Tensor> {
        Ok(crate::tokenizer::image::tensor_to_u8_nhwc(t)?.to_dtype(DType::F32)?)
    };
    let pd = (pixels(&lo)? - pixels(&hi)?)?.abs()?;
    out["vq_lowp_pixels_max_diff"] = (pd.max_all()?.to_scalar::<f32>()? as f64).into();
    out["vq_lowp_pixels_mean_abs_diff"] = (pd.mean_all()?.to_scalar::<f32>()? as f64).into();
    Ok(())
}

/// Training steps of batch `b.batch_size` on synthetic tokens.
fn training(
    cfg: &crate::ArpgConfig,
    dtype: DType,
    dev: &Device,
    b: &Bench,
    rng: &mut ChaCha8Rng,
    out: &mut Value,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = PackWriter::new();
    for i in 0..b.batch_size * 4 {
        let crop: Vec<u16> = (0..cfg.block_size)
            .map(|_| rng.random_range(0..cfg.vocab_size as u16))
            .collect();
        w.push(&Sample {
            label: (i % cfg.num_classes) as u32,
            crops: vec![crop],
        })?;
    }
    let p = dir.path().join("bench.pack");
    w.write(&p)?;
    let data = Packed::open(&p)?;
    let tc = TrainConfig {
        batch_size: b.batch_size,
        steps: 1000,
        lr: 1e-4,
        step_kind: b.train_step,
        ..Default::default()
    };
    let mut tr = Trainer::new(cfg, &tc, dtype, dev)?;
    out["train_step_kind"] = if tr.hand_step() { "hand" } else { "autograd" }.into();
    crate::util::take_profile();
    crate::device::reset_peak_memory(dev)?;
    let mut phases = None;
    let s = time(dev, b.warmup.max(1), b.repeats, || {
        phases = tr.train_step(&data)?.phases_ms;
        Ok(())
    })?;
    out["train_step_seconds"] = s.into();
    if let Some(p) = crate::device::peak_memory(dev)? {
        // Weights, gradients, AdamW moments and the step's activations.
        out["train_peak_pool_gib"] = gib(p.pool);
    }
    if dev.is_cuda() {
        // One more step for a profiler started with `--profile-from-start off` (ncu): only a
        // warm step's kernels.
        let _range = crate::device::profiler_range(dev);
        tr.train_step(&data)?;
        dev.synchronize()?;
    }
    if let Some(p) = profile_json() {
        out["train_profile_ms"] = p;
    }
    if let Some(p) = phases {
        // With ARPG_PROFILE_STEPS set: forward+backward, all-reduce, clip+AdamW (ms).
        out["train_phases_ms"] = serde_json::json!(p);
    }
    out["train_images_per_sec"] = (b.batch_size as f64 / s).into();
    Ok(())
}

/// Images out, end to end: `n` batches through [`crate::pipeline::run`] as `sample-fid` runs
/// them (tokens on the device, the VQ decoder on a second stream, uint8 pixels to the host),
/// overlapped and sequential.
fn e2e(
    model: &Arpg,
    sc: &SampleConfig,
    batch_size: usize,
    vq_dtype: DType,
    n: usize,
    graphs: &mut DecodeGraphs,
    out: &mut Value,
) -> Result<()> {
    use crate::sampler::{DecodeShape, Request};
    let cfg = model.config();
    let dev = model.device().clone();
    let positions: Vec<usize> = (0..cfg.block_size).collect();
    let g = cfg.grid_size();
    for overlap in [true, false] {
        let vq_dev = match overlap {
            true => crate::device::second_stream(&dev)?,
            false => dev.clone(),
        };
        let vq = VqSpec {
            random: true,
            ..Default::default()
        }
        .load(vq_dtype, &vq_dev)?;
        let tk = crate::tokenizer::ImageTokenizer::Vq(Box::new(vq));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut run = |batches: usize| -> Result<crate::pipeline::Stats> {
            let mut pixels = 0usize;
            let st = crate::pipeline::run(
                overlap,
                |i| {
                    if i == batches {
                        return Ok(None);
                    }
                    let classes: Vec<usize> = (0..batch_size)
                        .map(|j| (i * batch_size + j) % cfg.num_classes)
                        .collect();
                    let orders = vec![random_order(&positions, &mut rng); batch_size];
                    let known = vec![vec![]; batch_size];
                    let req = Request {
                        classes: &classes,
                        known: &known,
                        orders: &orders,
                        condition: None,
                    }
                    .validate(DecodeShape::of(model), sc)?;
                    let toks = crate::sampler::generate(model, &req, &mut rng, Some(&mut *graphs))?;
                    crate::device::tokens_ready(&dev)?;
                    Ok(Some(toks))
                },
                |toks: Tensor| tk.decode_u8(&toks, (g, g)),
                |_, px| {
                    pixels += px.data.len();
                    Ok(())
                },
            )?;
            std::hint::black_box(pixels);
            Ok(st)
        };
        let warm = run(1)?; // the graph capture, cuDNN's plans
        let st = run(n)?;
        let key = match overlap {
            true => "e2e",
            false => "e2e_sequential",
        };
        let secs = st.wall.as_secs_f64();
        out[format!("{key}_images_per_sec")] = ((n * batch_size) as f64 / secs).into();
        // Per batch: where the time went (the stages overlap when `overlap`).
        let per = |d: std::time::Duration| d.as_secs_f64() / n as f64;
        out[format!("{key}_parts_seconds_per_batch")] = serde_json::json!({
            "wall": secs / n as f64, "tokens": per(st.produce), "pixels": per(st.decode),
            "sink": per(st.sink), "first_batch_cold": warm.wall.as_secs_f64(),
        });
    }
    out["e2e_batches"] = n.into();
    Ok(())
}
