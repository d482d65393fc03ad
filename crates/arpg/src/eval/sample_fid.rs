//! The sampling side of ADM's protocol (`arpg sample-fid`): N images in class order, in
//! resumable shards each seeded by its index (so the images do not depend on how many
//! processes sample them), assembled into one `.npz` of uint8 images.

use super::npz;
use crate::data::npy;
use crate::model::Arpg;
use crate::sampler::{self, random_order, DecodeGraphs, SampleConfig};
use crate::tokenizer::{image as img, ImageTokenizer};
use crate::util::{seed_for, SeedFor};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// How N images split into shards under an output folder.
#[derive(Debug, Clone)]
pub struct Shards {
    pub out: PathBuf,
    /// Images in all.
    pub n: usize,
    pub shard_size: usize,
}

/// Most shards a run may have: each is a file checked on every run.
pub const MAX_SHARDS: usize = 10_000_000;

impl Shards {
    /// `n` images in shards of `shard_size` (both at least 1) under `out`.
    pub fn new(out: PathBuf, n: usize, shard_size: usize) -> Result<Self> {
        let s = Shards { out, n, shard_size };
        ensure!(
            s.count() <= MAX_SHARDS,
            "--num-samples {n} in shards of --shard-size {shard_size} makes {} shards; at most {MAX_SHARDS}",
            s.count()
        );
        Ok(s)
    }

    pub fn count(&self) -> usize {
        self.n.div_ceil(self.shard_size)
    }

    /// Images in `shards`.
    pub fn images(&self, shards: &[usize]) -> usize {
        shards
            .iter()
            .map(|&s| self.range(s).1 - self.range(s).0)
            .sum()
    }

    /// A shard is held in memory until written: refuse one of `side` x `side` images that
    /// cannot be.
    pub fn check_memory(&self, side: usize) -> Result<()> {
        let k = self.shard_size.min(self.n);
        let side = side as u128;
        crate::util::check_memory(
            k as u128 * side * side * 3 * 2,
            &format!("a shard of {k} images of {side}x{side}"),
        )
    }

    /// The shards not finished yet (`warn`: name unusable ones); `on_checked` after each
    /// shard, since millions take a while.
    pub fn pending(&self, warn: bool, on_checked: &mut dyn FnMut()) -> Vec<usize> {
        (0..self.count())
            .filter(|&s| {
                on_checked();
                self.done(s, warn).is_none()
            })
            .collect()
    }

    /// Rank 0's wait for the shards of the other ranks; false when Ctrl-C ends it first.
    pub fn wait_for_all(&self) -> bool {
        let mut waited = false;
        loop {
            let missing = self.pending(false, &mut || {}).len();
            if missing == 0 {
                return true;
            }
            if !waited {
                eprintln!("waiting for {missing} shard(s) from the other ranks");
                waited = true;
            }
            if crate::util::interrupted() {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    /// `samples.npz` of the finished shards, assembled unless it exists and this run
    /// sampled nothing.
    pub fn finish(&self, sampled: usize) -> Result<PathBuf> {
        let npz_path = self.out.join("samples.npz");
        if sampled > 0 || !npz_path.exists() {
            self.assemble(&npz_path)?;
        }
        Ok(npz_path)
    }

    /// Images `[begin, end)` of shard `s`.
    pub fn range(&self, s: usize) -> (usize, usize) {
        (
            s.saturating_mul(self.shard_size).min(self.n),
            (s + 1).saturating_mul(self.shard_size).min(self.n),
        )
    }

    pub fn path(&self, s: usize) -> PathBuf {
        self.out.join("shards").join(format!("shard_{s:05}.npy"))
    }

    /// A finished shard: a complete `.npy` of its uint8 images; their (height, width). A
    /// shard file that is truncated or of another shape is reported (by name, with `warn`)
    /// and counts as not done, so that it is sampled again rather than failing every later
    /// assembly.
    pub fn done(&self, s: usize, warn: bool) -> Option<(usize, usize)> {
        let p = self.path(s);
        if !p.exists() {
            return None;
        }
        let (b, e) = self.range(s);
        let n = e - b;
        let check = || -> Result<(usize, usize)> {
            let (h, _) = npz::npy_body(&p)?;
            let shape = &h.shape;
            ensure!(
                h.is_u8() && shape.len() == 4 && shape[0] == n && shape[3] == 3,
                "{}: {} {shape:?}, expected {n} uint8 images (N x H x W x 3)",
                p.display(),
                h.descr
            );
            Ok((shape[1], shape[2]))
        };
        match check() {
            Ok(hw) => Some(hw),
            Err(e) => {
                if warn {
                    eprintln!("warning: shard {s} is unusable, sampling it again: {e:#}");
                }
                None
            }
        }
    }

    /// Refuse shards of other settings (`meta`, kept in `shards/meta.json`), or record ours.
    pub fn check_settings(&self, meta: &serde_json::Value) -> Result<()> {
        let meta_path = self.out.join("shards").join("meta.json");
        match std::fs::read_to_string(&meta_path) {
            Ok(text) => {
                let old: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("corrupt {}", meta_path.display()))?;
                if &old != meta {
                    bail!(
                        "--out {} holds shards of other settings ({}); use another --out or delete it.\n  theirs: {old}\n  ours:   {meta}",
                        self.out.display(),
                        meta_path.display()
                    );
                }
                Ok(())
            }
            Err(_) => crate::util::write_atomic(
                &meta_path,
                serde_json::to_string_pretty(meta)?.as_bytes(),
            ),
        }
    }

    /// Concatenate the shards' image data into `arr_0` of one `.npz`, streaming.
    pub fn assemble(&self, npz_path: &Path) -> Result<()> {
        let n_shards = self.count();
        let mut hw = None;
        let mut readers: Vec<Box<dyn Read>> = Vec::with_capacity(n_shards);
        for s in 0..n_shards {
            let p = self.path(s);
            let (h, body) = npz::npy_body(&p)?;
            let shape = h.shape.clone();
            let (b, e) = self.range(s);
            ensure!(
                h.is_u8() && shape.len() == 4 && shape[0] == e - b && shape[3] == 3,
                "{}: shape {shape:?}, expected {} images",
                p.display(),
                e - b
            );
            let this = (shape[1], shape[2]);
            let first = *hw.get_or_insert(this);
            if first != this {
                bail!(
                    "{}: images of {}x{}, the others are {}x{}",
                    p.display(),
                    this.0,
                    this.1,
                    first.0,
                    first.1
                );
            }
            readers.push(Box::new(
                body.take((e - b) as u64 * (this.0 * this.1 * 3) as u64),
            ));
        }
        let (h, w) = hw.context("no shards")?;
        let chain = readers
            .into_iter()
            .reduce(|x, y| Box::new(x.chain(y)))
            .context("no shards")?;
        npz::write(
            npz_path,
            vec![npz::Entry {
                name: "arr_0".into(),
                descr: "|u1".into(),
                shape: vec![self.n, h, w, 3],
                body: chain,
            }],
        )
    }
}

/// What one process samples, and how.
pub struct Sampling<'a> {
    pub model: &'a Arpg,
    /// The VQ decoder (on its own stream when `overlap`).
    pub tokenizer: &'a ImageTokenizer,
    /// The model's device, seeded per shard.
    pub device: &'a Device,
    pub sc: &'a SampleConfig,
    pub graphs: &'a mut DecodeGraphs,
    /// The run's seed; shard `s` samples from `seed_for(seed, Shard(s))`.
    pub seed: u64,
    /// Image `i` has class `(i / per_class) % num_classes`.
    pub per_class: usize,
    pub batch_size: usize,
    /// Decode the previous batch to pixels while the next one's tokens are made.
    pub overlap: bool,
    /// Also write one PNG per image under `out/images` (on writer threads).
    pub png: bool,
}

/// What [`sample_shards`] did.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// Images made: fewer than asked when Ctrl-C stopped the run.
    pub images: usize,
    /// Images per batch, in order.
    pub batch_images: Vec<usize>,
    pub stats: crate::pipeline::Stats,
}

impl Sampled {
    /// Images per second after the first batch (which holds the graph capture and cuDNN's
    /// algorithm search): the rate a long run approaches.
    pub fn steady_rate(&self) -> Option<f64> {
        self.stats.steady_rate(|i| self.batch_images[i])
    }
}

/// Sample the shards `mine` of `shards` (each file written atomically once complete, its
/// PNGs first); `on_images(n)` after each batch. The images made are fewer than asked when
/// Ctrl-C stopped it (the unfinished shard is dropped, to be sampled on a rerun).
pub fn sample_shards(
    shards: &Shards,
    mine: &[usize],
    s: Sampling,
    on_images: &mut dyn FnMut(usize),
) -> Result<Sampled> {
    let mcfg = s.model.config();
    let grid = mcfg.grid_size();
    let positions: Vec<usize> = (0..mcfg.block_size).collect();
    // Every batch of every shard, in order: (shard, index of its first image, classes).
    let mut jobs = Vec::new();
    for &sh in mine {
        let (b, e) = shards.range(sh);
        let classes: Vec<usize> = (b..e)
            .map(|i| (i / s.per_class) % mcfg.num_classes)
            .collect();
        for (bi, batch) in classes.chunks(s.batch_size).enumerate() {
            jobs.push((sh, b + bi * s.batch_size, batch.to_vec()));
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let graphs = s.graphs;
    let produce = |i: usize| -> Result<Option<Tensor>> {
        let Some((sh, first, classes)) = jobs.get(i) else {
            return Ok(None);
        };
        if crate::util::interrupted() {
            return Ok(None);
        }
        if *first == shards.range(*sh).0 {
            // A shard's images depend on its seed alone, whoever samples it.
            let seed = seed_for(s.seed, SeedFor::Shard(*sh as u64));
            rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            crate::device::seed(s.device, seed)?;
        }
        let orders = vec![random_order(&positions, &mut rng); classes.len()];
        // The tokens stay on the device: the decoder thread takes them from there.
        let toks =
            sampler::generate_classes(s.model, classes, &orders, s.sc, &mut rng, Some(graphs))?;
        crate::device::tokens_ready(s.device)?;
        Ok(Some(toks))
    };
    let decode = |toks: Tensor| s.tokenizer.decode_u8(&toks, (grid, grid));
    // PNG encoding off the sampling thread (the reference encodes on it, between batches).
    let png_threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let pngs = s.png.then(|| img::PngWriter::new(png_threads));
    let mut bytes = Vec::new();
    let sink = |i: usize, px: img::Pixels| -> Result<()> {
        let (sh, first, classes) = &jobs[i];
        if let Some(pngs) = &pngs {
            for (j, class) in classes.iter().enumerate() {
                let p = shards
                    .out
                    .join("images")
                    .join(img::sample_png_name(first + j, *class));
                pngs.submit(p, px.image(j))?;
            }
        }
        bytes.extend_from_slice(&px.data);
        on_images(classes.len());
        let (b, e) = shards.range(*sh);
        if first + classes.len() == e {
            // The shard file is the mark of a finished shard, so it is written last,
            // atomically, once the shard's PNGs are on disk.
            if let Some(pngs) = &pngs {
                pngs.flush()?;
            }
            let body = npy::to_bytes("|u1", &[e - b, px.h, px.w, 3], &bytes);
            crate::util::write_atomic(&shards.path(*sh), &body)?;
            bytes.clear();
        }
        Ok(())
    };
    let stats = crate::pipeline::run(s.overlap, produce, decode, sink)?;
    let done = stats.batches;
    if done < jobs.len() {
        eprintln!(
            "interrupted: the unfinished shard {} is dropped; rerun to resume",
            jobs[done].0
        );
    }
    let batch_images: Vec<usize> = jobs[..done].iter().map(|j| j.2.len()).collect();
    Ok(Sampled {
        images: batch_images.iter().sum(),
        batch_images,
        stats,
    })
}
