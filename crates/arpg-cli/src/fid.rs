//! `arpg sample-fid` (many samples, sharded over GPUs, resumable, ADM's `.npz`) and
//! `arpg eval` (FID, sFID, IS, precision, recall as ADM's evaluator computes them).

use crate::args::{DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use crate::{launch, Bar};
use anyhow::Result;
use arpg::eval::fid::EvalJob;
use arpg::eval::sample_fid_run::{RankSampled, SampleFidJob};
use clap::Args;
use indicatif::ProgressBar;
use std::path::PathBuf;

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

/// What the samples depend on, as the flags say it (kept beside the shards: a run of other
/// settings is refused). Graphs or not, the tokens are the same: that flag must not block a
/// resume.
fn settings(a: &SampleFidArgs) -> serde_json::Value {
    serde_json::json!({
        "num_samples": a.num_samples,
        "per_class": a.per_class,
        "shard_size": a.shard_size,
        "seed": a.sampling.seed,
        "model": format!("{:?}", a.model),
        "vq": format!("{:?}", a.vq),
        "dtype": a.device.dtype,
        "sampling": format!("{:?}", SamplingArgs { no_cuda_graph: false, ..a.sampling.clone() }),
    })
}

pub fn run_sample(a: SampleFidArgs) -> Result<()> {
    let seed = a.sampling.seed;
    let spec = a.model.spec(seed);
    let job = SampleFidJob {
        sampling: a.sampling.config(&spec)?,
        tokenizer: a.vq.spec(spec.random, seed)?,
        model: spec,
        placement: a.device.placement(),
        seed,
        num_samples: a.num_samples,
        per_class: a.per_class,
        batch_size: a.batch_size,
        shard_size: a.shard_size,
        out: a.out.clone(),
        png: !a.no_png,
        overlap: !a.no_overlap,
        cuda_graph: !a.sampling.no_cuda_graph,
        settings: settings(&a),
    };
    job.check()?;
    if launch::should_spawn(a.gpus)? {
        if !a.device.device.starts_with("cuda") {
            eprintln!(
                "note: --gpus {} with --device {}: {} processes on the CPU (pass --device cuda for GPUs)",
                a.gpus, a.device.device, a.gpus
            );
        }
        launch::spawn_workers(a.gpus)?;
        let npz = a.out.join("samples.npz");
        eprintln!("all ranks done; samples in {}", npz.display());
        return Ok(());
    }
    let mut scan: Option<ProgressBar> = None;
    let run = job.start(&mut |done, n| {
        if n >= 1000 {
            let pb = scan.get_or_insert_with(|| {
                ProgressBar::new(n as u64).with_message("checking finished shards")
            });
            pb.set_position(done as u64);
        }
    })?;
    scan.inspect(ProgressBar::finish_and_clear);
    let (rank, world) = (run.rank, run.world);
    if rank == 0 && run.resumed() > 0 {
        eprintln!(
            "resuming: {} of {} shards already done in {}",
            run.resumed(),
            run.shards.count(),
            a.out.display()
        );
    }
    // One bar, on rank 0: several processes drawing on one terminal garble each other.
    let mut bar = Bar::new("images", " {per_sec} {msg}");
    if world > 1 {
        bar = bar.with_message(format!("(rank 0 of {world})"));
    }
    let sampled = run.sample(&mut |done, n| {
        if rank == 0 {
            bar.set(done, n)
        }
    })?;
    match &sampled {
        Some(r) if r.sampled.images < r.total => bar.abandon(),
        Some(r) => {
            bar.finish();
            print_rank(rank, r);
        }
        None => {}
    }
    // Rank 0 waits for the others' shards, then assembles the archive.
    let Some(f) = run.finish()? else {
        return Ok(());
    };
    if f.sampled > 0 {
        eprintln!(
            "{} images in {:.1}s ({:.2} images/s over {world} process{})",
            f.sampled,
            f.secs,
            f.sampled as f64 / f.secs,
            if world > 1 { "es" } else { "" }
        );
    }
    eprintln!("{} images in {}", a.num_samples, f.npz.display());
    Ok(())
}

/// A rank's throughput, and after the first batch its steady rate and busy times.
fn print_rank(rank: usize, r: &RankSampled) {
    let made = r.sampled.images;
    eprintln!(
        "rank {rank}: {made} images in {:.1}s ({:.2} images/s)",
        r.secs,
        made as f64 / r.secs
    );
    let st = &r.sampled.stats;
    if let Some(rate) = r.sampled.steady_rate() {
        eprintln!(
            "rank {rank}: first batch {:.2}s (graph capture, cuDNN's algorithm search), then {rate:.2} images/s; busy: tokens {:.2}s, pixels {:.2}s, output {:.2}s",
            st.first.as_secs_f64(),
            st.produce.as_secs_f64(),
            st.decode.as_secs_f64(),
            st.sink.as_secs_f64()
        );
    }
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
    let job = EvalJob {
        samples: a.samples,
        reference: a.reference,
        inception: a.inception,
        device: a.device,
        batch_size: a.batch_size,
        preprocess: a.preprocess,
        is_split_size: a.is_split_size,
        is_splits: a.is_splits,
        json: a.json,
    };
    let mut bar: Option<Bar> = None;
    let e = job.run(&mut |what, done, n| {
        let b = bar.get_or_insert_with(|| {
            Bar::with_head(&format!("{what:>8} {{bar:40}}"), "images", " {per_sec}")
        });
        b.set(done, n);
        if done == n {
            b.finish();
            bar = None;
        }
    })?;
    let s = &e.scores;
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
        "{} samples{} in {:.1}s",
        e.n_samples,
        e.n_reference
            .map(|n| format!(" and {n} reference images"))
            .unwrap_or_default(),
        e.secs
    );
    Ok(())
}
