//! Image <-> token conversion: the LlamaGen VQ-16 tokenizer and image helpers.

pub mod image;
pub mod jpeg_check;
pub mod pixel;
pub mod run;
pub mod tokens_io;
pub mod vq;

use ::image::RgbImage;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// The tokenizer paired with a model: the VQ-16 family for ImageNet models, or one token per
/// grayscale pixel for the shipped digits model.
pub enum ImageTokenizer {
    Vq(Box<vq::VqModel>),
    Pixel,
}

/// Largest image side the encoder takes (its activations grow with the square).
pub const MAX_IMAGE_SIZE: usize = 8192;

/// `--image-size`: in 1..=[`MAX_IMAGE_SIZE`].
pub fn check_image_size(size: usize) -> Result<()> {
    if size == 0 || size > MAX_IMAGE_SIZE {
        bail!("--image-size {size} must be in 1..={MAX_IMAGE_SIZE}");
    }
    Ok(())
}

impl ImageTokenizer {
    /// Token ids it decodes: the codebook's size, or the pixel levels.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Vq(vq) => vq.config().codebook_size,
            Self::Pixel => pixel::LEVELS as usize,
        }
    }

    /// Every token of every grid in range of the tokenizer; the error names the first that
    /// is not.
    pub fn check_tokens(&self, grids: &[Vec<u32>]) -> Result<()> {
        let k = self.vocab_size();
        for (i, t) in grids.iter().enumerate() {
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= k) {
                let table = match self {
                    Self::Vq(_) => "codebook",
                    Self::Pixel => "pixel tokenizer",
                };
                bail!("grid {i} has token {bad}, but the {table} has {k} entries");
            }
        }
        Ok(())
    }

    /// Pixels per token side.
    pub fn patch_size(&self) -> usize {
        match self {
            Self::Vq(v) => v.config().patch_size(),
            Self::Pixel => 1,
        }
    }

    /// Images from raster-order token grids of `grid = (rows, cols)` tokens.
    pub fn decode(
        &self,
        tokens: &[Vec<u32>],
        grid: (usize, usize),
        device: &Device,
    ) -> Result<Vec<RgbImage>> {
        match self {
            Self::Vq(_) => {
                let codes =
                    Tensor::from_vec(tokens.concat(), (tokens.len(), grid.0 * grid.1), device)?;
                self.decode_tensor(&codes, grid)
            }
            Self::Pixel => tokens
                .iter()
                .map(|t| Ok(image_gray_to_rgb(&pixel::decode(t, grid.1, grid.0)?)))
                .collect(),
        }
    }

    /// [`ImageTokenizer::decode`] from tokens `[N, rows * cols]` (u32) already on the device,
    /// as the sampler returns them: the VQ decoder takes them where they are.
    pub fn decode_tensor(&self, tokens: &Tensor, grid: (usize, usize)) -> Result<Vec<RgbImage>> {
        match self {
            Self::Vq(vq) => image::nhwc_to_images(&vq.decode_nhwc(tokens, grid)?),
            Self::Pixel => self.decode(&tokens.to_vec2::<u32>()?, grid, tokens.device()),
        }
    }

    /// Like [`Self::decode_tensor`], but the batch as one uint8 NHWC buffer: on a GPU the
    /// tokens stay on the device (a device-to-device copy if the decoder has a stream of its
    /// own) and only the pixels cross to the host (what `sample-fid` stores).
    pub fn decode_u8(&self, tokens: &Tensor, grid: (usize, usize)) -> Result<image::Pixels> {
        match self {
            Self::Vq(vq) => {
                let codes = tokens.to_device(vq.device())?;
                if !tokens.device().same_device(vq.device()) {
                    // The copy must be done before `tokens` is freed from this thread.
                    vq.device().synchronize()?;
                }
                let u8s = image::nhwc_to_u8(&vq.decode_nhwc(&codes, grid)?)?;
                let (n, h, w, _) = u8s.dims4()?;
                let data = u8s.flatten_all()?.to_vec1::<u8>()?;
                Ok(image::Pixels { data, n, h, w })
            }
            Self::Pixel => image::Pixels::from_images(&self.decode_tensor(tokens, grid)?),
        }
    }

    /// Raster-order tokens of images whose sides are multiples of the patch size.
    pub fn encode(&self, imgs: &[RgbImage], device: &Device) -> Result<Vec<Vec<u32>>> {
        let p = self.patch_size() as u32;
        for im in imgs {
            if im.width() % p != 0 || im.height() % p != 0 {
                bail!(
                    "image of {}x{} pixels is not a multiple of the {p}-pixel patch",
                    im.width(),
                    im.height()
                );
            }
        }
        match self {
            Self::Vq(vq) => {
                let x = image::images_to_tensor(imgs, device)?.to_dtype(vq_dtype(vq))?;
                Ok(vq
                    .encode(&x)?
                    .to_dtype(candle_core::DType::U32)?
                    .to_vec2()?)
            }
            Self::Pixel => Ok(imgs
                .iter()
                .map(|im| pixel::encode(&::image::DynamicImage::ImageRgb8(im.clone()).to_luma8()))
                .collect()),
        }
    }
}

fn vq_dtype(vq: &vq::VqModel) -> candle_core::DType {
    vq.dtype()
}

fn image_gray_to_rgb(g: &::image::GrayImage) -> RgbImage {
    ::image::DynamicImage::ImageLuma8(g.clone()).to_rgb8()
}
