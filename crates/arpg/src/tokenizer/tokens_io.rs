//! Token grids as JSON: an array of per-image arrays of token ids in raster order.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// A generation order file (`--order`): a JSON array of raster positions; the sampler checks
/// that they are a permutation of the grid.
pub fn read_order(path: &Path) -> Result<Vec<usize>> {
    let text = crate::util::read_small(path, 64 << 20, "--order")?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--order {}: expected a JSON array of raster positions",
            path.display()
        )
    })
}

pub fn write(path: &Path, tokens: &[Vec<u32>]) -> Result<()> {
    let text = serde_json::to_string(tokens)?;
    crate::util::write_atomic(path, text.as_bytes())
}

/// Read token grids; every grid must have the same, square length.
/// Largest token file read (a 1024 x 1024 grid of 5-digit ids is about 6 MB).
pub const MAX_TOKENS_BYTES: u64 = 256 << 20;

pub fn read(path: &Path) -> Result<(Vec<Vec<u32>>, usize)> {
    let text = crate::util::read_small(path, MAX_TOKENS_BYTES, "tokens")?;
    let tokens: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of arrays of token ids",
            path.display()
        )
    })?;
    if tokens.is_empty() {
        bail!("{}: no token grids", path.display());
    }
    let n = tokens[0].len();
    let side = (n as f64).sqrt().round() as usize;
    if n == 0 || side * side != n {
        bail!(
            "{}: a grid has {n} tokens, not a square number",
            path.display()
        );
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| t.len() != n) {
        bail!(
            "{}: grid {i} has {} tokens, grid 0 has {n}",
            path.display(),
            t.len()
        );
    }
    Ok((tokens, side))
}
