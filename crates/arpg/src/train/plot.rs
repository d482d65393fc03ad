//! `arpg plot`: training curves (loss, learning rate, gradient norm) from a `train.jsonl` log,
//! drawn with `plotters` into a PNG: one panel per series, axes with ticks and labels, in
//! DejaVu Sans Mono built into the binary (`assets/`, its license beside it), so that no font
//! needs to be installed.

use anyhow::{bail, Context, Result};
use image::RgbImage;
use plotters::prelude::*;
use std::path::Path;

const W: u32 = 720;
const PANEL_H: u32 = 220;
/// The curves' colour (the tests look for it).
const CURVE: RGBColor = RGBColor(200, 40, 40);
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

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
    static FONT_ONCE: std::sync::Once = std::sync::Once::new();
    FONT_ONCE.call_once(|| {
        // The bytes are a valid TrueType file (checked by the test below).
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let n = c.series.len() as u32;
    let mut buf = vec![255u8; (W * PANEL_H * n * 3) as usize];
    if let Err(e) = draw_into(c, &mut buf, n) {
        // Drawing into memory only fails on a broken font: say so in the image's stead.
        tracing::warn!("plot: {e}");
    }
    RgbImage::from_raw(W, PANEL_H * n, buf).expect("sized buffer")
}

fn draw_into<'a>(
    c: &Curves,
    buf: &'a mut [u8],
    n: u32,
) -> std::result::Result<(), Box<dyn std::error::Error + 'a>> {
    let root = BitMapBackend::with_buffer(buf, (W, PANEL_H * n)).into_drawing_area();
    let panels = root.split_evenly((n as usize, 1));
    let (x0, x1) = bounds(&c.steps);
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 0.5, x0 + 0.5)
    };
    for ((name, ys), area) in c.series.iter().zip(panels.iter()) {
        let (y0, y1) = bounds(ys);
        let pad = if y1 > y0 {
            (y1 - y0) * 0.05
        } else {
            y0.abs().max(1e-12) * 0.05
        };
        let mut chart = ChartBuilder::on(area)
            .caption(*name, ("sans-serif", 16))
            .margin(8)
            .margin_right(24)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(6)
            .y_labels(5)
            .y_label_formatter(&|v| fmt(*v))
            .x_label_formatter(&|v| fmt(*v))
            .label_style(("sans-serif", 12))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        chart.draw_series(LineSeries::new(
            c.steps.iter().copied().zip(ys.iter().copied()),
            CURVE.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
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
        assert!(plotters::style::register_font("check", FontStyle::Normal, FONT).is_ok());
        let img = draw(&read_log(&p).unwrap());
        assert_eq!((img.width(), img.height()), (W, 3 * PANEL_H));
        for panel in 0..3 {
            let rows = panel * PANEL_H..(panel + 1) * PANEL_H;
            let count = |rgb: [u8; 3]| {
                rows.clone()
                    .flat_map(|y| (0..W).map(move |x| (x, y)))
                    .filter(|&(x, y)| img.get_pixel(x, y).0 == rgb)
                    .count()
            };
            let red = count([200, 40, 40]);
            assert!(red > 50, "panel {panel} has {red} curve pixels");
            // Axes, ticks and labels: black text and lines.
            let black = count([0, 0, 0]);
            assert!(black > 300, "panel {panel} has {black} black pixels");
        }
        std::fs::write(&p, "{\"step\":1}\nnot json").unwrap();
        let e = format!("{:#}", read_log(&p).err().unwrap());
        assert!(e.contains("train.jsonl") && e.contains("line 1"), "{e}");
    }
}
