//! The run of `arpg sample-fid` on one process: its settings checked before any worker starts,
//! its place among the ranks, the shards still to do (resuming what an earlier run left),
//! its share sampled with [`sample_shards`], and on rank 0 the wait for the others and the
//! archive. The command line launches the workers and prints.

use super::sample_fid::{sample_shards, Sampled, Sampling, Shards};
use crate::sampler::{validate_settings, DecodeGraphs, DecodeShape, SampleConfig};
use crate::train::dist::DistEnv;
use crate::zoo::{ModelSpec, Placement, TokenizerSpec};
use anyhow::{bail, ensure, Result};
use std::path::PathBuf;
use std::time::Instant;

/// What to sample, with what, and where to.
#[derive(Debug, Clone)]
pub struct SampleFidJob {
    pub model: ModelSpec,
    pub tokenizer: TokenizerSpec,
    /// A worker of several takes the GPU of its local rank (a CPU run stays on the CPU).
    pub placement: Placement,
    pub sampling: SampleConfig,
    /// The run's seed; shard `s` samples from its own seed derived from it.
    pub seed: u64,
    pub num_samples: usize,
    /// Image `i` has class `(i / per_class) % num_classes`.
    pub per_class: usize,
    pub batch_size: usize,
    pub shard_size: usize,
    /// `shards/`, `images/` and `samples.npz`.
    pub out: PathBuf,
    pub png: bool,
    /// Decode the previous batch to pixels (on a second stream) while the next is sampled.
    pub overlap: bool,
    pub cuda_graph: bool,
    /// What the samples depend on, kept beside the shards: a run with other settings is
    /// refused rather than mixed in.
    pub settings: serde_json::Value,
}

/// One process's part of a run ([`SampleFidJob::start`]).
pub struct FidRun<'a> {
    job: &'a SampleFidJob,
    placement: Placement,
    pub shards: Shards,
    /// Shards not finished before this run, and this rank's share of them.
    pub pending: Vec<usize>,
    pub mine: Vec<usize>,
    pub rank: usize,
    pub world: usize,
    start: Instant,
}

/// What this rank sampled: fewer images than `total` when Ctrl-C stopped it.
pub struct RankSampled {
    pub sampled: Sampled,
    pub total: usize,
    pub secs: f64,
}

/// The archive rank 0 assembled, and the images this run sampled over all ranks.
pub struct Finished {
    pub npz: PathBuf,
    pub sampled: usize,
    pub secs: f64,
}

impl SampleFidJob {
    /// The counts, the model named, and the sampler's settings for it: before any worker
    /// starts.
    pub fn check(&self) -> Result<()> {
        ensure!(self.num_samples >= 1, "--num-samples must be at least 1");
        ensure!(
            self.per_class >= 1 && self.batch_size >= 1 && self.shard_size >= 1,
            "--per-class, --batch-size and --shard-size must be at least 1"
        );
        if self.model.names_nothing() {
            bail!("name the model: --model ARPG-L|ARPG-XL|ARPG-XXL|digits, --config/--weights, or --init random");
        }
        let mc = self.model.config()?;
        validate_settings(DecodeShape::of_config(&mc), &self.sampling)
    }

    /// This process's rank, its shards and the ones done before (checked on rank 0, which
    /// names unusable ones; `on_checked(checked, all)` as it goes), the outputs' memory and
    /// settings checked.
    pub fn start(&self, on_checked: &mut dyn FnMut(usize, usize)) -> Result<FidRun<'_>> {
        let dist = DistEnv::of_run()?;
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
        let mut placement = self.placement.clone();
        if let Some(d) = dist.filter(|_| placement.device.starts_with("cuda")) {
            placement.device = d.worker_device();
        }
        let shards = Shards::new(self.out.clone(), self.num_samples, self.shard_size)?;
        let mc = self.model.config()?;
        shards.check_memory(mc.grid_size() * self.tokenizer.patch_size(mc.vocab_size)?)?;
        shards.check_settings(&self.settings)?;
        let n = shards.count();
        let mut checked = 0;
        let pending = shards.pending(rank == 0, &mut || {
            checked += 1;
            if rank == 0 {
                on_checked(checked, n);
            }
        });
        let mine = pending.iter().copied().filter(|s| s % world == rank);
        Ok(FidRun {
            job: self,
            placement,
            mine: mine.collect(),
            pending,
            shards,
            rank,
            world,
            start: Instant::now(),
        })
    }
}

impl FidRun<'_> {
    /// Shards finished by an earlier run.
    pub fn resumed(&self) -> usize {
        self.shards.count() - self.pending.len()
    }

    /// Samples this rank's shards (none: `None`): the model and the VQ decoder loaded (the
    /// decoder on its own stream when overlapping); `on_images(made, total)` before the
    /// first batch and after each.
    pub fn sample(&self, on_images: &mut dyn FnMut(usize, usize)) -> Result<Option<RankSampled>> {
        if self.mine.is_empty() {
            return Ok(None);
        }
        let job = self.job;
        let (device, dtype) = self.placement.resolve()?;
        let model = job.model.load(dtype, &device)?;
        // The VQ decoder works on its own stream, so that it overlaps with the token decoding.
        let vq_device = match job.overlap {
            true => crate::device::second_stream(&device)?,
            false => device.clone(),
        };
        let vocab = model.config().vocab_size;
        let tokenizer = job.tokenizer.load(vocab, dtype, &vq_device)?;
        let total = self.shards.images(&self.mine);
        let start = Instant::now();
        let mut graphs = DecodeGraphs::new(job.cuda_graph);
        let sampling = Sampling {
            model: &model,
            tokenizer: &tokenizer,
            device: &device,
            sc: &job.sampling,
            graphs: &mut graphs,
            seed: job.seed,
            per_class: job.per_class,
            batch_size: job.batch_size,
            overlap: job.overlap,
            png: job.png,
        };
        let mut made = 0;
        on_images(0, total);
        let sampled = sample_shards(&self.shards, &self.mine, sampling, &mut |n| {
            made += n;
            on_images(made, total)
        })?;
        Ok(Some(RankSampled {
            sampled,
            total,
            secs: start.elapsed().as_secs_f64(),
        }))
    }

    /// Rank 0, once every rank's shards are done: `samples.npz` of them all (kept as it is
    /// when this run sampled nothing). `None` on other ranks and after Ctrl-C.
    pub fn finish(&self) -> Result<Option<Finished>> {
        if crate::util::interrupted() || self.rank != 0 || !self.shards.wait_for_all() {
            return Ok(None);
        }
        let secs = self.start.elapsed().as_secs_f64();
        let sampled = self.shards.images(&self.pending);
        let npz = self.shards.finish(sampled)?;
        Ok(Some(Finished { npz, sampled, secs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(out: PathBuf) -> SampleFidJob {
        let (model, tokenizer, placement) = crate::zoo::digits_on_cpu();
        SampleFidJob {
            model,
            tokenizer,
            placement,
            sampling: SampleConfig {
                steps: 4,
                ..Default::default()
            },
            seed: 0,
            num_samples: 6,
            per_class: 1,
            batch_size: 2,
            shard_size: 4,
            out,
            png: false,
            overlap: false,
            cuda_graph: false,
            settings: serde_json::json!({"test": 1}),
        }
    }

    #[test]
    fn one_process_samples_every_shard_and_a_rerun_resumes_them() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(dir.path().to_path_buf());
        j.check().unwrap();
        let nothing = SampleFidJob {
            model: ModelSpec::default(),
            ..j.clone()
        };
        assert!(nothing
            .check()
            .unwrap_err()
            .to_string()
            .contains("name the model"));
        let run = j.start(&mut |_, _| {}).unwrap();
        assert_eq!((run.rank, run.world, run.resumed()), (0, 1, 0));
        assert_eq!(run.mine, vec![0, 1]);
        let mut seen = Vec::new();
        let r = run.sample(&mut |d, n| seen.push((d, n))).unwrap().unwrap();
        assert_eq!((r.sampled.images, r.total), (6, 6));
        assert_eq!(seen.first(), Some(&(0, 6)));
        let f = run.finish().unwrap().unwrap();
        assert_eq!(f.sampled, 6);
        assert!(f.npz.exists());
        // Everything is done: a rerun samples nothing and keeps the archive.
        let again = j.start(&mut |_, _| {}).unwrap();
        assert_eq!(again.resumed(), 2);
        assert!(again.sample(&mut |_, _| {}).unwrap().is_none());
        assert_eq!(again.finish().unwrap().unwrap().sampled, 0);
        // Other settings are refused rather than mixed in.
        let other = SampleFidJob {
            settings: serde_json::json!({"test": 2}),
            ..j.clone()
        };
        assert!(other.start(&mut |_, _| {}).is_err());
    }
}
