//! `arpg inpaint` and `arpg outpaint`: zero-shot editing.

use crate::args::{ControlArgs, DeviceArgs, ModelArgs, SamplingArgs, VqArgs};
use anyhow::Result;
use arpg::editor::run::{EditJob, Inpaint, Outpaint};
use clap::Args;
use indicatif::ProgressBar;
use std::path::PathBuf;

/// The editing commands' flags: the class, the decoding flags, and how many versions.
#[derive(Args, Debug, Clone)]
pub struct EditSampling {
    /// Class to condition on (another class than the image's = class-conditional editing).
    #[arg(long)]
    pub class: usize,
    #[command(flatten)]
    pub decoding: SamplingArgs,
    /// How many edited versions to make.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
}

/// The job of the shared flags (a default model filled in), without its files.
fn job(model: &ModelArgs, vq: &VqArgs, device: &DeviceArgs, s: &EditSampling) -> Result<EditJob> {
    let seed = s.decoding.seed;
    let mut spec = model.spec(seed);
    spec.or_default();
    Ok(EditJob {
        sampling: s.decoding.config(&spec)?,
        tokenizer: vq.spec(spec.random, seed)?,
        model: spec,
        placement: device.placement(),
        seed,
        class: s.class,
        samples: s.samples,
        image: PathBuf::new(),
        out: PathBuf::new(),
        tokens_out: None,
    })
}

#[derive(Args, Debug)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: EditSampling,
    #[command(flatten)]
    pub control: ControlArgs,
    /// The image to edit. It is center-cropped and resized to the model's size as ADM does.
    #[arg(long)]
    pub image: PathBuf,
    /// A mask image of the same size: white (>= 128) marks what to regenerate. A token is
    /// regenerated if ANY pixel of its patch (16x16 for VQ-16, 1x1 for digits) is masked.
    #[arg(long)]
    pub mask: PathBuf,
    /// Paste the original pixels back outside the mask.
    #[arg(long)]
    pub keep_pixels: bool,
    /// Output folder: inpaint_N.png and grid.png (input first).
    #[arg(long, default_value = "inpainted")]
    pub out: PathBuf,
    /// Also write the edited token grids (JSON).
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
}

pub fn run_inpaint(a: InpaintArgs) -> Result<()> {
    let job = EditJob {
        image: a.image,
        out: a.out.clone(),
        tokens_out: a.tokens_out,
        ..job(&a.model, &a.vq, &a.device, &a.sampling)?
    };
    let done = job.inpaint(&Inpaint {
        mask: a.mask,
        keep_pixels: a.keep_pixels,
        condition: a.control.file(),
    })?;
    eprintln!("{} inpainted images in {}", done.images, a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct OutpaintArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: EditSampling,
    /// The image to extend; center-cropped and resized to the model's size first.
    #[arg(long)]
    pub image: PathBuf,
    /// Pixels to add on each side (multiples of the patch size: 16 for VQ-16, 1 for digits).
    /// 768 on the right turns a 256x256 image into 1024x256, as in the paper.
    #[arg(long, default_value_t = 0)]
    pub left: usize,
    #[arg(long, default_value_t = 0)]
    pub right: usize,
    #[arg(long, default_value_t = 0)]
    pub top: usize,
    #[arg(long, default_value_t = 0)]
    pub bottom: usize,
    #[arg(long, default_value = "outpainted")]
    pub out: PathBuf,
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
}

pub fn run_outpaint(a: OutpaintArgs) -> Result<()> {
    let job = EditJob {
        image: a.image,
        out: a.out.clone(),
        tokens_out: a.tokens_out,
        ..job(&a.model, &a.vq, &a.device, &a.sampling)?
    };
    let n = a.sampling.samples;
    // A long strip takes minutes a sample: progress per window.
    let pb = ProgressBar::new(n as u64).with_style(crate::style("{spinner}", "windows", " {msg}"));
    pb.enable_steady_tick(std::time::Duration::from_millis(250));
    let margins = [a.left, a.right, a.top, a.bottom];
    let done = job.outpaint(Outpaint { margins }, &mut |i, done, total| {
        pb.set_length((n * total) as u64);
        pb.set_position((i * total + done) as u64);
        pb.set_message(format!("image {}/{n}", i + 1));
    })?;
    pb.finish_and_clear();
    eprintln!(
        "{} outpainted images of {}x{} pixels in {}",
        done.images,
        done.width,
        done.height,
        a.out.display()
    );
    Ok(())
}
