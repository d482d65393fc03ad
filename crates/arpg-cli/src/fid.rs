//! `arpg sample-fid` (many samples, sharded over GPUs, resumable, ADM's `.npz`) and
//! `arpg eval` (FID, sFID, IS, precision, recall as ADM's evaluator computes them).

use crate::args::{DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use crate::launch;
use anyhow::{bail, ensure, Context, Result};
use arpg::eval::fid::Inputs;
use arpg::eval::inception::{InceptionV3, Preprocess};
use arpg::eval::sample_fid::{Sampling, Shards};
use arpg::eval::stats::IsSplits;
use arpg::sampler::{self, DecodeShape};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

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
    if a.model.spec(0).names_nothing() {
        bail!("name the model: --model ARPG-L|ARPG-XL|ARPG-XXL|digits, --config/--weights, or --init random");
    }
    // The sampler's checks, before any worker starts.
    let spec = a.model.spec(a.sampling.seed);
    let mcfg = spec.config()?;
    sampler::validate_settings(DecodeShape::of_config(&mcfg), &a.sampling.config(&spec)?)?;
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
    let dist = launch::Dist::of_run()?;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
    if let Some(d) = &dist {
        // A worker takes the GPU of its local rank (a CPU run stays on the CPU, for tests).
        if a.device.device.starts_with("cuda") {
            a.device.device = d.worker_device();
        }
    }
    let shards = Shards::new(a.out.clone(), a.num_samples, a.shard_size)?;
    let patch = a.vq.spec(false, 0)?.patch_size(mcfg.vocab_size)?;
    shards.check_memory(mcfg.grid_size() * patch)?;
    // Shards of another configuration must not be mixed in: the settings live beside them.
    shards.check_settings(&serde_json::json!({
        "num_samples": a.num_samples,
        "per_class": a.per_class,
        "shard_size": a.shard_size,
        "seed": a.sampling.seed,
        "model": format!("{:?}", a.model),
        "vq": format!("{:?}", a.vq),
        "dtype": a.device.dtype,
        // Graphs or not, the tokens are the same: that flag must not block a resume.
        "sampling": format!("{:?}", SamplingArgs { no_cuda_graph: false, ..a.sampling.clone() }),
    }))?;
    let n_shards = shards.count();
    let scan = match n_shards >= 1000 && rank == 0 {
        true => ProgressBar::new(n_shards as u64).with_message("checking finished shards"),
        false => ProgressBar::hidden(),
    };
    let pending = shards.pending(rank == 0, &mut || scan.inc(1));
    scan.finish_and_clear();
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
    // Rank 0 waits for the others' shards, then assembles the archive.
    if arpg::util::interrupted() || rank != 0 || !shards.wait_for_all() {
        return Ok(());
    }
    let secs = start.elapsed().as_secs_f64();
    let sampled = shards.images(&pending);
    let npz_path = shards.finish(sampled)?;
    if sampled > 0 {
        eprintln!(
            "{sampled} images in {secs:.1}s ({:.2} images/s over {world} process{})",
            sampled as f64 / secs,
            if world > 1 { "es" } else { "" }
        );
    }
    eprintln!("{} images in {}", a.num_samples, npz_path.display());
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
    let tk =
        a.vq.spec(spec.random, a.sampling.seed)?
            .load(mcfg.vocab_size, dtype, &vq_device)?;
    let total = shards.images(mine);
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
    let sampled = arpg::eval::sample_fid::sample_shards(
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
    let made = sampled.images;
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
    let st = &sampled.stats;
    if let Some(rate) = sampled.steady_rate() {
        eprintln!(
            "rank {rank}: first batch {:.2}s (graph capture, cuDNN's algorithm search), then {rate:.2} images/s; busy: tokens {:.2}s, pixels {:.2}s, output {:.2}s",
            st.first.as_secs_f64(),
            st.produce.as_secs_f64(),
            st.decode.as_secs_f64(),
            st.sink.as_secs_f64()
        );
    }
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
    let inputs = Inputs::open(&a.samples, &a.reference, splits, a.batch_size)?;
    let (n_samples, n_reference) = (inputs.n_samples, inputs.n_reference);
    let net = if a.inception.as_os_str() == "random" {
        eprintln!("warning: --inception random: synthetic weights, the scores are meaningless");
        InceptionV3::synthetic(&device)?
    } else {
        InceptionV3::load(&a.inception, &device).context("--inception")?
    };
    let start = Instant::now();
    let mut bar: Option<ProgressBar> = None;
    let s = inputs.score(&net, a.batch_size, pre, splits, &mut |what, done, n| {
        let pb = bar.get_or_insert_with(|| {
            ProgressBar::new(n as u64).with_style(
                ProgressStyle::with_template(&format!(
                    "{what:>8} {{bar:40}} {{pos}}/{{len}} images [{{elapsed_precise}}<{{eta_precise}}] {{per_sec}}"
                ))
                .unwrap(),
            )
        });
        pb.set_position(done as u64);
        if done == n {
            pb.finish_and_clear();
            bar = None;
        }
    })?;
    if s.precision_recall.is_none() {
        eprintln!("note: the reference has no `arr_0` images: no precision / recall");
    }
    println!(
        "Inception Score: {:.4} (std over splits {:.4})",
        s.inception_score, s.inception_score_std
    );
    println!("FID: {:.4}", s.fid);
    println!("sFID: {:.4}", s.sfid);
    if let Some((p, r)) = s.precision_recall {
        println!("Precision: {p:.4}");
        println!("Recall: {r:.4}");
    }
    eprintln!(
        "{n_samples} samples{} in {:.1}s",
        n_reference
            .map(|n| format!(" and {n} reference images"))
            .unwrap_or_default(),
        start.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.json {
        let pr = s.precision_recall;
        let j = serde_json::json!({
            "samples": a.samples, "reference": a.reference, "num_samples": n_samples,
            "preprocess": a.preprocess,
            "inception_score": s.inception_score, "inception_score_std": s.inception_score_std,
            "fid": s.fid, "sfid": s.sfid,
            "precision": pr.map(|x| x.0), "recall": pr.map(|x| x.1),
        });
        arpg::util::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())
            .with_context(|| format!("--json {}", p.display()))?;
    }
    Ok(())
}
