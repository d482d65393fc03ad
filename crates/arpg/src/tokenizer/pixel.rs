//! The pixel tokenizer of the shipped digits model: one token per grayscale pixel,
//! 17 intensity levels (pixel v -> round(v / 255 * 16), token t -> round(t * 255 / 16)).

use anyhow::{bail, Result};
use image::GrayImage;

pub const LEVELS: u32 = 17;

pub fn token_of(v: u8) -> u32 {
    (v as f32 / 255.0 * 16.0).round() as u32
}

pub fn pixel_of(t: u32) -> u8 {
    (t.min(16) as f32 * 255.0 / 16.0).round() as u8
}

/// Raster-order tokens of a grayscale image.
pub fn encode(img: &GrayImage) -> Vec<u32> {
    img.pixels().map(|p| token_of(p.0[0])).collect()
}

/// A `w x h` grayscale image from raster-order tokens.
pub fn decode(tokens: &[u32], w: usize, h: usize) -> Result<GrayImage> {
    if tokens.len() != w * h {
        bail!("{} tokens cannot fill a {w}x{h} image", tokens.len());
    }
    if let Some(&t) = tokens.iter().find(|&&t| t >= LEVELS) {
        bail!("token {t} is not a pixel level (0..{LEVELS})");
    }
    Ok(GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([pixel_of(tokens[y as usize * w + x as usize])])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip() {
        for t in 0..LEVELS {
            assert_eq!(token_of(pixel_of(t)), t);
        }
        assert_eq!(pixel_of(16), 255);
        assert_eq!(token_of(128), 8);
        let img = decode(&[0, 8, 16, 4], 2, 2).unwrap();
        assert_eq!(encode(&img), vec![0, 8, 16, 4]);
        assert!(decode(&[17], 1, 1).is_err());
    }
}
