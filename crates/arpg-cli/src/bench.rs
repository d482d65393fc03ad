//! `arpg bench`: sampling (and optionally VQ decoding and training) throughput.

use crate::args::{DeviceArgs, ModelArgs};
use anyhow::{bail, Result};
use arpg::data::{PackWriter, Packed, Sample};
use arpg::sampler::{random_order, sample, sample_with, DecodeGraphs, SampleConfig};
use arpg::train::{TrainConfig, Trainer};
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Guidance scale (not 0 or 1: both halves run, as in the paper's timing).
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f32,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also time the VQ-16 decode of one batch (random weights unless --vq-weights).
    #[arg(long)]
    pub vq: bool,
    /// Precision of the VQ decoder (as `sample`'s --vq-dtype; auto: tf32 on a GPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tf32", "f32", "bf16", "f16"])]
    pub vq_dtype: String,
    /// Also time images out, end to end: N batches of tokens -> VQ decode -> uint8 on the
    /// host, overlapped (the VQ on a second stream) and sequential.
    #[arg(long, value_name = "N")]
    pub e2e: Option<usize>,
    /// Also time training steps (batch --batch-size, synthetic tokens).
    #[arg(long)]
    pub train: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Decode eagerly on CUDA instead of replaying a captured CUDA graph.
    #[arg(long)]
    pub no_cuda_graph: bool,
}

fn sync(d: &Device) -> Result<()> {
    d.synchronize()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut() -> Result<()>>(
    dev: &Device,
    warmup: usize,
    repeats: usize,
    mut f: F,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    sync(dev)?;
    let mut t = Vec::new();
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        f()?;
        sync(dev)?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// With ARPG_PROFILE set: `{part: [milliseconds, calls]}` gathered since the last call, over
/// all timed runs; `None` when nothing was gathered.
fn profile_json() -> Option<serde_json::Value> {
    let prof = arpg::util::take_profile();
    (!prof.is_empty()).then(|| {
        serde_json::json!(prof
            .iter()
            .map(|(k, (ms, n))| (k.to_string(), serde_json::json!([ms, n])))
            .collect::<serde_json::Map<_, _>>())
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let spec = a.model.spec(0);
    let cfg = spec.config()?;
    let (dev, dtype) = a.device.resolve_seeded(0)?;
    // Orders plus the KV caches of both guidance halves: refuse what cannot be allocated.
    let (b, cells) = (a.batch_size as u128, cfg.block_size as u128);
    arpg::util::check_memory(
        b * cells
            * (16 + 2 * 2 * cfg.n_layer as u128 * cfg.dim as u128 * dtype.size_in_bytes() as u128),
        &format!("--batch-size {}", a.batch_size),
    )?;
    let mut out = serde_json::json!({
        "model": a.model.model.clone().unwrap_or_else(|| "config".into()),
        "batch_size": a.batch_size, "steps": a.steps, "cfg": a.cfg,
        "device": a.device.device, "dtype": a.device.dtype,
    });
    let model = spec.load(dtype, &dev)?;
    let sc = SampleConfig {
        steps: a.steps,
        cfg: a.cfg,
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let cells = cfg.block_size;
    let positions: Vec<usize> = (0..cells).collect();
    let mut last = Vec::new();
    let mut graphs = DecodeGraphs::new(!a.no_cuda_graph);
    let batch = |rng: &mut rand_chacha::ChaCha8Rng| {
        let classes: Vec<usize> = (0..a.batch_size)
            .map(|_| rng.random_range(0..cfg.num_classes))
            .collect();
        let orders = vec![random_order(&positions, rng); a.batch_size];
        (classes, orders)
    };
    arpg::device::reset_peak_memory(&dev)?;
    let secs = time(&dev, a.warmup, a.repeats, || {
        let (classes, orders) = batch(&mut rng);
        last = sample_with(&model, &classes, &orders, &sc, &mut rng, &mut graphs)?;
        Ok(())
    })?;
    out["sample_seconds"] = secs.into();
    out["images_per_sec"] = (a.batch_size as f64 / secs).into();
    out["ms_per_step"] = (secs * 1e3 / a.steps as f64).into();
    out["cuda_graph_replays"] = graphs.replays().into();
    if let Some(p) = arpg::device::peak_memory(&dev)? {
        // Allocator level, weights included (as torch.cuda.max_memory_allocated).
        out["peak_pool_gib"] = (p.pool as f64 / (1u64 << 30) as f64).into();
        out["peak_graph_gib"] = (p.graphs as f64 / (1u64 << 30) as f64).into();
    }
    if graphs.replays() > 0 {
        // A replay must draw what an eager decode draws from the same generator state.
        let (classes, orders) = batch(&mut rng);
        let eager = sample(&model, &classes, &orders, &sc, &mut rng.clone())?;
        let replayed = sample_with(&model, &classes, &orders, &sc, &mut rng, &mut graphs)?;
        out["graph_equals_eager"] = (eager == replayed).into();
    }
    let vq_dtype = crate::args::resolve_vq_dtype(&a.vq_dtype, dtype, &dev)?;
    if let Some(n) = a.e2e {
        e2e(&a, &model, &sc, vq_dtype, n, &mut graphs, &mut out)?;
    }
    drop(graphs);
    drop(model);

    if a.vq {
        let vq = arpg::zoo::VqSpec {
            random: true,
            ..Default::default()
        }
        .load(vq_dtype, &dev)?;
        let g = cfg.grid_size();
        let codes = Tensor::from_vec(last.concat(), (a.batch_size, cells), &dev)?;
        // One decode first (cuDNN times its algorithms then), outside the profile.
        vq.decode(&codes, (g, g))?;
        dev.synchronize()?;
        arpg::util::take_profile();
        let s = time(&dev, a.warmup, a.repeats, || {
            vq.decode(&codes, (g, g))?;
            Ok(())
        })?;
        out["vq_decode_seconds"] = s.into();
        if let Some(p) = profile_json() {
            out["vq_profile_ms"] = p;
        }
        out["vq_decode_images_per_sec"] = (a.batch_size as f64 / s).into();
        out["cudnn_version"] = arpg::kernels::cudnn::version().into();
        if let Some(p) = arpg::device::peak_memory(&dev)? {
            out["vq_peak_pool_gib"] = (p.pool as f64 / (1u64 << 30) as f64).into();
        }
        out["vq_dtype"] = format!("{vq_dtype:?}").into();
        out["vq_format"] = format!("{:?}", vq.format()).into();
        out["vq_tf32"] = arpg::kernels::cudnn::allow_tf32().into();
        if vq_dtype != candle_core::DType::F32 || arpg::kernels::cudnn::allow_tf32() {
            // The low-precision decode against f32 with the same weights: the decoder's
            // output and the uint8 pixels that are stored.
            let lo = vq.decode(&codes, (g, g))?;
            drop(vq);
            let tf32 = arpg::kernels::cudnn::allow_tf32();
            arpg::kernels::cudnn::set_allow_tf32(false);
            let vq32 = arpg::zoo::VqSpec {
                random: true,
                ..Default::default()
            }
            .load(candle_core::DType::F32, &dev)?;
            let hi = vq32.decode(&codes, (g, g))?;
            arpg::kernels::cudnn::set_allow_tf32(tf32);
            let diff = (&lo - &hi)?;
            let l2 = |t: &Tensor| -> Result<f64> {
                Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
            };
            out["vq_lowp_max_abs_err"] = (diff.abs()?.max_all()?.to_scalar::<f32>()? as f64).into();
            out["vq_lowp_rel_l2_err"] = (l2(&diff)? / l2(&hi)?).into();
            let (pl, ph) = (
                arpg::tokenizer::image::tensor_to_u8_nhwc(&lo)?,
                arpg::tokenizer::image::tensor_to_u8_nhwc(&hi)?,
            );
            let (pl, ph) = (
                pl.to_dtype(candle_core::DType::F32)?,
                ph.to_dtype(candle_core::DType::F32)?,
            );
            let pd = (pl - ph)?.abs()?;
            out["vq_lowp_pixels_max_diff"] = (pd.max_all()?.to_scalar::<f32>()? as f64).into();
            out["vq_lowp_pixels_mean_abs_diff"] =
                (pd.mean_all()?.to_scalar::<f32>()? as f64).into();
        }
    }

    if a.train {
        let dir = tempfile::tempdir()?;
        let mut w = PackWriter::new();
        for i in 0..a.batch_size * 4 {
            let crop: Vec<u16> = (0..cells)
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
            batch_size: a.batch_size,
            steps: 1000,
            lr: 1e-4,
            ..Default::default()
        };
        let mut tr = Trainer::new(&cfg, &tc, dtype, &dev)?;
        arpg::util::take_profile();
        let mut phases = None;
        let s = time(&dev, a.warmup.max(1), a.repeats, || {
            phases = tr.train_step(&data)?.phases_ms;
            Ok(())
        })?;
        out["train_step_seconds"] = s.into();
        if let Some(p) = profile_json() {
            out["train_profile_ms"] = p;
        }
        if let Some(p) = phases {
            // With ARPG_PROFILE_STEPS set: forward+backward, all-reduce, clip+AdamW (ms).
            out["train_phases_ms"] = serde_json::json!(p);
        }
        out["train_images_per_sec"] = (a.batch_size as f64 / s).into();
    }

    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Images out, end to end: `n` batches through [`arpg::pipeline::run`] as `sample-fid` runs
/// them (tokens on the device, the VQ decoder on a second stream, uint8 pixels to the host),
/// overlapped and sequential.
fn e2e(
    a: &BenchArgs,
    model: &arpg::model::Arpg,
    sc: &SampleConfig,
    vq_dtype: candle_core::DType,
    n: usize,
    graphs: &mut DecodeGraphs,
    out: &mut serde_json::Value,
) -> Result<()> {
    use arpg::sampler::{DecodeShape, Request};
    let cfg = model.config();
    let dev = model.device().clone();
    let positions: Vec<usize> = (0..cfg.block_size).collect();
    let g = cfg.grid_size();
    for overlap in [true, false] {
        let vq_dev = match overlap {
            true => arpg::device::second_stream(&dev)?,
            false => dev.clone(),
        };
        let vq = arpg::zoo::VqSpec {
            random: true,
            ..Default::default()
        }
        .load(vq_dtype, &vq_dev)?;
        let tk = arpg::tokenizer::ImageTokenizer::Vq(Box::new(vq));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut run = |batches: usize| -> Result<f64> {
            let start = Instant::now();
            let mut pixels = 0usize;
            arpg::pipeline::run(
                overlap,
                |i| {
                    if i == batches {
                        return Ok(None);
                    }
                    let classes: Vec<usize> = (0..a.batch_size)
                        .map(|j| (i * a.batch_size + j) % cfg.num_classes)
                        .collect();
                    let orders = vec![random_order(&positions, &mut rng); a.batch_size];
                    let known = vec![vec![]; a.batch_size];
                    let req = Request {
                        classes: &classes,
                        known: &known,
                        orders: &orders,
                        condition: None,
                    }
                    .validate(DecodeShape::of(model), sc)?;
                    let toks = arpg::sampler::generate(model, &req, &mut rng, Some(&mut *graphs))?;
                    arpg::device::tokens_ready(&dev)?;
                    Ok(Some(toks))
                },
                |toks: Tensor| tk.decode_u8(&toks, (g, g)),
                |_, px| {
                    pixels += px.data.len();
                    Ok(())
                },
            )?;
            std::hint::black_box(pixels);
            Ok(start.elapsed().as_secs_f64())
        };
        run(1)?; // warm-up: the graph capture, cuDNN's plans
        let secs = run(n)?;
        let key = if overlap {
            "e2e_images_per_sec"
        } else {
            "e2e_sequential_images_per_sec"
        };
        out[key] = ((n * a.batch_size) as f64 / secs).into();
    }
    out["e2e_batches"] = n.into();
    Ok(())
}
