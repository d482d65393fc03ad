//! The reference's `train_c2i.py` flags that are not plain aliases of ours (their rules:
//! [`arpg::reference`]). Accepted so that GETTING_STARTED.md's command runs as typed.

use arpg::reference::TrainFlags;
use clap::Args;

#[derive(Args, Debug, Clone, Default)]
pub struct ReferenceTrainFlags {
    /// The reference's run length in epochs (full batches over --data, the last partial batch
    /// dropped as its DataLoader does): sets --steps and, unless --warmup-epochs is given, a
    /// 100-epoch warm-up, and takes --lr as absolute (the reference's convention).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Warm-up in epochs (the reference's default is 100); needs --epochs.
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// The reference's batch over all processes: sets --batch-size and takes --lr as the
    /// absolute learning rate (the reference does not scale it; 1e-4 per 256 is left to you).
    #[arg(long)]
    pub global_batch_size: Option<usize>,
    #[arg(long, hide = true)]
    pub token_dropout_p: Option<f64>,
    #[arg(long, hide = true)]
    pub drop_path_rate: Option<f64>,
    #[arg(long, hide = true)]
    pub lr_schedule: Option<String>,
    #[arg(long, hide = true)]
    pub beta1: Option<f64>,
    #[arg(long, hide = true)]
    pub beta2: Option<f64>,
    #[arg(long, hide = true)]
    pub gradient_accumulation_steps: Option<usize>,
    #[arg(long, hide = true)]
    pub dataset: Option<String>,
    #[arg(long, hide = true)]
    pub gpt_type: Option<String>,
    #[arg(long, hide = true)]
    pub cloud_save_path: Option<String>,
    #[arg(long, hide = true)]
    pub no_local_save: bool,
    #[arg(long, hide = true)]
    pub image_size: Option<usize>,
    #[arg(long, hide = true)]
    pub downsample_size: Option<usize>,
    #[arg(long, hide = true)]
    pub num_classes: Option<usize>,
    #[arg(long, hide = true)]
    pub vocab_size: Option<usize>,
    #[arg(long, hide = true)]
    pub cls_token_num: Option<usize>,
    /// Data loader workers: packed data is memory-mapped, so no effect.
    #[arg(long, hide = true)]
    pub num_workers: Option<usize>,
    /// The reference compiles unless told not to; nothing to turn off here.
    #[arg(long, hide = true)]
    pub no_compile: bool,
}

impl ReferenceTrainFlags {
    /// The library's view: the rules are [`arpg::reference::TrainFlags::apply`]'s.
    pub fn flags(&self) -> TrainFlags {
        TrainFlags {
            epochs: self.epochs,
            warmup_epochs: self.warmup_epochs,
            global_batch_size: self.global_batch_size,
            token_dropout_p: self.token_dropout_p,
            drop_path_rate: self.drop_path_rate,
            lr_schedule: self.lr_schedule.clone(),
            beta1: self.beta1,
            beta2: self.beta2,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            dataset: self.dataset.clone(),
            gpt_type: self.gpt_type.clone(),
            cloud_save_path: self.cloud_save_path.clone(),
            no_local_save: self.no_local_save,
            image_size: self.image_size,
            downsample_size: self.downsample_size,
            num_classes: self.num_classes,
            vocab_size: self.vocab_size,
            cls_token_num: self.cls_token_num,
        }
    }
}
