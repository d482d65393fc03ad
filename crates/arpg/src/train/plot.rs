//! `arpg plot`: training curves (loss, learning rate, gradient norm) from a `train.jsonl` log,
//! drawn into a PNG with a tiny built-in bitmap font (no font files needed).

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 640;
const PANEL_H: u32 = 180;
const LEFT: u32 = 70;
const BOTTOM: u32 = 22;
const TOP: u32 = 22;

/// The curves of a log: step and the logged series.
pub struct Curves {
    pub steps: Vec<f64>,
    pub series: Vec<(&'static str, Vec<f64>)>,
}

pub fn read_log(path: &Path) -> Result<Curves> {
    let text = crate::util::read_small(path, 1 << 30, "training log")?;
    // A crash can cut the last line; it is the only one that may be incomplete.
    let complete = text.ends_with('\n');
    let last = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .last()
        .map(|(i, _)| i);
    let keys = [("loss", "loss"), ("lr", "lr"), ("grad norm", "grad_norm")];
    let mut c = Curves {
        steps: vec![],
        series: keys.iter().map(|k| (k.0, vec![])).collect(),
    };
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if !complete && Some(i) == last => {
                eprintln!(
                    "note: {}: the last line (line {}) is cut short, as by a crash; skipped",
                    path.display(),
                    i + 1
                );
                continue;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))
            }
        };
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("{}: line {} has no number {k:?}", path.display(), i + 1))
        };
        c.steps.push(num("step")?);
        for (j, (_, key)) in keys.iter().enumerate() {
            c.series[j].1.push(num(key)?);
        }
    }
    if c.steps.is_empty() {
        bail!("{}: no log lines", path.display());
    }
    Ok(c)
}

pub fn draw(c: &Curves) -> RgbImage {
    let n = c.series.len() as u32;
    let mut img = RgbImage::from_pixel(W, PANEL_H * n, Rgb([255, 255, 255]));
    let (x0, x1) = bounds(&c.steps);
    for (p, (name, ys)) in c.series.iter().enumerate() {
        let top = p as u32 * PANEL_H;
        let (y0, y1) = bounds(ys);
        let (pl, pr, pt, pb) = (LEFT, W - 10, top + TOP, top + PANEL_H - BOTTOM);
        for x in pl..=pr {
            img.put_pixel(x, pb, Rgb([0, 0, 0]));
        }
        for y in pt..=pb {
            img.put_pixel(pl, y, Rgb([0, 0, 0]));
        }
        text(&mut img, name, pl + 4, top + 4, 2);
        text(&mut img, &fmt(y1), 4, pt, 2);
        text(&mut img, &fmt(y0), 4, pb - 10, 2);
        text(&mut img, &fmt(x0), pl, pb + 6, 2);
        let xs = fmt(x1);
        text(
            &mut img,
            &xs,
            pr.saturating_sub(8 * xs.len() as u32),
            pb + 6,
            2,
        );
        let map = |x: f64, y: f64| {
            let fx = if x1 > x0 { (x - x0) / (x1 - x0) } else { 0.5 };
            let fy = if y1 > y0 { (y - y0) / (y1 - y0) } else { 0.5 };
            (
                (pl as f64 + fx * (pr - pl) as f64) as i64,
                (pb as f64 - fy * (pb - pt) as f64) as i64,
            )
        };
        let pts: Vec<(i64, i64)> = c.steps.iter().zip(ys).map(|(&x, &y)| map(x, y)).collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], Rgb([200, 40, 40]));
        }
        if pts.len() == 1 {
            line(&mut img, pts[0], pts[0], Rgb([200, 40, 40]));
        }
    }
    img
}

fn bounds(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn fmt(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// 3x5 glyphs, one row of 3 bits per entry, top to bottom.
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' | 's' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' | 'g' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'e' => [7, 5, 7, 4, 7],
        'l' => [4, 4, 4, 4, 7],
        'o' => [0, 7, 5, 5, 7],
        'r' => [0, 7, 4, 4, 4],
        'a' => [0, 7, 1, 7, 7],
        'd' => [1, 1, 7, 5, 7],
        'n' => [0, 7, 5, 5, 5],
        'm' => [0, 7, 7, 5, 5],
        _ => [0; 5],
    }
}

fn text(img: &mut RgbImage, s: &str, x: u32, y: u32, scale: u32) {
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        for (r, bits) in g.iter().enumerate() {
            for c in 0..3u32 {
                if bits & (4 >> c) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (
                                x + (i as u32 * 4 + c) * scale + dx,
                                y + r as u32 * scale + dy,
                            );
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, Rgb([0, 0, 0]));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_three_panels_with_curves_and_rejects_bad_logs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("train.jsonl");
        let lines: Vec<String> = (1..=20)
            .map(|s| {
                format!(
                    r#"{{"step":{s},"loss":{},"lr":0.001,"grad_norm":{}}}"#,
                    3.0 / s as f64,
                    1.0 + s as f64 * 0.1
                )
            })
            .collect();
        std::fs::write(&p, lines.join("\n")).unwrap();
        let img = draw(&read_log(&p).unwrap());
        assert_eq!((img.width(), img.height()), (W, 3 * PANEL_H));
        for panel in 0..3 {
            let red = (panel * PANEL_H..(panel + 1) * PANEL_H)
                .flat_map(|y| (0..W).map(move |x| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == [200, 40, 40])
                .count();
            assert!(red > 50, "panel {panel} has {red} curve pixels");
        }
        std::fs::write(&p, "{\"step\":1}\nnot json").unwrap();
        let e = format!("{:#}", read_log(&p).err().unwrap());
        assert!(e.contains("train.jsonl") && e.contains("line 1"), "{e}");
    }
}
