//! The UCI handwritten digits (8x8, pixel values 0..16, 10 classes) from a `.csv.gz` of
//! 65 columns: 64 pixels in raster order, then the label.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Digit {
    pub label: u32,
    /// Raster-order intensities, 0..=16.
    pub pixels: [u8; 64],
}

pub fn load_csv_gz(path: &Path) -> Result<Vec<Digit>> {
    let f = crate::util::open_regular(path, "digits CSV")?;
    let mut text = String::new();
    // Bounded: the real file inflates to about 0.5 MB; a gzip bomb must not fill memory.
    flate2::read::GzDecoder::new(f)
        .take(1 << 28)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: not a gzip-compressed CSV", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("{}: line {} is not integers", path.display(), n + 1))?;
        if vals.len() != 65 || vals[..64].iter().any(|&v| v > 16) || vals[64] > 9 {
            bail!(
                "{}: line {}: expected 64 pixels in 0..=16 and a label in 0..=9",
                path.display(),
                n + 1
            );
        }
        let mut pixels = [0u8; 64];
        for (p, v) in pixels.iter_mut().zip(&vals) {
            *p = *v as u8;
        }
        out.push(Digit {
            label: vals[64],
            pixels,
        });
    }
    if out.is_empty() {
        bail!("{}: no digits (the CSV is empty)", path.display());
    }
    Ok(out)
}

/// The held-out test split: every fifth digit (index % 5 == 0); the rest is for training.
pub fn split(all: &[Digit]) -> (Vec<Digit>, Vec<Digit>) {
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, d) in all.iter().enumerate() {
        if i % 5 == 0 {
            test.push(d.clone())
        } else {
            train.push(d.clone())
        }
    }
    (train, test)
}
