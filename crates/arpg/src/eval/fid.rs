//! ADM's evaluator (`arpg eval`): FID, sFID, Inception Score, precision and recall of a
//! sample batch against a reference batch, both ADM `.npz` files. Errors name the command's
//! flags (`--samples`, `--ref`, `--is-splits`) since that is where a user fixes them.

use super::inception::{self, InceptionV3, Preprocess};
use super::npz;
use super::stats::{self, Gaussian, IsSplits};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// Both files, checked: what the reference brings (images, precomputed statistics).
pub struct Inputs {
    pub samples: PathBuf,
    pub reference: PathBuf,
    pub n_samples: usize,
    /// Images of the reference's `arr_0`, when it has one.
    pub n_reference: Option<usize>,
    ref_pool: Option<Gaussian>,
    ref_spatial: Option<Gaussian>,
}

/// The scores; precision / recall need the reference's images.
#[derive(Debug, Clone, Copy)]
pub struct Scores {
    pub inception_score: f64,
    pub inception_score_std: f64,
    pub fid: f64,
    pub sfid: f64,
    pub precision_recall: Option<(f64, f64)>,
}

impl Inputs {
    /// Checks shapes, dtypes and counts of both files before the long part, and that
    /// `batch_size` images fit through Inception.
    pub fn open(samples: &Path, reference: &Path, splits: IsSplits, batch: usize) -> Result<Self> {
        let sample_names = npz::names(samples).context("--samples")?;
        ensure!(
            sample_names.iter().any(|n| n == "arr_0"),
            "--samples {}: no `arr_0` image array (it has: {})",
            samples.display(),
            sample_names.join(", ")
        );
        let ref_names = npz::names(reference).context("--ref")?;
        let s = npz::ImageReader::open(samples, "arr_0").context("--samples")?;
        let ref_reader = match ref_names.iter().any(|n| n == "arr_0") {
            true => Some(npz::ImageReader::open(reference, "arr_0").context("--ref")?),
            false => None,
        };
        let given = |mu: &str, sigma: &str, dim: usize| {
            given_stats(reference, &ref_names, mu, sigma, dim).context("--ref")
        };
        let ref_pool = given("mu", "sigma", inception::POOL_DIM)?;
        let ref_spatial = given("mu_s", "sigma_s", inception::SPATIAL_DIM)?;
        if ref_reader.is_none() && (ref_pool.is_none() || ref_spatial.is_none()) {
            bail!(
                "--ref {}: needs `arr_0` images or all of `mu`, `sigma`, `mu_s`, `sigma_s` (it has: {})",
                reference.display(),
                ref_names.join(", ")
            );
        }
        // Precision / recall take each point's 3rd nearest neighbour: 4 images at least.
        let min = if ref_reader.is_some() { 4 } else { 2 };
        ensure!(
            s.n >= min,
            "--samples {}: {} image(s); {} needs at least {min} (ADM's protocol uses 50,000)",
            samples.display(),
            s.n,
            match ref_reader.is_some() {
                true => "FID with precision / recall",
                false => "FID",
            }
        );
        if let Some(r) = &ref_reader {
            ensure!(
                r.n >= 4,
                "--ref {}: {} image(s); FID with precision / recall needs at least 4",
                reference.display(),
                r.n
            );
        }
        if let IsSplits::Count(k) = splits {
            ensure!(
                k <= s.n,
                "--is-splits {k}: more splits than the {} samples",
                s.n
            );
        }
        if let Some(r) = ref_reader
            .as_ref()
            .filter(|r| (r.height, r.width) != (s.height, s.width))
        {
            eprintln!(
                "note: samples are {}x{}, the reference {}x{}; both are resized to 299x299 by the network's \
                 bilinear resize, as ADM's evaluator does",
                s.height, s.width, r.height, r.width
            );
        }
        // Inception's activations of one batch, a lower bound (input and the first convolutions).
        let most = s.n.max(ref_reader.as_ref().map_or(0, |r| r.n));
        crate::util::check_memory(
            batch.min(most) as u128 * 299 * 299 * 32 * 4 * 2,
            &format!("--batch-size {batch} through Inception"),
        )?;
        Ok(Inputs {
            samples: samples.to_path_buf(),
            reference: reference.to_path_buf(),
            n_samples: s.n,
            n_reference: ref_reader.map(|r| r.n),
            ref_pool,
            ref_spatial,
        })
    }

    /// Scores the samples; `on_images(what, done, total)` as each file's batches go through
    /// the network (`what`: `samples` or `ref`).
    pub fn score(
        self,
        net: &InceptionV3,
        batch: usize,
        pre: Preprocess,
        splits: IsSplits,
        on_images: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<Scores> {
        let device = net.device();
        let sample = activations(net, &self.samples, "samples", batch, pre, on_images)?;
        let reference = match self.n_reference {
            Some(_) => Some(activations(
                net,
                &self.reference,
                "ref",
                batch,
                pre,
                on_images,
            )?),
            None => None,
        };
        let fit = |acts: &Acts, spatial: bool| match spatial {
            false => Gaussian::fit(&acts.pool, inception::POOL_DIM, device),
            true => Gaussian::fit(&acts.spatial, inception::SPATIAL_DIM, device),
        };
        // Precomputed statistics are used as given; otherwise the reference's images'.
        let of_ref = |given: Option<Gaussian>, spatial: bool| match (given, &reference) {
            (Some(g), _) => Ok(g),
            (None, Some(r)) => fit(r, spatial).context("--ref statistics"),
            (None, None) => unreachable!("checked by Inputs::open"),
        };
        let (ref_pool, ref_spatial) = (
            of_ref(self.ref_pool, false)?,
            of_ref(self.ref_spatial, true)?,
        );
        let fid = stats::frechet_distance(&fit(&sample, false)?, &ref_pool)?;
        let sfid = stats::frechet_distance(&fit(&sample, true)?, &ref_spatial)?;
        let (is, is_std) = stats::inception_score(&sample.logits, inception::LOGIT_DIM, splits)
            .context("Inception Score")?;
        let precision_recall = match &reference {
            Some(r) => Some(
                stats::precision_recall(&r.pool, &sample.pool, inception::POOL_DIM, 3, device)
                    .context("precision/recall")?,
            ),
            None => None,
        };
        Ok(Scores {
            inception_score: is,
            inception_score_std: is_std,
            fid,
            sfid,
            precision_recall,
        })
    }
}

/// Features of every image of an `.npz`'s `arr_0`.
struct Acts {
    pool: Vec<f32>,
    spatial: Vec<f32>,
    logits: Vec<f32>,
}

fn activations(
    net: &InceptionV3,
    path: &Path,
    what: &str,
    batch: usize,
    pre: Preprocess,
    on_images: &mut dyn FnMut(&str, usize, usize),
) -> Result<Acts> {
    let mut r = npz::ImageReader::open(path, "arr_0")?;
    let mut acts = Acts {
        pool: Vec::with_capacity(r.n * inception::POOL_DIM),
        spatial: Vec::with_capacity(r.n * inception::SPATIAL_DIM),
        logits: Vec::with_capacity(r.n * inception::LOGIT_DIM),
    };
    let (n, h, w) = (r.n, r.height, r.width);
    let mut done = 0;
    on_images(what, done, n);
    while let Some((k, bytes)) = r.next_batch(batch)? {
        if crate::util::interrupted() {
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
        done += k;
        on_images(what, done, n);
    }
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

/// What `arpg eval` asks for: both files, the network, and how to run it.
#[derive(Debug, Clone)]
pub struct EvalJob {
    pub samples: PathBuf,
    pub reference: PathBuf,
    /// pytorch-fid's InceptionV3 weights, or `random`: synthetic weights, for tests only.
    pub inception: PathBuf,
    pub device: String,
    pub batch_size: usize,
    /// `adm` or `pytorch-fid` ([`Preprocess`]).
    pub preprocess: String,
    /// Inception Score over chunks of this many samples, or over `is_splits` equal splits.
    pub is_split_size: usize,
    pub is_splits: Option<usize>,
    /// Also write the scores here as JSON (checked to be writable first).
    pub json: Option<PathBuf>,
}

/// The scores of an [`EvalJob`], with what they were computed from.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub scores: Scores,
    pub n_samples: usize,
    pub n_reference: Option<usize>,
    pub secs: f64,
}

impl EvalJob {
    /// Checks the flags and both files, loads the network, scores, writes the JSON;
    /// `on_images(what, done, total)` as [`Inputs::score`] goes.
    pub fn run(&self, on_images: &mut dyn FnMut(&str, usize, usize)) -> Result<Evaluated> {
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        let pre: Preprocess = self.preprocess.parse().context("--preprocess")?;
        let splits = match self.is_splits {
            Some(k) => IsSplits::Count(k),
            None => IsSplits::Size(self.is_split_size),
        };
        ensure!(self.is_splits != Some(0), "--is-splits must be at least 1");
        ensure!(
            self.is_split_size >= 1,
            "--is-split-size must be at least 1"
        );
        if let Some(p) = &self.json {
            crate::util::check_writable(p, "--json")?;
        }
        let device = crate::device::parse_device(&self.device)?;
        let inputs = Inputs::open(&self.samples, &self.reference, splits, self.batch_size)?;
        let (n_samples, n_reference) = (inputs.n_samples, inputs.n_reference);
        let net = if self.inception.as_os_str() == "random" {
            eprintln!("warning: --inception random: synthetic weights, the scores are meaningless");
            InceptionV3::synthetic(&device)?
        } else {
            InceptionV3::load(&self.inception, &device).context("--inception")?
        };
        let start = std::time::Instant::now();
        let scores = inputs.score(&net, self.batch_size, pre, splits, on_images)?;
        let e = Evaluated {
            scores,
            n_samples,
            n_reference,
            secs: start.elapsed().as_secs_f64(),
        };
        if let Some(p) = &self.json {
            e.write_json(self, p)?;
        }
        Ok(e)
    }
}

impl Evaluated {
    /// The scores as JSON at `p`.
    fn write_json(&self, job: &EvalJob, p: &Path) -> Result<()> {
        let s = &self.scores;
        let pr = s.precision_recall;
        let j = serde_json::json!({
            "samples": job.samples, "reference": job.reference, "num_samples": self.n_samples,
            "preprocess": job.preprocess,
            "inception_score": s.inception_score, "inception_score_std": s.inception_score_std,
            "fid": s.fid, "sfid": s.sfid,
            "precision": pr.map(|x| x.0), "recall": pr.map(|x| x.1),
        });
        crate::util::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())
            .with_context(|| format!("--json {}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> EvalJob {
        EvalJob {
            samples: "s.npz".into(),
            reference: "r.npz".into(),
            inception: "random".into(),
            device: "cpu".into(),
            batch_size: 50,
            preprocess: "adm".into(),
            is_split_size: 5000,
            is_splits: None,
            json: None,
        }
    }

    #[test]
    fn an_eval_job_checks_its_flags_before_the_files() {
        let err = |j: EvalJob| format!("{:#}", j.run(&mut |_, _, _| {}).unwrap_err());
        let e = err(EvalJob {
            batch_size: 0,
            ..job()
        });
        assert!(e.contains("--batch-size"), "{e}");
        let e = err(EvalJob {
            preprocess: "tf".into(),
            ..job()
        });
        assert!(e.contains("--preprocess"), "{e}");
        let e = err(EvalJob {
            is_splits: Some(0),
            ..job()
        });
        assert!(e.contains("--is-splits"), "{e}");
        let e = err(job());
        assert!(e.contains("--samples"), "then the files: {e}");
    }
}
