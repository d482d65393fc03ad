//! The flags of the reference's scripts (`sample_c2i_ddp.py`, `train_c2i.py`) that are not
//! plain aliases of ours: they change what other flags mean (its --lr is absolute, its
//! schedule counts epochs) or only take the value the checkpoints were trained with. Accepted
//! so that GETTING_STARTED.md's commands run as typed; anything that cannot mean what it means
//! there is an error naming the flag. The command line parses them into these structs.

use crate::train::optim::Warmup;
use crate::train::setup::{given_config, TrainJob};
use crate::ArpgConfig;
use anyhow::{bail, Result};

/// `sample_c2i_ddp.py`'s flags that this tool has no choice for: accepted when they ask for
/// what the loaded model is.
#[derive(Debug, Clone, Default)]
pub struct SampleFlags {
    pub vq_model: Option<String>,
    pub gpt_type: Option<String>,
    pub image_size: Option<usize>,
    pub image_size_eval: Option<usize>,
    pub downsample_size: Option<usize>,
    pub codebook_size: Option<usize>,
    pub codebook_embed_dim: Option<usize>,
    pub num_classes: Option<usize>,
    pub cls_token_num: Option<usize>,
    pub cfg_interval: Option<f32>,
}

impl SampleFlags {
    /// Refuse a flag that asks for another model, tokenizer or option than `m` and ours.
    pub fn check(&self, m: &ArpgConfig) -> Result<()> {
        let grid = m.grid_size();
        let patch = self.downsample_size.unwrap_or(16);
        let fixed: [(&str, Option<usize>, usize, &str); 6] = [
            (
                "--downsample-size",
                self.downsample_size,
                16,
                "the VQ-16 tokenizer",
            ),
            (
                "--image-size",
                self.image_size,
                grid * patch,
                "the model's token grid times the patch",
            ),
            (
                "--image-size-eval",
                self.image_size_eval,
                grid * patch,
                "no resizing is done: resize the PNGs or the .npz",
            ),
            (
                "--codebook-size",
                self.codebook_size,
                m.vocab_size,
                "the model's vocab_size",
            ),
            (
                "--num-classes",
                self.num_classes,
                m.num_classes,
                "the model's num_classes",
            ),
            (
                "--cls-token-num",
                self.cls_token_num,
                m.cls_token_num,
                "the model's cls_token_num",
            ),
        ];
        for (flag, got, want, why) in fixed {
            if let Some(v) = got.filter(|&v| v != want) {
                bail!("{flag} {v} is not supported: this run can only use {want} ({why})");
            }
        }
        let named = [
            ("--vq-model", &self.vq_model, "VQ-16"),
            ("--gpt-type", &self.gpt_type, "c2i"),
        ];
        for (flag, got, want) in named {
            if let Some(v) = got.as_deref().filter(|v| *v != want) {
                bail!("{flag} {v} is not supported: only {want}");
            }
        }
        if let Some(v) = self.codebook_embed_dim.filter(|&v| v != 8) {
            bail!("--codebook-embed-dim {v} is not supported: give the tokenizer's --vq-config instead");
        }
        if let Some(v) = self.cfg_interval.filter(|&v| v != -1.0) {
            bail!("--cfg-interval {v} is not supported: the reference parses it and never uses it (only -1)");
        }
        Ok(())
    }
}

/// The reference's global batch when it is not given (`--global-batch-size` default).
const REFERENCE_BATCH: usize = 256;
/// The reference's warm-up when it is not given (`--warmup-epochs` default).
const REFERENCE_WARMUP_EPOCHS: usize = 100;

/// `train_c2i.py`'s flags, with its meaning.
#[derive(Debug, Clone, Default)]
pub struct TrainFlags {
    /// The run length in epochs (full batches over the data, the last partial batch dropped
    /// as its DataLoader does).
    pub epochs: Option<usize>,
    pub warmup_epochs: Option<usize>,
    pub global_batch_size: Option<usize>,
    pub token_dropout_p: Option<f64>,
    pub drop_path_rate: Option<f64>,
    pub lr_schedule: Option<String>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub gradient_accumulation_steps: Option<usize>,
    pub dataset: Option<String>,
    pub gpt_type: Option<String>,
    pub cloud_save_path: Option<String>,
    pub no_local_save: bool,
    pub image_size: Option<usize>,
    pub downsample_size: Option<usize>,
    pub num_classes: Option<usize>,
    pub vocab_size: Option<usize>,
    pub cls_token_num: Option<usize>,
}

impl TrainFlags {
    /// Map these flags onto `job` for a data set of `samples`: its batch, its absolute
    /// learning rate, its epochs as steps and warm-up; says what it did.
    pub fn apply(&self, job: &mut TrainJob, samples: usize) -> Result<()> {
        self.check_fixed(job)?;
        if self.epochs.is_none() && self.global_batch_size.is_none() {
            if self.warmup_epochs.is_some() {
                bail!("--warmup-epochs needs --epochs (or give --warmup-steps)");
            }
            return Ok(());
        }
        let r = &mut job.recipe;
        r.batch_size = self.global_batch_size.unwrap_or(REFERENCE_BATCH);
        job.lr_absolute = true;
        if let Some(epochs) = self.epochs {
            let per_epoch = samples / r.batch_size.max(1);
            if per_epoch == 0 {
                bail!(
                    "--epochs {epochs}: --data has {samples} samples, fewer than one batch of {}: \
                     no full batch per epoch (the reference drops the partial one)",
                    r.batch_size
                );
            }
            let warmup = self.warmup_epochs.unwrap_or(REFERENCE_WARMUP_EPOCHS);
            if warmup > epochs {
                bail!("--warmup-epochs {warmup} is longer than --epochs {epochs}");
            }
            r.steps = epochs * per_epoch;
            r.warmup_steps = warmup * per_epoch;
            // Its lr is lr * epoch / warmup_epochs over fractional epochs: 0 at the first step.
            r.warmup = Warmup::Reference;
        }
        eprintln!(
            "reference flags: batch {}, lr {:e} (absolute), {} steps ({} per epoch), warm-up {} steps",
            r.batch_size,
            job.lr,
            r.steps,
            samples / r.batch_size.max(1),
            r.warmup_steps
        );
        Ok(())
    }

    /// Flags that only take one value here: the reference's default, or the model's own shape.
    fn check_fixed(&self, job: &TrainJob) -> Result<()> {
        let same = |flag: &str, got: Option<f64>, want: f64, why: &str| -> Result<()> {
            match got {
                Some(v) if v != want => bail!("{flag} {v} is not supported: only {want} ({why})"),
                _ => Ok(()),
            }
        };
        let r = &job.recipe;
        same(
            "--token-dropout-p",
            self.token_dropout_p,
            r.dropout,
            "one --dropout for tokens, residuals and FFN",
        )?;
        let no_depth = "no stochastic depth";
        same("--drop-path-rate", self.drop_path_rate, 0.0, no_depth)?;
        same("--beta1", self.beta1, 0.9, "the paper's AdamW betas")?;
        same("--beta2", self.beta2, 0.95, "the paper's AdamW betas")?;
        same(
            "--gradient-accumulation-steps",
            self.gradient_accumulation_steps.map(|v| v as f64),
            1.0,
            "the reference parses it and never uses it; see --grad-accum",
        )?;
        for (flag, got, want) in [
            ("--lr-schedule", &self.lr_schedule, "cosine"),
            ("--dataset", &self.dataset, "imagenet_code"),
            ("--gpt-type", &self.gpt_type, "c2i"),
        ] {
            if let Some(v) = got.as_deref().filter(|v| *v != want) {
                bail!("{flag} {v} is not supported: only {want}");
            }
        }
        if self.cloud_save_path.is_some() || self.no_local_save {
            bail!("--cloud-save-path / --no-local-save are not supported: checkpoints go to --out (--results-dir)");
        }
        if self.warmup_epochs.is_some() && r.warmup_steps != 0 {
            bail!("give --warmup-epochs or --warmup-steps, not both");
        }
        // A resumed run's shape comes from its checkpoint.
        let Some(cfg) = given_config(job.source.config.as_deref(), job.source.model.as_deref())?
        else {
            return Ok(());
        };
        let patch = self.downsample_size.unwrap_or(16);
        for (flag, got, want) in [
            ("--downsample-size", self.downsample_size, 16),
            ("--image-size", self.image_size, cfg.grid_size() * patch),
            ("--num-classes", self.num_classes, cfg.num_classes),
            ("--vocab-size", self.vocab_size, cfg.vocab_size),
            ("--cls-token-num", self.cls_token_num, cfg.cls_token_num),
        ] {
            if let Some(v) = got.filter(|&v| v != want) {
                bail!(
                    "{flag} {v} does not match the model: it has {want} (change --config instead)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::run::RunDir;
    use crate::train::setup::ModelSource;

    fn job() -> TrainJob {
        TrainJob {
            data: "d.pack".into(),
            dir: RunDir {
                out: "results".into(),
                log_every: 10,
                ckpt_every: 500,
                fresh_log: false,
            },
            source: ModelSource::default(),
            recipe: Default::default(),
            lr: 1e-4,
            lr_absolute: false,
            min_lr: None,
            until: None,
            reference: TrainFlags::default(),
            placement: crate::zoo::Placement {
                device: "cpu".into(),
                dtype: "f32".into(),
            },
        }
    }

    #[test]
    fn epochs_become_steps_of_full_batches_with_the_references_warmup() {
        let mut j = job();
        let f = TrainFlags {
            epochs: Some(3),
            warmup_epochs: Some(1),
            global_batch_size: Some(4),
            ..Default::default()
        };
        f.apply(&mut j, 10).unwrap();
        // 10 samples in batches of 4: 2 full batches an epoch.
        assert_eq!(
            (j.recipe.batch_size, j.recipe.steps, j.recipe.warmup_steps),
            (4, 6, 2)
        );
        assert!(j.lr_absolute);
        assert_eq!(j.recipe.warmup, Warmup::Reference);
        // No reference flag: nothing changes.
        let mut k = job();
        TrainFlags::default().apply(&mut k, 10).unwrap();
        assert!(!k.lr_absolute && k.recipe.batch_size == job().recipe.batch_size);
    }

    #[test]
    fn reference_flags_that_cannot_mean_the_same_are_refused_by_name() {
        let err = |f: TrainFlags, samples| f.apply(&mut job(), samples).unwrap_err().to_string();
        let e = err(
            TrainFlags {
                epochs: Some(1),
                ..Default::default()
            },
            10,
        );
        assert!(e.contains("fewer than one batch of 256"), "{e}");
        let e = err(
            TrainFlags {
                warmup_epochs: Some(1),
                ..Default::default()
            },
            10,
        );
        assert!(e.contains("--warmup-epochs needs --epochs"), "{e}");
        let e = err(
            TrainFlags {
                beta2: Some(0.99),
                ..Default::default()
            },
            10,
        );
        assert!(e.contains("--beta2 0.99"), "{e}");
        let mut j = job();
        j.source.model = Some("ARPG-L".into());
        let f = TrainFlags {
            image_size: Some(384),
            ..Default::default()
        };
        let e = f.apply(&mut j, 10).unwrap_err().to_string();
        assert!(
            e.contains("--image-size 384 does not match the model: it has 256"),
            "{e}"
        );
    }

    #[test]
    fn sample_flags_accept_only_what_the_model_is() {
        let m = ArpgConfig::preset("ARPG-L").unwrap();
        let ok = SampleFlags {
            image_size: Some(256),
            codebook_size: Some(m.vocab_size),
            cfg_interval: Some(-1.0),
            vq_model: Some("VQ-16".into()),
            ..Default::default()
        };
        ok.check(&m).unwrap();
        let e = SampleFlags {
            image_size: Some(512),
            ..Default::default()
        }
        .check(&m)
        .unwrap_err()
        .to_string();
        assert!(e.contains("--image-size 512 is not supported"), "{e}");
        let e = SampleFlags {
            gpt_type: Some("t2i".into()),
            ..Default::default()
        }
        .check(&m)
        .unwrap_err()
        .to_string();
        assert!(e.contains("--gpt-type t2i"), "{e}");
    }
}
