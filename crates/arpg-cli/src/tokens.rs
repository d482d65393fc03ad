//! `arpg encode` and `arpg decode`: images <-> VQ token grids.

use crate::args::{DeviceArgs, VqArgs};
use anyhow::Result;
use arpg::tokenizer::run::{DecodeJob, EncodeJob};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// JSON array of per-image arrays of token ids (raster order, square grids).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output folder for the PNGs.
    #[arg(long, default_value = "decoded")]
    pub out: PathBuf,
    /// Also write the decoder's raw float32 output (N x 3 x H x W, before clamping) as .npy.
    #[arg(long)]
    pub raw_out: Option<PathBuf>,
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    let n = DecodeJob {
        tokenizer: a.vq.spec(false, 0)?,
        placement: a.device.placement(),
        tokens: a.tokens,
        out: a.out.clone(),
        raw_out: a.raw_out,
    }
    .run()?;
    eprintln!("decoded {n} images into {}", a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub vq: VqArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Image files (PNG/JPEG); repeat for several. Images are center-cropped and resized to
    /// --image-size as ADM does.
    #[arg(long, num_args = 1..)]
    pub image: Vec<PathBuf>,
    /// Raw float32 input instead of images: .npy of shape N x 3 x H x W with values in [-1, 1].
    #[arg(long, conflicts_with = "image")]
    pub raw_in: Option<PathBuf>,
    /// Side of the square images the tokenizer sees.
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// Where to write the token grids (JSON).
    #[arg(long)]
    pub tokens_out: PathBuf,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    let n = EncodeJob {
        tokenizer: a.vq.spec(false, 0)?,
        placement: a.device.placement(),
        images: a.image,
        raw_in: a.raw_in,
        image_size: a.image_size,
        tokens_out: a.tokens_out.clone(),
    }
    .run()?;
    eprintln!("encoded {n} images into {}", a.tokens_out.display());
    Ok(())
}
