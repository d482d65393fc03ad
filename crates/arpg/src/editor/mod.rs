//! Zero-shot editing: decoding with known tokens.
//!
//! ARPG predicts any token from any set of known tokens, so editing needs no training: the
//! known tokens are prefilled into the pass-1 KV cache in one forward, then only the unknown
//! positions are decoded, in a random order, with the usual schedule over the unknown count.
//! Canvases larger than the model's grid (outpainting, resolution expansion) are filled by
//! sliding a model-sized window over them, each window conditioned on the tokens it overlaps.

pub mod run;

use crate::model::Arpg;
use crate::sampler::{generate, random_order, Condition, DecodeShape, Request, SampleConfig};
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use image::RgbImage;
use rand::Rng;

/// A token canvas of `rows x cols`, each cell known (`Some`) or to be generated (`None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Canvas {
    pub rows: usize,
    pub cols: usize,
    pub cells: Vec<Option<u32>>,
}

impl Canvas {
    pub fn unknown(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            cells: vec![None; rows * cols],
        }
    }

    /// A canvas from raster-order tokens with `regenerate[i]` marking the cells to decode.
    pub fn from_tokens(
        rows: usize,
        cols: usize,
        tokens: &[u32],
        regenerate: &[bool],
    ) -> Result<Self> {
        ensure!(
            tokens.len() == rows * cols && regenerate.len() == rows * cols,
            "canvas size mismatch"
        );
        let cells = tokens
            .iter()
            .zip(regenerate)
            .map(|(&t, &r)| if r { None } else { Some(t) })
            .collect();
        Ok(Self { rows, cols, cells })
    }

    /// This canvas placed at (`top`, `left`) inside a larger, otherwise unknown one.
    pub fn pad(&self, top: usize, bottom: usize, left: usize, right: usize) -> Self {
        let mut c = Self::unknown(self.rows + top + bottom, self.cols + left + right);
        for r in 0..self.rows {
            for k in 0..self.cols {
                c.cells[(r + top) * c.cols + k + left] = self.cells[r * self.cols + k];
            }
        }
        c
    }

    pub fn n_unknown(&self) -> usize {
        self.cells.iter().filter(|c| c.is_none()).count()
    }

    pub fn tokens(&self) -> Option<Vec<u32>> {
        self.cells.iter().copied().collect()
    }
}

/// Decode every unknown cell of a canvas exactly the model's size, `samples` times; a control
/// model's `condition` steers the regenerated cells.
pub fn inpaint<R: Rng>(
    model: &Arpg,
    canvas: &Canvas,
    class: usize,
    samples: usize,
    cfg: &SampleConfig,
    condition: Option<Condition>,
    rng: &mut R,
) -> Result<Vec<Vec<u32>>> {
    let g = model.config().grid_size();
    ensure!(
        canvas.rows == g && canvas.cols == g,
        "inpainting needs a {g}x{g} token canvas, got {}x{}",
        canvas.rows,
        canvas.cols
    );
    let known: Vec<(usize, u32)> = canvas
        .cells
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|t| (i, t)))
        .collect();
    let unknown: Vec<usize> = (0..canvas.cells.len())
        .filter(|&i| canvas.cells[i].is_none())
        .collect();
    if unknown.is_empty() {
        bail!("nothing to regenerate: every token is known");
    }
    let steps = cfg.steps.min(unknown.len());
    let cfg = SampleConfig {
        steps,
        ..cfg.clone()
    };
    let classes = vec![class; samples];
    let knowns = vec![known; samples];
    let orders: Vec<Vec<usize>> = (0..samples).map(|_| random_order(&unknown, rng)).collect();
    let req = Request {
        classes: &classes,
        known: &knowns,
        orders: &orders,
        condition,
    }
    .validate(DecodeShape::of(model), &cfg)?;
    // The canvas bookkeeping (and fill_canvas's windows) work on host tokens.
    Ok(generate(model, &req, rng, None)?.to_vec2()?)
}

/// Top-left corners of the model-sized windows that cover a canvas, stride half a window,
/// the last window flush with the far edge.
fn window_starts(len: usize, g: usize) -> Vec<usize> {
    if len <= g {
        return vec![0];
    }
    let stride = (g / 2).max(1);
    let mut v: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s + g < len)
        .collect();
    v.push(len - g);
    v
}

/// Fill every unknown cell of a canvas of any size by sliding a model-sized window: windows
/// run nearest-first from the known region (or from the centre when nothing is known), and
/// each decodes its unknown cells given every known cell inside it.
pub fn fill_canvas<R: Rng>(
    model: &Arpg,
    canvas: &Canvas,
    class: usize,
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Canvas> {
    fill_canvas_progress(model, canvas, class, cfg, rng, &mut |_, _| {})
}

/// Resolution expansion: a canvas of `rows x cols` tokens filled from nothing for each class;
/// tokens `[classes, rows * cols]` on the model's device.
pub fn sample_canvases<R: Rng>(
    model: &Arpg,
    (rows, cols): (usize, usize),
    classes: &[usize],
    cfg: &SampleConfig,
    rng: &mut R,
) -> Result<Tensor> {
    let empty = Canvas::unknown(rows, cols);
    let mut tokens = Vec::with_capacity(classes.len() * rows * cols);
    for &c in classes {
        let filled = fill_canvas(model, &empty, c, cfg, rng)?;
        tokens.extend(filled.tokens().context("unfilled cell")?);
    }
    Ok(Tensor::from_vec(
        tokens,
        (classes.len(), rows * cols),
        model.device(),
    )?)
}

/// [`fill_canvas`], calling `on_window(done, total)` before each window it decodes (a long
/// strip takes many).
pub fn fill_canvas_progress<R: Rng>(
    model: &Arpg,
    canvas: &Canvas,
    class: usize,
    cfg: &SampleConfig,
    rng: &mut R,
    on_window: &mut dyn FnMut(usize, usize),
) -> Result<Canvas> {
    let g = model.config().grid_size();
    ensure!(
        canvas.rows >= g && canvas.cols >= g,
        "the canvas ({}x{}) is smaller than the model's {g}x{g} grid",
        canvas.rows,
        canvas.cols
    );
    let mut c = canvas.clone();
    let known: Vec<(f64, f64)> = (0..c.cells.len())
        .filter(|&i| c.cells[i].is_some())
        .map(|i| ((i / c.cols) as f64, (i % c.cols) as f64))
        .collect();
    let centre = if known.is_empty() {
        ((c.rows as f64 - 1.0) / 2.0, (c.cols as f64 - 1.0) / 2.0)
    } else {
        let n = known.len() as f64;
        (
            known.iter().map(|k| k.0).sum::<f64>() / n,
            known.iter().map(|k| k.1).sum::<f64>() / n,
        )
    };
    let mut windows: Vec<(usize, usize)> = window_starts(c.rows, g)
        .into_iter()
        .flat_map(|r| window_starts(c.cols, g).into_iter().map(move |k| (r, k)))
        .collect();
    let dist = |w: &(usize, usize)| {
        let (cy, cx) = (
            w.0 as f64 + (g as f64 - 1.0) / 2.0,
            w.1 as f64 + (g as f64 - 1.0) / 2.0,
        );
        (cy - centre.0).powi(2) + (cx - centre.1).powi(2)
    };
    windows.sort_by(|a, b| dist(a).total_cmp(&dist(b)));
    let total = windows.len();
    for (done, (r0, c0)) in windows.into_iter().enumerate() {
        on_window(done, total);
        let idx = |r: usize, k: usize| (r0 + r) * c.cols + c0 + k;
        let mut win = Canvas::unknown(g, g);
        for r in 0..g {
            for k in 0..g {
                win.cells[r * g + k] = c.cells[idx(r, k)];
            }
        }
        if win.n_unknown() == 0 {
            continue;
        }
        let out = inpaint(model, &win, class, 1, cfg, None, rng)?.remove(0);
        for r in 0..g {
            for k in 0..g {
                c.cells[idx(r, k)] = Some(out[r * g + k]);
            }
        }
    }
    Ok(c)
}

/// Which tokens to regenerate: a token is regenerated if any pixel of its `patch x patch`
/// cell is masked (`masked(x, y)`).
pub fn token_mask(
    width: usize,
    height: usize,
    patch: usize,
    masked: impl Fn(usize, usize) -> bool,
) -> Vec<bool> {
    let (gw, gh) = (width / patch, height / patch);
    (0..gh)
        .flat_map(|ty| (0..gw).map(move |tx| (tx, ty)))
        .map(|(tx, ty)| {
            (0..patch).any(|dy| (0..patch).any(|dx| masked(tx * patch + dx, ty * patch + dy)))
        })
        .collect()
}

/// A mask image's verdict at `(x, y)`: white (channel sum >= 3 x 128) = regenerate.
pub fn is_masked(mask: &RgbImage, x: usize, y: usize) -> bool {
    let p = mask.get_pixel(x as u32, y as u32).0;
    (p[0] as u32 + p[1] as u32 + p[2] as u32) >= 3 * 128
}

/// `--keep-pixels`: the pixels of `src` pasted back into each image outside `mask`.
pub fn keep_unmasked(images: &mut [RgbImage], src: &RgbImage, mask: &RgbImage) {
    for im in images.iter_mut() {
        for (x, y, p) in im.enumerate_pixels_mut() {
            if !is_masked(mask, x as usize, y as usize) {
                *p = *src.get_pixel(x, y);
            }
        }
    }
}

/// Outpainting's margins `[left, right, top, bottom]` in pixels as tokens of `patch`
/// pixels: each a multiple of the patch, one at least not 0 (errors name the flags).
pub fn margins_in_tokens(pixels: [usize; 4], patch: usize) -> Result<[usize; 4]> {
    for (flag, v) in ["--left", "--right", "--top", "--bottom"]
        .iter()
        .zip(pixels)
    {
        ensure!(
            v % patch == 0,
            "{flag} {v} is not a multiple of the {patch}-pixel patch"
        );
    }
    ensure!(
        pixels.iter().any(|&v| v > 0),
        "give at least one of --left, --right, --top, --bottom (pixels to add)"
    );
    Ok(pixels.map(|v| v / patch))
}

/// `n` independent fills of `canvas`; `on_window(image, done, total)` before each window.
pub fn fill_canvases<R: Rng>(
    model: &Arpg,
    canvas: &Canvas,
    class: usize,
    n: usize,
    cfg: &SampleConfig,
    rng: &mut R,
    on_window: &mut dyn FnMut(usize, usize, usize),
) -> Result<Vec<Vec<u32>>> {
    (0..n)
        .map(|i| {
            fill_canvas_progress(model, canvas, class, cfg, rng, &mut |d, t| {
                on_window(i, d, t)
            })?
            .tokens()
            .context("window filling left a cell unknown")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_canvas_with_half_overlap() {
        assert_eq!(window_starts(16, 16), vec![0]);
        assert_eq!(window_starts(64, 16), vec![0, 8, 16, 24, 32, 40, 48]);
        assert_eq!(window_starts(20, 16), vec![0, 4]);
    }

    #[test]
    fn a_token_is_regenerated_if_any_pixel_of_its_patch_is_masked() {
        let m = token_mask(8, 4, 2, |x, y| x == 5 && y == 0);
        assert_eq!(
            m,
            vec![false, false, true, false, false, false, false, false]
        );
    }

    #[test]
    fn padding_places_the_known_tokens() {
        let c = Canvas::from_tokens(1, 2, &[4, 5], &[false, true]).unwrap();
        let p = c.pad(1, 0, 0, 1);
        assert_eq!((p.rows, p.cols), (2, 3));
        assert_eq!(p.cells, vec![None, None, None, Some(4), None, None]);
    }
}
