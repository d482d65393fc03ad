//! `arpg sample-fid` (many samples, sharded over GPUs, resumable, ADM's `.npz`) and
//! `arpg eval` (FID, sFID, IS, precision, recall as ADM's evaluator computes them).

use crate::args::{DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use crate::launch;
use anyhow::{bail, ensure, Context, Result};
use arpg::eval::inception::{self, InceptionV3, Preprocess};
use arpg::eval::npz;
use arpg::eval::sample_fid::{Sampling, Shards};
use arpg::eval::stats::{self, Gaussian, IsSplits};
use arpg::sampler;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct SampleFidArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Images in all (ADM's protocol: 50,000).
    #[arg(long, default_value_t = 50_000, visible_alias = "num-fid-samples")]
    pub num_samples: usize,
    /// Consecutive images per class: image i has class (i / per-class) mod the model's classes.
    #[arg(long, default_value_t = 50)]
    pub per_class: usize,
    /// Images per forward batch of each process (doubled internally when guidance is on).
    #[arg(long, default_value_t = 32, visible_alias = "per-proc-batch-size")]
    pub batch_size: usize,
    /// Images per shard: the unit of work handed to a GPU, and of resuming after a crash.
    /// Shards are seeded by their index, so the images do not depend on the number of GPUs.
    #[arg(long, default_value_t = 500)]
    pub shard_size: usize,
    /// Output folder: shards/ (finished shards, kept across runs), images/ (PNGs) and
    /// samples.npz (`arr_0`, uint8, N x H x W x 3, ADM's format). The reference's --sample-dir
    /// is an alias (it nests a folder named after the settings inside; this writes here).
    #[arg(long, default_value = "fid-samples", visible_alias = "sample-dir")]
    pub out: PathBuf,
    /// Do not write one PNG per image.
    #[arg(long)]
    pub no_png: bool,
    /// Decode tokens to pixels after each batch instead of on a second thread (and, on a GPU,
    /// a second stream) while the next batch is sampled. The images are the same either way.
    #[arg(long)]
    pub no_overlap: bool,
    /// Sample on N GPUs of this machine, one process each (cuda:0..N-1). Under an outside
    /// launcher, RANK / WORLD_SIZE / LOCAL_RANK are read instead.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
}

pub fn run_sample(mut a: SampleFidArgs) -> Result<()> {
    ensure!(a.num_samples >= 1, "--num-samples must be at least 1");
    ensure!(
        a.per_class >= 1 && a.batch_size >= 1 && a.shard_size >= 1,
        "--per-class, --batch-size and --shard-size must be at least 1"
    );
    if a.model.model.is_none()
        && a.model.config.is_none()
        && a.model.weights.is_none()
        && a.model.init.is_none()
    {
        bail!("name the model: --model ARPG-L|ARPG-XL|ARPG-XXL|digits, --config/--weights, or --init random");
    }
    // The sampler's checks, before any worker starts.
    let spec = a.model.spec(a.sampling.seed);
    let shape = sampler::DecodeShape::of_config(&spec.config()?);
    sampler::validate_settings(shape, &a.sampling.config(&spec)?)?;
    if launch::should_spawn(a.gpus)? {
        if !a.device.device.starts_with("cuda") {
            eprintln!(
                "note: --gpus {} with --device {}: {} processes on the CPU (pass --device cuda for GPUs)",
                a.gpus, a.device.device, a.gpus
            );
        }
        launch::spawn_workers(a.gpus)?;
        eprintln!(
            "all ranks done; samples in {}",
            a.out.join("samples.npz").display()
        );
        return Ok(());
    }
    let dist = launch::from_env()?.filter(|d| d.world_size > 1);
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
    if let Some(d) = &dist {
        // A worker takes the GPU of its local rank (a CPU run stays on the CPU, for tests).
        if a.device.device.starts_with("cuda") {
            a.device.device = launch::worker_device(d);
        }
    }
    let n = a.num_samples;
    let n_shards = n.div_ceil(a.shard_size);
    // Each shard is a file to check on every run: bound their number.
    const MAX_SHARDS: usize = 10_000_000;
    ensure!(
        n_shards <= MAX_SHARDS,
        "--num-samples {n} in shards of --shard-size {} makes {n_shards} shards; at most {MAX_SHARDS}",
        a.shard_size
    );
    let shards = Shards {
        out: a.out.clone(),
        n,
        shard_size: a.shard_size,
    };
    let range = |s: usize| shards.range(s);
    // A shard is held in memory until written: its images must fit.
    let mcfg = a.model.spec(a.sampling.seed).config()?;
    let patch = match a.vq.tokenizer.as_str() {
        "pixel" => 1,
        "auto" if mcfg.vocab_size == arpg::tokenizer::pixel::LEVELS as usize => 1,
        _ => a.vq.spec(false, 0).config()?.patch_size(),
    } as u128;
    let side = mcfg.grid_size() as u128 * patch;
    arpg::util::check_memory(
        (a.shard_size.min(n) as u128) * side * side * 3 * 2,
        &format!("a shard of {} images of {side}x{side}", a.shard_size.min(n)),
    )?;

    // Shards of another configuration must not be mixed in: the settings live beside them.
    let meta = serde_json::json!({
        "num_samples": n,
        "per_class": a.per_class,
        "shard_size": a.shard_size,
        "seed": a.sampling.seed,
        "model": format!("{:?}", a.model),
        "vq": format!("{:?}", a.vq),
        "dtype": a.device.dtype,
        // Graphs or not, the tokens are the same: that flag must not block a resume.
        "sampling": format!("{:?}", SamplingArgs { no_cuda_graph: false, ..a.sampling.clone() }),
    });
    shards.check_settings(&meta)?;

    // Many shards take a while to check: show it.
    let scan = if n_shards >= 1000 && rank == 0 {
        ProgressBar::new(n_shards as u64).with_message("checking finished shards")
    } else {
        ProgressBar::hidden()
    };
    let pending: Vec<usize> = (0..n_shards)
        .filter(|&s| {
            scan.inc(1);
            shards.done(s, rank == 0).is_none()
        })
        .collect();
    scan.finish_and_clear();
    let pending_images: usize = pending.iter().map(|&s| range(s).1 - range(s).0).sum();
    let mine: Vec<usize> = pending
        .iter()
        .copied()
        .filter(|s| s % world == rank)
        .collect();
    if rank == 0 && pending.len() < n_shards {
        eprintln!(
            "resuming: {} of {n_shards} shards already done in {}",
            n_shards - pending.len(),
            a.out.display()
        );
    }
    let start = Instant::now();
    if !mine.is_empty() {
        sample_shards(&a, &shards, &mine, rank, world)?;
    }
    if arpg::util::interrupted() || rank != 0 {
        return Ok(());
    }
    // Rank 0 waits for the others' shards, then assembles the archive.
    let mut waited = false;
    loop {
        let missing = (0..n_shards)
            .filter(|&s| shards.done(s, false).is_none())
            .count();
        if missing == 0 {
            break;
        }
        if !waited {
            eprintln!("waiting for {missing} shard(s) from the other ranks");
            waited = true;
        }
        if arpg::util::interrupted() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let secs = start.elapsed().as_secs_f64();
    let npz_path = a.out.join("samples.npz");
    if pending_images > 0 || !npz_path.exists() {
        shards.assemble(&npz_path)?;
    }
    if pending_images > 0 {
        eprintln!(
            "{pending_images} images in {secs:.1}s ({:.2} images/s over {world} process{})",
            pending_images as f64 / secs,
            if world > 1 { "es" } else { "" }
        );
    }
    eprintln!("{n} images in {}", npz_path.display());
    Ok(())
}

fn sample_shards(
    a: &SampleFidArgs,
    shards: &Shards,
    mine: &[usize],
    rank: usize,
    world: usize,
) -> Result<()> {
    let spec = a.model.spec(a.sampling.seed);
    let mcfg = spec.config()?;
    let sc = a.sampling.config(&spec)?;
    let (device, dtype) = a.device.resolve()?;
    let model = spec.load(dtype, &device)?;
    let overlap = !a.no_overlap;
    // The VQ decoder works on its own stream, so that it overlaps with the token decoding.
    let vq_device = match overlap {
        true => arpg::device::second_stream(&device)?,
        false => device.clone(),
    };
    let tk = a.vq.tokenizer(
        mcfg.vocab_size,
        spec.random,
        a.sampling.seed,
        dtype,
        &vq_device,
    )?;
    let total: usize = mine
        .iter()
        .map(|&s| shards.range(s).1 - shards.range(s).0)
        .sum();
    // One bar, on rank 0: several processes drawing on one terminal garble each other.
    let pb = if rank == 0 {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
        )
        .unwrap(),
    );
    if world > 1 {
        pb.set_message(format!("(rank 0 of {world})"));
    }
    let start = Instant::now();
    let mut graphs = a.sampling.graphs();
    let made = arpg::eval::sample_fid::sample_shards(
        shards,
        mine,
        Sampling {
            model: &model,
            tokenizer: &tk,
            device: &device,
            sc: &sc,
            graphs: &mut graphs,
            seed: a.sampling.seed,
            per_class: a.per_class,
            batch_size: a.batch_size,
            overlap,
            png: !a.no_png,
        },
        &mut |n| pb.inc(n as u64),
    )?;
    if made < total {
        pb.abandon();
        return Ok(());
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "rank {rank}: {made} images in {secs:.1}s ({:.2} images/s)",
        made as f64 / secs
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Samples: an `.npz` with `arr_0`, uint8 N x H x W x 3 (what `arpg sample-fid` writes).
    #[arg(long)]
    pub samples: PathBuf,
    /// Reference batch, ADM's format: `arr_0` images and/or precomputed `mu`, `sigma`
    /// (pool_3) and `mu_s`, `sigma_s` (spatial), which are used as given.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// The FID InceptionV3 weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a
    /// .safetensors conversion. `random`: deterministic synthetic weights, for tests only.
    #[arg(long)]
    pub inception: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per Inception forward.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// Input preparation: adm (the TF graph ADM's evaluator runs: TF's bilinear resize to
    /// 299, (x - 128) / 128) or pytorch-fid (half-pixel bilinear resize, x / 127.5 - 1).
    #[arg(long, default_value = "adm")]
    pub preprocess: String,
    /// Inception Score over consecutive chunks of this many samples (ADM: 5000; 50,000
    /// samples give 10 splits).
    #[arg(long, default_value_t = 5000)]
    pub is_split_size: usize,
    /// Inception Score over this many equal splits instead (improved-GAN style).
    #[arg(long)]
    pub is_splits: Option<usize>,
    /// Also write the scores as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Features of every image of an `.npz`'s `arr_0`.
struct Acts {
    pool: Vec<f32>,
    spatial: Vec<f32>,
    logits: Vec<f32>,
    n: usize,
}

fn activations(
    net: &InceptionV3,
    path: &Path,
    what: &str,
    batch: usize,
    pre: Preprocess,
) -> Result<Acts> {
    let mut r = npz::ImageReader::open(path, "arr_0")?;
    let pb = ProgressBar::new(r.n as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{what:>8} {{bar:40}} {{pos}}/{{len}} images [{{elapsed_precise}}<{{eta_precise}}] {{per_sec}}"
        ))
        .unwrap(),
    );
    let mut acts = Acts {
        pool: Vec::with_capacity(r.n * inception::POOL_DIM),
        spatial: Vec::with_capacity(r.n * inception::SPATIAL_DIM),
        logits: Vec::with_capacity(r.n * inception::LOGIT_DIM),
        n: r.n,
    };
    let (h, w) = (r.height, r.width);
    while let Some((k, bytes)) = r.next_batch(batch)? {
        if arpg::util::interrupted() {
            bail!("interrupted");
        }
        let f = net
            .forward_images(&bytes, k, h, w, pre)
            .with_context(|| format!("Inception features of {}", path.display()))?;
        acts.pool.extend(f.pool.flatten_all()?.to_vec1::<f32>()?);
        acts.spatial
            .extend(f.spatial.flatten_all()?.to_vec1::<f32>()?);
        acts.logits
            .extend(f.logits.flatten_all()?.to_vec1::<f32>()?);
        pb.inc(k as u64);
    }
    pb.finish_and_clear();
    Ok(acts)
}

/// A reference's precomputed statistics (`mu`/`sigma` or `mu_s`/`sigma_s`), if present.
fn given_stats(
    path: &Path,
    names: &[String],
    mu: &str,
    sigma: &str,
    dim: usize,
) -> Result<Option<Gaussian>> {
    let has = |k: &str| names.iter().any(|n| n == k);
    match (has(mu), has(sigma)) {
        (false, false) => Ok(None),
        (true, true) => {
            let (_, m) = npz::read_floats(path, mu, &[Some(dim)])?;
            let (_, s) = npz::read_floats(path, sigma, &[Some(dim), Some(dim)])?;
            let g = Gaussian::new(m, s)
                .with_context(|| format!("{}: statistics `{mu}` / `{sigma}`", path.display()))?;
            Ok(Some(g))
        }
        _ => bail!(
            "{}: has one of `{mu}` / `{sigma}` but not the other",
            path.display()
        ),
    }
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    let pre: Preprocess = a.preprocess.parse().context("--preprocess")?;
    let splits = match a.is_splits {
        Some(k) => IsSplits::Count(k),
        None => IsSplits::Size(a.is_split_size),
    };
    ensure!(a.is_splits != Some(0), "--is-splits must be at least 1");
    ensure!(a.is_split_size >= 1, "--is-split-size must be at least 1");
    if let Some(p) = &a.json {
        arpg::util::check_writable(p, "--json")?;
    }
    let device = arpg::device::parse_device(&a.device)?;
    let sample_names = npz::names(&a.samples).context("--samples")?;
    ensure!(
        sample_names.iter().any(|n| n == "arr_0"),
        "--samples {}: no `arr_0` image array (it has: {})",
        a.samples.display(),
        sample_names.join(", ")
    );
    let ref_names = npz::names(&a.reference).context("--ref")?;
    // Check shapes and dtypes of both files before the long part.
    let s_reader = npz::ImageReader::open(&a.samples, "arr_0").context("--samples")?;
    let ref_images = ref_names.iter().any(|n| n == "arr_0");
    let ref_reader = match ref_images {
        true => Some(npz::ImageReader::open(&a.reference, "arr_0").context("--ref")?),
        false => None,
    };
    let ref_pool = given_stats(&a.reference, &ref_names, "mu", "sigma", inception::POOL_DIM)
        .context("--ref")?;
    let ref_spatial = given_stats(
        &a.reference,
        &ref_names,
        "mu_s",
        "sigma_s",
        inception::SPATIAL_DIM,
    )
    .context("--ref")?;
    if !ref_images && (ref_pool.is_none() || ref_spatial.is_none()) {
        bail!(
            "--ref {}: needs `arr_0` images or all of `mu`, `sigma`, `mu_s`, `sigma_s` (it has: {})",
            a.reference.display(),
            ref_names.join(", ")
        );
    }
    // Precision / recall take each point's 3rd nearest neighbour: 4 images at least.
    let min = if ref_images { 4 } else { 2 };
    ensure!(
        s_reader.n >= min,
        "--samples {}: {} image(s); {} needs at least {min} (ADM's protocol uses 50,000)",
        a.samples.display(),
        s_reader.n,
        if ref_images {
            "FID with precision / recall"
        } else {
            "FID"
        }
    );
    if let Some(r) = &ref_reader {
        ensure!(
            r.n >= 4,
            "--ref {}: {} image(s); FID with precision / recall needs at least 4",
            a.reference.display(),
            r.n
        );
    }
    if let Some(k) = a.is_splits {
        ensure!(
            k <= s_reader.n,
            "--is-splits {k}: more splits than the {} samples",
            s_reader.n
        );
    }
    if let Some(r) = &ref_reader {
        if (r.height, r.width) != (s_reader.height, s_reader.width) {
            eprintln!(
                "note: samples are {}x{}, the reference {}x{}; both are resized to 299x299 by the network's \
                 bilinear resize, as ADM's evaluator does",
                s_reader.height, s_reader.width, r.height, r.width
            );
        }
    }
    // Inception's activations of one batch, a lower bound (input and the first convolutions).
    let most = s_reader.n.max(ref_reader.as_ref().map_or(0, |r| r.n));
    arpg::util::check_memory(
        a.batch_size.min(most) as u128 * 299 * 299 * 32 * 4 * 2,
        &format!("--batch-size {} through Inception", a.batch_size),
    )?;
    drop((s_reader, ref_reader));

    let net = if a.inception.as_os_str() == "random" {
        eprintln!("warning: --inception random: synthetic weights, the scores are meaningless");
        InceptionV3::synthetic(&device)?
    } else {
        InceptionV3::load(&a.inception, &device).context("--inception")?
    };
    let start = Instant::now();
    let sample = activations(&net, &a.samples, "samples", a.batch_size, pre)?;
    let reference = match ref_images {
        true => Some(activations(&net, &a.reference, "ref", a.batch_size, pre)?),
        false => None,
    };
    let stats_of = |acts: &Acts, spatial: bool| -> Result<Gaussian> {
        match spatial {
            false => Gaussian::fit(&acts.pool, inception::POOL_DIM, &device),
            true => Gaussian::fit(&acts.spatial, inception::SPATIAL_DIM, &device),
        }
    };
    let ref_pool = match (ref_pool, &reference) {
        (Some(g), _) => g,
        (None, Some(r)) => stats_of(r, false).context("--ref statistics")?,
        (None, None) => unreachable!("checked above"),
    };
    let ref_spatial = match (ref_spatial, &reference) {
        (Some(g), _) => g,
        (None, Some(r)) => stats_of(r, true).context("--ref statistics")?,
        (None, None) => unreachable!("checked above"),
    };
    let fid = stats::frechet_distance(&stats_of(&sample, false)?, &ref_pool)?;
    let sfid = stats::frechet_distance(&stats_of(&sample, true)?, &ref_spatial)?;
    let (is, is_std) = stats::inception_score(&sample.logits, inception::LOGIT_DIM, splits)
        .context("Inception Score")?;
    let pr = match &reference {
        Some(r) => Some(
            stats::precision_recall(&r.pool, &sample.pool, inception::POOL_DIM, 3, &device)
                .context("precision/recall")?,
        ),
        None => {
            eprintln!("note: the reference has no `arr_0` images: no precision / recall");
            None
        }
    };
    println!("Inception Score: {is:.4} (std over splits {is_std:.4})");
    println!("FID: {fid:.4}");
    println!("sFID: {sfid:.4}");
    if let Some((p, r)) = pr {
        println!("Precision: {p:.4}");
        println!("Recall: {r:.4}");
    }
    eprintln!(
        "{} samples{} in {:.1}s",
        sample.n,
        reference
            .as_ref()
            .map(|r| format!(" and {} reference images", r.n))
            .unwrap_or_default(),
        start.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "samples": a.samples, "reference": a.reference, "num_samples": sample.n,
            "preprocess": a.preprocess,
            "inception_score": is, "inception_score_std": is_std,
            "fid": fid, "sfid": sfid,
            "precision": pr.map(|x| x.0), "recall": pr.map(|x| x.1),
        });
        arpg::util::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())
            .with_context(|| format!("--json {}", p.display()))?;
    }
    Ok(())
}
