//! Diagnostics of a digits model: teacher-forced NLL per token on the training and held-out
//! splits (random orders and raster order, with the true class and the null class),
//! generative classification (argmin over classes of NLL(x | c)), and the NLL the sampler's
//! grouped decoding path sees (tokens fed several at a time, as `decode` does).
//!
//! `cargo run --release -p arpg --example digits_diag -- [--config C --weights W] [--ema]
//!  [--orders K] [--max-train N] [--steps S]`

use anyhow::{Context, Result};
use arpg::data::digits::{self, Digit};
use arpg::model::{Arpg, Mode, Positions};
use arpg::sampler::{token_counts, MaskSchedule};
use arpg::zoo::{ModelSpec, DIGITS};
use candle_core::{DType, Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

struct Args {
    config: Option<PathBuf>,
    weights: Option<PathBuf>,
    ema: bool,
    orders: usize,
    max_train: usize,
    steps: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        config: None,
        weights: None,
        ema: false,
        orders: 3,
        max_train: 360,
        steps: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--config" => a.config = Some(val()?.into()),
            "--weights" => a.weights = Some(val()?.into()),
            "--ema" => a.ema = true,
            "--orders" => a.orders = val()?.parse()?,
            "--max-train" => a.max_train = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            _ => anyhow::bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

/// One teacher-forced sequence: the first token fed (a class or the null class), the image,
/// and its generation order.
struct Seq<'a> {
    first: u32,
    pixels: &'a [u8; 64],
    order: &'a [usize],
}

/// Total NLL (nats, summed over the 64 tokens) of each sequence, by the training forward.
fn nll_forward(model: &Arpg, seqs: &[Seq]) -> Result<Vec<f64>> {
    let dev = model.device();
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(256) {
        let b = chunk.len();
        let rasters: Vec<Vec<u32>> = chunk
            .iter()
            .map(|s| s.pixels.iter().map(|&v| v as u32).collect())
            .collect();
        let seqs: Vec<arpg::train::TeacherSeq> = chunk
            .iter()
            .zip(&rasters)
            .map(|(s, raster)| arpg::train::TeacherSeq {
                first: s.first,
                raster,
                order: s.order,
            })
            .collect();
        let batch = arpg::train::Batch::teacher_forced(&seqs, dev)?;
        let targets = batch.targets.reshape((b, 64, 1))?;
        let logits = model.forward(
            &batch.tokens,
            Positions {
                keys: &batch.keys,
                queries: &batch.queries,
                control: None,
            },
            &mut Mode::inference(),
        )?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = lp.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?;
        let sums = picked.sum(D::Minus1)?.to_vec1::<f32>()?;
        out.extend(sums.iter().map(|&x| -x as f64));
    }
    Ok(out)
}

/// Total NLL of each sequence along the sampler's path: `model.step` with the KV cache,
/// `counts[i]` true tokens fed together at step i + 1 (as `decode` feeds drawn tokens).
fn nll_grouped(model: &Arpg, seqs: &[Seq], counts: &[usize]) -> Result<Vec<f64>> {
    let dev = model.device();
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(256) {
        let b = chunk.len();
        let mut cache = model.new_cache(b, 65)?;
        let mut ids = Tensor::from_vec(
            chunk.iter().map(|s| s.first).collect::<Vec<_>>(),
            (b, 1),
            dev,
        )?;
        let mut kpos = Tensor::zeros((b, 1), DType::U32, dev)?;
        let mut total = vec![0f64; b];
        let mut done = 0;
        for &n in counts {
            let q: Vec<u32> = chunk
                .iter()
                .flat_map(|s| s.order[done..done + n].iter().map(|&p| p as u32 + 1))
                .collect();
            let t: Vec<u32> = chunk
                .iter()
                .flat_map(|s| s.order[done..done + n].iter().map(|&p| s.pixels[p] as u32))
                .collect();
            let qpos = Tensor::from_vec(q, (b, n), dev)?;
            let tgt = Tensor::from_vec(t, (b, n), dev)?;
            let logits = model
                .step(
                    &mut cache,
                    &ids,
                    Positions {
                        keys: &kpos,
                        queries: &qpos,
                        control: None,
                    },
                )?
                .context("queries were given")?;
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let picked = lp
                .gather(&tgt.unsqueeze(D::Minus1)?, D::Minus1)?
                .squeeze(D::Minus1)?
                .sum(D::Minus1)?
                .to_vec1::<f32>()?;
            for (acc, v) in total.iter_mut().zip(picked) {
                *acc -= v as f64;
            }
            ids = tgt;
            kpos = qpos;
            done += n;
        }
        out.extend(total);
    }
    Ok(out)
}

struct SplitReport {
    nll_cond_random: f64,
    nll_null_random: f64,
    nll_cond_raster: f64,
    nll_null_raster: f64,
    acc_random: f64,
    acc_raster: f64,
    acc_both: f64,
}

fn per_split(model: &Arpg, data: &[Digit], k_orders: usize, rng: &mut ChaCha8Rng) -> SplitReport {
    let mc = model.config().clone();
    let raster: Vec<usize> = (0..64).collect();
    let (mut cr, mut nr, mut cs, mut ns) = (0.0, 0.0, 0.0, 0.0);
    let (mut ok_r, mut ok_s, mut ok_b) = (0usize, 0usize, 0usize);
    for d in data {
        let orders: Vec<Vec<usize>> = (0..k_orders)
            .map(|_| {
                let mut o = raster.clone();
                o.shuffle(rng);
                o
            })
            .collect();
        // firsts: classes 0..9 then the null class; orders: k random then raster.
        let firsts: Vec<u32> = (0..mc.num_classes)
            .map(|c| mc.class_token(c))
            .chain([mc.null_class_token()])
            .collect();
        let mut seqs = Vec::new();
        for &f in &firsts {
            for o in orders.iter().chain([&raster]) {
                seqs.push(Seq {
                    first: f,
                    pixels: &d.pixels,
                    order: o,
                });
            }
        }
        let nll = nll_forward(model, &seqs).expect("forward");
        let per = k_orders + 1;
        // score[c] = (mean over random orders, raster)
        let score: Vec<(f64, f64)> = firsts
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let row = &nll[i * per..(i + 1) * per];
                (
                    row[..k_orders].iter().sum::<f64>() / k_orders as f64,
                    row[k_orders],
                )
            })
            .collect();
        let l = d.label as usize;
        cr += score[l].0;
        cs += score[l].1;
        nr += score[mc.num_classes].0;
        ns += score[mc.num_classes].1;
        let argmin = |f: &dyn Fn(&(f64, f64)) -> f64| {
            (0..mc.num_classes)
                .min_by(|&a, &b| f(&score[a]).total_cmp(&f(&score[b])))
                .unwrap()
        };
        ok_r += (argmin(&|s| s.0) == l) as usize;
        ok_s += (argmin(&|s| s.1) == l) as usize;
        ok_b += (argmin(&|s| (s.0 * k_orders as f64 + s.1) / per as f64) == l) as usize;
    }
    let n = data.len() as f64;
    let tok = n * 64.0;
    SplitReport {
        nll_cond_random: cr / tok,
        nll_null_random: nr / tok,
        nll_cond_raster: cs / tok,
        nll_null_raster: ns / tok,
        acc_random: ok_r as f64 / n,
        acc_raster: ok_s as f64 / n,
        acc_both: ok_b as f64 / n,
    }
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let spec = ModelSpec {
        model: if a.config.is_none() {
            Some(DIGITS.into())
        } else {
            None
        },
        config: a.config.clone(),
        weights: a.weights.clone(),
        ema: a.ema,
        ..Default::default()
    };
    let model = spec.load(DType::F32, &Device::Cpu)?;
    let (train, test) = digits::split(&digits::load_csv_gz(Path::new(
        "data/digits/digits.csv.gz",
    ))?);
    let stride = (train.len() / a.max_train.max(1)).max(1);
    let train_sub: Vec<Digit> = train
        .iter()
        .step_by(stride)
        .take(a.max_train)
        .cloned()
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1234);
    println!(
        "model: {} | {} orders per image + raster | train subset {} of {}, test {}",
        a.weights
            .as_ref()
            .map_or("<built-in digits>".to_string(), |p| p.display().to_string()),
        a.orders,
        train_sub.len(),
        train.len(),
        test.len()
    );
    println!("split | NLL/token cond (random, raster) | null (random, raster) | gen-class acc (random, raster, all)");
    for (name, data) in [("train", &train_sub), ("test", &test)] {
        let r = per_split(&model, data, a.orders, &mut rng);
        println!(
            "{name:5} | {:.4} {:.4} | {:.4} {:.4} | {:.1}% {:.1}% {:.1}%",
            r.nll_cond_random,
            r.nll_cond_raster,
            r.nll_null_random,
            r.nll_null_raster,
            100.0 * r.acc_random,
            100.0 * r.acc_raster,
            100.0 * r.acc_both
        );
    }
    // The sampler's path: tokens fed in groups (arccos schedule), true class, random orders.
    let mc = model.config().clone();
    let orders: Vec<Vec<usize>> = test
        .iter()
        .map(|_| {
            let mut o: Vec<usize> = (0..64).collect();
            o.shuffle(&mut rng);
            o
        })
        .collect();
    let seqs: Vec<Seq> = test
        .iter()
        .zip(&orders)
        .map(|(d, o)| Seq {
            first: mc.class_token(d.label as usize),
            pixels: &d.pixels,
            order: o,
        })
        .collect();
    let fwd: f64 = nll_forward(&model, &seqs)?.iter().sum::<f64>() / (64.0 * test.len() as f64);
    let ones = vec![1usize; 64];
    let one: f64 =
        nll_grouped(&model, &seqs, &ones)?.iter().sum::<f64>() / (64.0 * test.len() as f64);
    let counts = token_counts(64, a.steps, MaskSchedule::Arccos)?;
    let grouped: f64 =
        nll_grouped(&model, &seqs, &counts)?.iter().sum::<f64>() / (64.0 * test.len() as f64);
    println!(
        "test, true class, same random orders: forward {fwd:.4} | step path, 1 token a step {one:.4} | step path, {} steps {:?} {grouped:.4}",
        a.steps, counts
    );
    sample_check(&model, &train, a.steps, &mut rng)?;
    Ok(())
}

/// Centre of mass (row, column) of a digit's intensities.
fn centre(px: &[u8; 64]) -> (f64, f64) {
    let (mut m, mut r, mut c) = (0.0, 0.0, 0.0);
    for (i, &v) in px.iter().enumerate() {
        m += v as f64;
        r += v as f64 * (i / 8) as f64;
        c += v as f64 * (i % 8) as f64;
    }
    (r / m.max(1e-9), c / m.max(1e-9))
}

fn shifted(px: &[u8; 64], dy: i32, dx: i32) -> [u8; 64] {
    let mut o = [0u8; 64];
    for y in 0..8i32 {
        for x in 0..8i32 {
            let (sy, sx) = (y - dy, x - dx);
            if (0..8).contains(&sy) && (0..8).contains(&sx) {
                o[(y * 8 + x) as usize] = px[(sy * 8 + sx) as usize];
            }
        }
    }
    o
}

/// Samples at CFG 1 and 4: the k-NN judge as is, and after moving each sample by the shift
/// (up to 2 pixels each way) that brings it nearest to some training digit; and how far the
/// samples' centres of mass spread compared with real digits'.
fn sample_check(model: &Arpg, train: &[Digit], steps: usize, rng: &mut ChaCha8Rng) -> Result<()> {
    use arpg::eval::digits::KnnClassifier;
    use arpg::sampler::{random_order, sample, SampleConfig};
    let knn = KnnClassifier::new(train.to_vec(), 3);
    let spread = |pts: &[(f64, f64)]| {
        let n = pts.len() as f64;
        let (mr, mc) = (
            pts.iter().map(|p| p.0).sum::<f64>() / n,
            pts.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let v = pts
            .iter()
            .map(|p| (p.0 - mr).powi(2) + (p.1 - mc).powi(2))
            .sum::<f64>()
            / n;
        (mr, mc, v.sqrt())
    };
    let real: Vec<(f64, f64)> = train.iter().map(|d| centre(&d.pixels)).collect();
    let (r, c, s) = spread(&real);
    println!("real training digits: centre of mass ({r:.2}, {c:.2}), rms spread {s:.2}");
    let nearest = |px: &[u8; 64]| -> u32 {
        train
            .iter()
            .map(|t| {
                t.pixels
                    .iter()
                    .zip(px)
                    .map(|(&a, &b)| (a as i32 - b as i32).pow(2) as u32)
                    .sum::<u32>()
            })
            .min()
            .unwrap()
    };
    for cfg in [1.0f32, 4.0] {
        let classes: Vec<usize> = (0..10).flat_map(|c| std::iter::repeat_n(c, 20)).collect();
        let all: Vec<usize> = (0..64).collect();
        let orders: Vec<Vec<usize>> = classes.iter().map(|_| random_order(&all, rng)).collect();
        let sc = SampleConfig {
            steps,
            cfg,
            cfg_schedule: "constant".parse()?,
            ..Default::default()
        };
        let toks = sample(model, &classes, &orders, &sc, rng)?;
        let (mut ok, mut ok_shift) = (0, 0);
        let mut cents = vec![];
        for (c, t) in classes.iter().zip(&toks) {
            let mut px = [0u8; 64];
            for (p, &v) in px.iter_mut().zip(t) {
                *p = v as u8;
            }
            cents.push(centre(&px));
            ok += (knn.predict(&px) == *c as u32) as usize;
            let best = (-2..=2)
                .flat_map(|dy| (-2..=2).map(move |dx| (dy, dx)))
                .map(|(dy, dx)| shifted(&px, dy, dx))
                .min_by_key(|q| nearest(q))
                .unwrap();
            ok_shift += (knn.predict(&best) == *c as u32) as usize;
        }
        let (r, cc, s) = spread(&cents);
        println!(
            "cfg {cfg}: {} samples, k-NN {:.1}%, k-NN after the best shift {:.1}%, centre of mass ({r:.2}, {cc:.2}), rms spread {s:.2}",
            toks.len(),
            100.0 * ok as f64 / toks.len() as f64,
            100.0 * ok_shift as f64 / toks.len() as f64
        );
    }
    Ok(())
}
