//! The tokenizer's own runs (`arpg decode`, `arpg encode`): token grids in a JSON file to a
//! folder of PNGs (and the VQ decoder's raw output), and image files (or raw encoder input)
//! to token grids.

use super::{image as img, tokens_io, ImageTokenizer};
use crate::zoo::{Placement, TokenizerKind, TokenizerSpec};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use std::path::PathBuf;

/// Token grids (a JSON array of per-image arrays, raster order, square) to PNGs.
#[derive(Debug, Clone)]
pub struct DecodeJob {
    pub tokenizer: TokenizerSpec,
    pub placement: Placement,
    pub tokens: PathBuf,
    /// `NNNNNN.png` per grid.
    pub out: PathBuf,
    /// Also the VQ decoder's float32 output (N x 3 x H x W, before clamping) as `.npy`.
    pub raw_out: Option<PathBuf>,
}

impl DecodeJob {
    /// Decodes every grid; the number of images.
    pub fn run(&self) -> Result<usize> {
        let (tokens, side) = tokens_io::read(&self.tokens)?;
        if let Some(p) = &self.raw_out {
            crate::util::check_writable(p, "--raw-out")?;
        }
        let (device, dtype) = self.placement.resolve()?;
        let tk = self.tokenizer.load_standalone(dtype, &device)?;
        tk.check_tokens(&tokens)
            .with_context(|| format!("--tokens {}", self.tokens.display()))?;
        let n = tokens.len();
        let pix = match &tk {
            ImageTokenizer::Vq(vq) => {
                let codes = Tensor::from_vec(tokens.concat(), (n, side * side), &device)?;
                Some(vq.decode(&codes, (side, side))?.to_dtype(DType::F32)?)
            }
            ImageTokenizer::Pixel => {
                ensure!(
                    self.raw_out.is_none(),
                    "--raw-out is the VQ decoder's output; the pixel tokenizer has none"
                );
                None
            }
        };
        let images = match &pix {
            Some(p) => img::tensor_to_images(p)?,
            None => tk.decode(&tokens, (side, side), &device)?,
        };
        crate::util::create_out(&self.out)?;
        for (i, im) in images.iter().enumerate() {
            img::save_png_atomic(im, &self.out.join(format!("{i:06}.png")))?;
        }
        if let (Some(p), Some(pix)) = (&self.raw_out, &pix) {
            let data = pix.flatten_all()?.to_vec1::<f32>()?;
            img::write_npy_f32(p, pix.dims(), &data)?;
        }
        Ok(n)
    }
}

/// Images (centre-cropped and resized as ADM does), or raw encoder input, to token grids.
#[derive(Debug, Clone)]
pub struct EncodeJob {
    pub tokenizer: TokenizerSpec,
    pub placement: Placement,
    pub images: Vec<PathBuf>,
    /// Raw float32 input instead: `.npy` of N x 3 x H x W in [-1, 1] (VQ only).
    pub raw_in: Option<PathBuf>,
    /// Side of the square images the tokenizer sees.
    pub image_size: usize,
    pub tokens_out: PathBuf,
}

impl EncodeJob {
    /// Encodes every image and writes the grids; the number of grids.
    pub fn run(&self) -> Result<usize> {
        crate::util::check_writable(&self.tokens_out, "--tokens-out")?;
        super::check_image_size(self.image_size)?;
        let (device, dtype) = self.placement.resolve()?;
        let pixel = self.tokenizer.kind == TokenizerKind::Pixel;
        let tokens: Vec<Vec<u32>> = match (&self.raw_in, self.images.is_empty()) {
            (Some(p), _) => {
                ensure!(
                    !pixel,
                    "--raw-in is VQ encoder input; the pixel tokenizer takes --image"
                );
                let x = img::read_raw_images(p, &device)?;
                let vq = self.tokenizer.vq.load(dtype, &device)?;
                let idx = vq.encode(&x.to_dtype(dtype)?)?;
                idx.to_dtype(DType::U32)?.to_vec2()?
            }
            (None, false) => {
                let imgs = self
                    .images
                    .iter()
                    .map(|p| Ok(img::center_crop_resize(&img::load_rgb(p)?, self.image_size)))
                    .collect::<Result<Vec<_>>>()?;
                let tk = self.tokenizer.load_standalone(dtype, &device)?;
                tk.encode(&imgs, &device)?
            }
            (None, true) => bail!("give --image FILE (one or more) or --raw-in FILE.npy"),
        };
        tokens_io::write(&self.tokens_out, &tokens)?;
        Ok(tokens.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::VqSpec;

    #[test]
    fn pixel_tokens_go_to_json_and_back_to_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        img::RgbImage::from_pixel(8, 8, ::image::Rgb([255; 3]))
            .save(d.join("a.png"))
            .unwrap();
        let tokenizer = TokenizerSpec {
            kind: TokenizerKind::Pixel,
            vq: VqSpec::default(),
            vq_dtype: "auto".into(),
        };
        let placement = Placement {
            device: "cpu".into(),
            dtype: "f32".into(),
        };
        let enc = EncodeJob {
            tokenizer: tokenizer.clone(),
            placement: placement.clone(),
            images: vec![d.join("a.png")],
            raw_in: None,
            image_size: 8,
            tokens_out: d.join("t.json"),
        };
        assert_eq!(enc.run().unwrap(), 1);
        let e = EncodeJob {
            raw_in: Some(d.join("x.npy")),
            ..enc.clone()
        };
        assert!(e.run().unwrap_err().to_string().contains("--raw-in"));
        let dec = DecodeJob {
            tokenizer,
            placement,
            tokens: d.join("t.json"),
            out: d.join("out"),
            raw_out: None,
        };
        assert_eq!(dec.run().unwrap(), 1);
        let back = img::load_rgb(&d.join("out/000000.png")).unwrap();
        assert_eq!(back.get_pixel(3, 3).0, [255; 3]);
    }
}
