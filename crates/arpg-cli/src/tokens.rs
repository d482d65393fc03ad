//! `arpg encode` and `arpg decode`: images <-> VQ token grids.

use crate::args::{DeviceArgs, VqArgs};
use anyhow::{bail, ensure, Context, Result};
use arpg::tokenizer::{image as img, tokens_io, ImageTokenizer};
use candle_core::Tensor;
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
    let (tokens, side) = tokens_io::read(&a.tokens)?;
    if let Some(p) = &a.raw_out {
        arpg::util::check_writable(p, "--raw-out")?;
    }
    let (device, dtype) = a.device.resolve()?;
    let tk = a.vq.spec(false, 0)?.load_standalone(dtype, &device)?;
    tk.check_tokens(&tokens)
        .with_context(|| format!("--tokens {}", a.tokens.display()))?;
    let n = tokens.len();
    let pix = match &tk {
        ImageTokenizer::Vq(vq) => {
            let codes = Tensor::from_vec(tokens.concat(), (n, side * side), &device)?;
            Some(
                vq.decode(&codes, (side, side))?
                    .to_dtype(candle_core::DType::F32)?,
            )
        }
        ImageTokenizer::Pixel => {
            ensure!(
                a.raw_out.is_none(),
                "--raw-out is the VQ decoder's output; the pixel tokenizer has none"
            );
            None
        }
    };
    let images = match &pix {
        Some(p) => img::tensor_to_images(p)?,
        None => tk.decode(&tokens, (side, side), &device)?,
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create --out {}", a.out.display()))?;
    for (i, im) in images.iter().enumerate() {
        img::save_png_atomic(im, &a.out.join(format!("{i:06}.png")))?;
    }
    if let (Some(p), Some(pix)) = (&a.raw_out, &pix) {
        let data = pix.flatten_all()?.to_vec1::<f32>()?;
        img::write_npy_f32(p, pix.dims(), &data)?;
    }
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
    arpg::util::check_writable(&a.tokens_out, "--tokens-out")?;
    arpg::tokenizer::check_image_size(a.image_size)?;
    let (device, dtype) = a.device.resolve()?;
    let pixel = a.vq.tokenizer == "pixel";
    let tokens: Vec<Vec<u32>> = match (&a.raw_in, a.image.is_empty()) {
        (Some(p), _) => {
            ensure!(
                !pixel,
                "--raw-in is VQ encoder input; the pixel tokenizer takes --image"
            );
            let x = img::read_raw_images(p, &device)?;
            let vq = a.vq.spec(false, 0)?.vq.load(dtype, &device)?;
            let idx = vq.encode(&x.to_dtype(dtype)?)?;
            idx.to_dtype(candle_core::DType::U32)?.to_vec2()?
        }
        (None, false) => {
            let imgs = a
                .image
                .iter()
                .map(|p| Ok(img::center_crop_resize(&img::load_rgb(p)?, a.image_size)))
                .collect::<Result<Vec<_>>>()?;
            a.vq.spec(false, 0)?
                .load_standalone(dtype, &device)?
                .encode(&imgs, &device)?
        }
        (None, true) => bail!("give --image FILE (one or more) or --raw-in FILE.npy"),
    };
    tokens_io::write(&a.tokens_out, &tokens)?;
    eprintln!(
        "encoded {} images into {}",
        tokens.len(),
        a.tokens_out.display()
    );
    Ok(())
}
