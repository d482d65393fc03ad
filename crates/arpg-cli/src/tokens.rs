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

/// Largest side accepted for --image-size (the VQ encoder's activations grow with its square).
const MAX_IMAGE_SIZE: usize = 8192;

pub fn check_image_size(size: usize) -> Result<()> {
    if size == 0 || size > MAX_IMAGE_SIZE {
        bail!("--image-size {size} must be in 1..={MAX_IMAGE_SIZE}");
    }
    Ok(())
}

/// The tokenizer of a command without a model: `--tokenizer pixel`, else the VQ tokenizer.
pub fn standalone_tokenizer(
    vq: &VqArgs,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<ImageTokenizer> {
    Ok(match vq.tokenizer.as_str() {
        "pixel" => ImageTokenizer::Pixel,
        _ => ImageTokenizer::Vq(Box::new(vq.spec(false, 0).load(dtype, device)?)),
    })
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    let (tokens, side) = tokens_io::read(&a.tokens)?;
    if let Some(p) = &a.raw_out {
        arpg::util::check_writable(p, "--raw-out")?;
    }
    let (device, dtype) = a.device.resolve()?;
    let tk = standalone_tokenizer(&a.vq, dtype, &device)?;
    let k = match &tk {
        ImageTokenizer::Vq(vq) => vq.config().codebook_size,
        ImageTokenizer::Pixel => arpg::tokenizer::pixel::LEVELS as usize,
    };
    for (i, t) in tokens.iter().enumerate() {
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= k) {
            bail!(
                "--tokens {}: grid {i} has token {bad}, but the {} has {k} entries",
                a.tokens.display(),
                match &tk {
                    ImageTokenizer::Vq(_) => "codebook",
                    ImageTokenizer::Pixel => "pixel tokenizer",
                }
            );
        }
    }
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
    check_image_size(a.image_size)?;
    let (device, dtype) = a.device.resolve()?;
    let pixel = a.vq.tokenizer == "pixel";
    let tokens: Vec<Vec<u32>> = match (&a.raw_in, a.image.is_empty()) {
        (Some(p), _) => {
            ensure!(
                !pixel,
                "--raw-in is VQ encoder input; the pixel tokenizer takes --image"
            );
            let (shape, data) = img::read_npy_f32(p)?;
            if shape.len() != 4 || shape[1] != 3 || shape[0] == 0 {
                bail!(
                    "--raw-in {}: shape {shape:?}, expected N x 3 x H x W",
                    p.display()
                );
            }
            // `decode` reads square grids only: refuse what it could not read back.
            if shape[2] != shape[3] {
                bail!(
                    "--raw-in {}: images of {}x{} pixels; only square images are supported \
                     (token grids are square)",
                    p.display(),
                    shape[3],
                    shape[2]
                );
            }
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                bail!("--raw-in {}: value {i} is {}", p.display(), data[i]);
            }
            let x = Tensor::from_vec(data, shape, &device)?;
            let vq = a.vq.spec(false, 0).load(dtype, &device)?;
            let idx = vq.encode(&x.to_dtype(dtype)?)?;
            idx.to_dtype(candle_core::DType::U32)?.to_vec2()?
        }
        (None, false) => {
            let imgs = a
                .image
                .iter()
                .map(|p| Ok(img::center_crop_resize(&img::load_rgb(p)?, a.image_size)))
                .collect::<Result<Vec<_>>>()?;
            standalone_tokenizer(&a.vq, dtype, &device)?.encode(&imgs, &device)?
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
