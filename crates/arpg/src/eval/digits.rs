//! Quality of generated digits: a k-nearest-neighbour classifier trained on real digits
//! labels the samples, and exact copies of training images are counted.

use crate::data::digits::Digit;
use crate::model::Arpg;
use crate::sampler::{decode, random_order, Condition, Request, SampleConfig};
use anyhow::Result;
use rand::SeedableRng;
use serde::Serialize;

/// k-NN on raw 8x8 intensities (squared Euclidean distance, majority vote, nearest wins ties).
pub struct KnnClassifier {
    train: Vec<Digit>,
    k: usize,
}

impl KnnClassifier {
    pub fn new(train: Vec<Digit>, k: usize) -> Self {
        Self { train, k: k.max(1) }
    }

    pub fn predict(&self, pixels: &[u8; 64]) -> u32 {
        let mut d: Vec<(u32, u32)> = self
            .train
            .iter()
            .map(|t| {
                let dist = t
                    .pixels
                    .iter()
                    .zip(pixels)
                    .map(|(&a, &b)| (a as i32 - b as i32).pow(2) as u32)
                    .sum();
                (dist, t.label)
            })
            .collect();
        d.sort_unstable();
        let mut votes = [0usize; 10];
        for &(_, l) in d.iter().take(self.k) {
            votes[l as usize] += 1;
        }
        let best = *votes.iter().max().unwrap_or(&0);
        // Among tied labels, the one of the nearest neighbour (none without training digits).
        d.iter()
            .take(self.k)
            .find(|(_, l)| votes[*l as usize] == best)
            .map_or(0, |x| x.1)
    }

    pub fn accuracy(&self, digits: &[Digit]) -> f64 {
        let ok = digits
            .iter()
            .filter(|d| self.predict(&d.pixels) == d.label)
            .count();
        ok as f64 / digits.len().max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DigitsReport {
    pub samples: usize,
    /// Share of samples the classifier labels as their requested class.
    pub class_accuracy: f64,
    /// Share of samples identical to some training image.
    pub copy_rate: f64,
    /// The classifier's own accuracy on the held-out real digits.
    pub classifier_test_accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    /// The sketch task: mean IoU of each sample's stroke mask with the sketch it was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sketch_iou: Option<f64>,
}

/// What [`run_task`] asks a digits model to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigitsTask {
    /// `per_class` digits of every class.
    Sample { per_class: usize },
    /// Regenerate the lower half of every held-out digit given its upper half and class.
    Inpaint,
    /// Draw every held-out digit's class given its stroke mask (`control::digit_sketch`) as
    /// the condition; a model without a control encoder gets no condition (the baseline).
    Sketch,
}

impl DigitsTask {
    /// `--task`: `sample` (`per_class` digits of each class), `inpaint` or `sketch`.
    pub fn parse(s: &str, per_class: usize) -> Result<Self> {
        match s {
            "sample" => Ok(Self::Sample { per_class }),
            "inpaint" => Ok(Self::Inpaint),
            "sketch" => Ok(Self::Sketch),
            _ => anyhow::bail!("unknown task {s:?} (expected sample, inpaint or sketch)"),
        }
    }

    /// Samples the task draws, with `test` held-out digits.
    pub fn samples(&self, test: usize) -> usize {
        match self {
            Self::Sample { per_class } => per_class * 10,
            _ => test,
        }
    }
}

/// The judge's digits from the UCI CSV at `path`: (training split, test split), both
/// non-empty.
pub fn load_splits(path: &std::path::Path) -> Result<(Vec<Digit>, Vec<Digit>)> {
    use anyhow::Context;
    let (train, test) =
        crate::data::digits::split(&crate::data::digits::load_csv_gz(path).context("--data")?);
    anyhow::ensure!(
        !train.is_empty() && !test.is_empty(),
        "--data {}: {} digit(s); the judge needs a training and a test split (2 at least)",
        path.display(),
        train.len() + test.len()
    );
    Ok((train, test))
}

/// Run `task` on `model` (batches of `batch`, seeded by `seed`) and score it against the
/// training digits (`on_batch` gets the samples done so far).
#[allow(clippy::too_many_arguments)]
pub fn run_task(
    model: &Arpg,
    task: DigitsTask,
    train: &[Digit],
    test: &[Digit],
    sc: &SampleConfig,
    batch: usize,
    seed: u64,
    on_batch: &mut dyn FnMut(usize),
) -> Result<DigitsReport> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let classes: Vec<usize> = match task {
        DigitsTask::Sample { per_class } => (0..10)
            .flat_map(|c| std::iter::repeat_n(c, per_class))
            .collect(),
        _ => test.iter().map(|d| d.label as usize).collect(),
    };
    let knowns: Vec<Vec<(usize, u32)>> = match task {
        DigitsTask::Inpaint => test
            .iter()
            .map(|d| (0..32).map(|p| (p, d.pixels[p] as u32)).collect())
            .collect(),
        _ => vec![vec![]; classes.len()],
    };
    let sketches: Vec<[u8; 64]> = match task {
        DigitsTask::Sketch => test
            .iter()
            .map(|d| crate::control::digit_sketch(&d.pixels))
            .collect(),
        _ => vec![[0; 64]; classes.len()],
    };
    let sc = SampleConfig {
        steps: match task {
            DigitsTask::Inpaint => sc.steps.min(32),
            _ => sc.steps,
        },
        ..sc.clone()
    };
    let positions: Vec<usize> = match task {
        DigitsTask::Inpaint => (32..64).collect(),
        _ => (0..64).collect(),
    };
    let controlled = task == DigitsTask::Sketch && model.control().is_some();
    let bs = batch.max(1);
    let mut samples = Vec::with_capacity(classes.len());
    let mut ious = Vec::new();
    for ((b, known), sk) in classes
        .chunks(bs)
        .zip(knowns.chunks(bs))
        .zip(sketches.chunks(bs))
    {
        let orders: Vec<Vec<usize>> = b
            .iter()
            .map(|_| random_order(&positions, &mut rng))
            .collect();
        let images = crate::control::sketch_tensor(sk)?;
        let condition = controlled.then_some(Condition {
            images: &images,
            guide: model
                .config()
                .control
                .as_ref()
                .is_some_and(|c| c.dropout > 0.0),
        });
        let req = Request {
            classes: b,
            known,
            orders: &orders,
            condition,
        };
        for ((c, t), s) in b.iter().zip(decode(model, &req, &sc, &mut rng)?).zip(sk) {
            let mut px = [0u8; 64];
            for (p, v) in px.iter_mut().zip(t) {
                *p = v as u8;
            }
            if task == DigitsTask::Sketch {
                ious.push(crate::control::mask_iou(
                    &crate::control::digit_sketch(&px),
                    s,
                ));
            }
            samples.push((*c as u32, px));
        }
        on_batch(samples.len());
    }
    let mut r = report(&samples, train, test);
    if task == DigitsTask::Sketch {
        r.sketch_iou = Some(ious.iter().sum::<f64>() / ious.len().max(1) as f64);
    }
    Ok(r)
}

/// Score `samples` (requested class, pixels 0..=16) against the training digits.
pub fn report(samples: &[(u32, [u8; 64])], train: &[Digit], test: &[Digit]) -> DigitsReport {
    let knn = KnnClassifier::new(train.to_vec(), 3);
    let mut per = [(0usize, 0usize); 10];
    let mut copies = 0;
    for (c, px) in samples {
        let hit = knn.predict(px) == *c;
        per[*c as usize].0 += hit as usize;
        per[*c as usize].1 += 1;
        copies += train.iter().any(|t| &t.pixels == px) as usize;
    }
    let hits: usize = per.iter().map(|p| p.0).sum();
    DigitsReport {
        samples: samples.len(),
        class_accuracy: hits as f64 / samples.len().max(1) as f64,
        copy_rate: copies as f64 / samples.len().max(1) as f64,
        classifier_test_accuracy: knn.accuracy(test),
        per_class_accuracy: per.iter().map(|p| p.0 as f64 / p.1.max(1) as f64).collect(),
        sketch_iou: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> EvalDigitsJob {
        EvalDigitsJob {
            model: Default::default(),
            placement: crate::zoo::Placement {
                device: "cpu".into(),
                dtype: "f32".into(),
            },
            data: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../data/digits/digits.csv.gz"
            )
            .into(),
            task: DigitsTask::Sample { per_class: 1 },
            sampling: SampleConfig {
                steps: 8,
                ..Default::default()
            },
            batch_size: 16,
            seed: 0,
            json_out: None,
        }
    }

    #[test]
    fn an_eval_digits_job_takes_the_digits_model_by_default_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.json");
        let mut seen = Vec::new();
        let r = EvalDigitsJob {
            json_out: Some(out.clone()),
            ..job()
        }
        .run(&mut |d, n| seen.push((d, n)))
        .unwrap();
        assert_eq!(r.samples, 10);
        assert_eq!(seen.last(), Some(&(10, 10)));
        assert!(std::fs::read_to_string(&out)
            .unwrap()
            .contains("class_accuracy"));
        let err = |j: EvalDigitsJob| j.run(&mut |_, _| {}).unwrap_err().to_string();
        let e = err(EvalDigitsJob {
            task: DigitsTask::Sample { per_class: 0 },
            ..job()
        });
        assert!(e.contains("--per-class"), "{e}");
        let mut not_digits = job();
        not_digits.model.model = Some("ARPG-L".into());
        assert!(err(not_digits).contains("needs a digits model"));
    }

    #[test]
    fn knn_recognises_its_training_points_and_counts_copies() {
        let mk = |label: u32, v: u8| Digit {
            label,
            pixels: [v; 64],
        };
        let train = vec![
            mk(0, 0),
            mk(0, 1),
            mk(1, 15),
            mk(1, 16),
            mk(0, 2),
            mk(1, 14),
        ];
        let knn = KnnClassifier::new(train.clone(), 3);
        assert_eq!(knn.predict(&[3; 64]), 0);
        assert_eq!(knn.predict(&[13; 64]), 1);
        let r = report(&[(0, [1; 64]), (1, [5; 64]), (1, [12; 64])], &train, &train);
        assert_eq!(r.samples, 3);
        assert!((r.copy_rate - 1.0 / 3.0).abs() < 1e-9);
        assert!((r.class_accuracy - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.classifier_test_accuracy, 1.0);
    }
}

/// What `arpg eval-digits` asks for: a digits model, a task, and the digits that judge it.
#[derive(Debug, Clone)]
pub struct EvalDigitsJob {
    /// The model; the shipped digits model when it names neither a preset nor a config.
    pub model: crate::zoo::ModelSpec,
    pub placement: crate::zoo::Placement,
    /// The UCI digits CSV: its training split trains the judge and is the reference for
    /// copies, its test split measures the judge.
    pub data: std::path::PathBuf,
    pub task: DigitsTask,
    pub sampling: SampleConfig,
    pub batch_size: usize,
    pub seed: u64,
    /// Also write the report here as JSON (checked to be writable first).
    pub json_out: Option<std::path::PathBuf>,
}

impl EvalDigitsJob {
    /// Checks the job and that the model is a digits model, loads it and the digits, runs
    /// the task ([`run_task`]), writes the report; `on_samples(done, total)` after each batch.
    pub fn run(&self, on_samples: &mut dyn FnMut(usize, usize)) -> Result<DigitsReport> {
        if let DigitsTask::Sample { per_class } = self.task {
            anyhow::ensure!(per_class >= 1, "--per-class must be at least 1");
            // Each sample keeps its class and 64 pixels: refuse what memory cannot hold.
            crate::util::check_memory(
                per_class as u128 * 10 * 96,
                &format!("--per-class {per_class} (x 10 classes)"),
            )?;
        }
        anyhow::ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        if let Some(p) = &self.json_out {
            crate::util::check_writable(p, "--json-out")?;
        }
        let mut spec = self.model.clone();
        if spec.model.is_none() && spec.config.is_none() {
            spec.model = Some(crate::zoo::DIGITS.into());
        }
        let cfg = spec.config()?;
        if cfg.vocab_size != 17 || cfg.num_classes != 10 || cfg.block_size != 64 {
            anyhow::bail!("eval-digits needs a digits model (vocab 17, 10 classes, 64 tokens)");
        }
        let (device, dtype) = self.placement.resolve_seeded(self.seed)?;
        let model = spec.load(dtype, &device)?;
        let (train, test) = load_splits(&self.data)?;
        let total = self.task.samples(test.len());
        let (task, sc, batch, seed) = (self.task, &self.sampling, self.batch_size, self.seed);
        let r = run_task(&model, task, &train, &test, sc, batch, seed, &mut |done| {
            on_samples(done, total)
        })?;
        if let Some(p) = &self.json_out {
            crate::util::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
        }
        Ok(r)
    }
}
