//! Zero-shot editing from the command line, with the built-in digits model (pixel tokens)
//! and with the fixtures' tiny VQ model (2-pixel patches).

use image::{GrayImage, Luma, RgbImage};
use std::path::{Path, PathBuf};
use std::process::Command;

fn arpg(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_ne!(o.status.code(), Some(101), "arpg {args:?} panicked:\n{err}");
    (o.status.success(), err)
}

/// A held-out digit (the first of the test split: index 0 of the CSV) as an 8x8 PNG.
fn digit_png(dir: &Path) -> (PathBuf, Vec<u32>) {
    let all = arpg::data::digits::load_csv_gz(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits/digits.csv.gz"
    )))
    .unwrap();
    let d = &all[0];
    let img = GrayImage::from_fn(8, 8, |x, y| {
        Luma([arpg::tokenizer::pixel::pixel_of(
            d.pixels[(y * 8 + x) as usize] as u32,
        )])
    });
    let p = dir.join("digit.png");
    img.save(&p).unwrap();
    (p, d.pixels.iter().map(|&v| v as u32).collect())
}

fn mask_png(dir: &Path, name: &str, w: u32, h: u32, white: impl Fn(u32, u32) -> bool) -> PathBuf {
    let m = GrayImage::from_fn(w, h, |x, y| Luma([if white(x, y) { 255 } else { 0 }]));
    let p = dir.join(name);
    m.save(&p).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn inpainting_keeps_known_tokens_and_pixels_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let (img, tokens) = digit_png(d.path());
    let mask = mask_png(d.path(), "mask.png", 8, 8, |_, y| y >= 4);
    let toks = d.path().join("t.json");
    let out = d.path().join("out");
    let (ok, err) = arpg(&[
        "inpaint",
        "--model",
        "digits",
        "--image",
        s(&img),
        "--mask",
        s(&mask),
        "--class",
        "0",
        "--samples",
        "3",
        "--steps",
        "8",
        "--keep-pixels",
        "--out",
        s(&out),
        "--tokens-out",
        s(&toks),
    ]);
    assert!(ok, "{err}");
    let got: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(&toks).unwrap()).unwrap();
    assert_eq!(got.len(), 3);
    for g in &got {
        assert_eq!(&g[..32], &tokens[..32], "known tokens changed");
        assert!(g.iter().all(|&t| t < 17));
    }
    let src: RgbImage = image::open(&img).unwrap().to_rgb8();
    for i in 0..3 {
        let o = image::open(out.join(format!("inpaint_{i}.png")))
            .unwrap()
            .to_rgb8();
        for y in 0..4 {
            for x in 0..8 {
                assert_eq!(
                    o.get_pixel(x, y),
                    src.get_pixel(x, y),
                    "pixel ({x},{y}) of sample {i}"
                );
            }
        }
    }
}

#[test]
fn editing_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let (img, _) = digit_png(d.path());
    let base = |mask: &Path| {
        vec![
            "inpaint".to_string(),
            "--model".into(),
            "digits".into(),
            "--image".into(),
            s(&img).into(),
            "--mask".into(),
            s(mask).into(),
            "--class".into(),
            "3".into(),
            "--out".into(),
            s(&d.path().join("o")).into(),
        ]
    };
    let check = |args: Vec<String>, needles: &[&str]| {
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let (ok, err) = arpg(&refs);
        assert!(!ok, "{args:?} should fail");
        for n in needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in:\n{err}");
        }
    };
    let small = mask_png(d.path(), "small.png", 4, 4, |_, _| true);
    check(base(&small), &["small.png", "4x4", "8x8", "same size"]);
    let empty = mask_png(d.path(), "empty.png", 8, 8, |_, _| false);
    check(base(&empty), &["empty.png", "nothing to regenerate"]);
    let full = mask_png(d.path(), "full.png", 8, 8, |_, _| true);
    check(base(&full), &["full.png", "plain sampling"]);
    let half = mask_png(d.path(), "half.png", 8, 8, |x, _| x < 4);
    let mut a = base(&half);
    a[8] = "10".into();
    check(a, &["--class 10"]);
    // Outpainting with the fixtures' VQ (2-pixel patches): pads must be multiples of 2.
    let fx = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/parity-a"
    ));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("a.json")).unwrap()).unwrap();
    let cfg = d.path().join("cfg.json");
    std::fs::write(&cfg, j["arpg_config"].to_string()).unwrap();
    let vcfg = d.path().join("vq.json");
    std::fs::write(&vcfg, j["vq_config"].to_string()).unwrap();
    let vq_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "outpaint",
            "--config",
            s(&cfg),
            "--weights",
            s(&fx.join("a_arpg.pt")),
            "--vq-config",
            s(&vcfg),
            "--vq-weights",
            s(&fx.join("a_vq.pt")),
            "--image",
            s(&img),
            "--class",
            "1",
            "--steps",
            "4",
            "--out",
            s(&d.path().join("vqo")),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    check(
        vq_args(&["--right", "3"]),
        &["--right 3", "multiple", "2-pixel"],
    );
    check(vq_args(&[]), &["--left", "--right"]);
    let args = vq_args(&["--right", "6", "--top", "2"]);
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let (ok, err) = arpg(&refs);
    assert!(ok, "{err}");
    let o = image::open(d.path().join("vqo/outpaint_0.png")).unwrap();
    assert_eq!((o.width(), o.height()), (22, 18));
}

#[test]
fn outpainting_and_expansion_produce_the_asked_sizes_around_the_original() {
    let d = tempfile::tempdir().unwrap();
    let (img, tokens) = digit_png(d.path());
    let toks = d.path().join("t.json");
    let (ok, err) = arpg(&[
        "outpaint",
        "--model",
        "digits",
        "--image",
        s(&img),
        "--right",
        "8",
        "--left",
        "3",
        "--class",
        "0",
        "--steps",
        "8",
        "--out",
        s(&d.path().join("o")),
        "--tokens-out",
        s(&toks),
    ]);
    assert!(ok, "{err}");
    let o = image::open(d.path().join("o/outpaint_0.png")).unwrap();
    assert_eq!((o.width(), o.height()), (19, 8));
    let got: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(&toks).unwrap()).unwrap();
    for y in 0..8 {
        assert_eq!(
            &got[0][y * 19 + 3..y * 19 + 11],
            &tokens[y * 8..y * 8 + 8],
            "row {y} of the original moved"
        );
    }
    let (ok, err) = arpg(&[
        "sample",
        "--model",
        "digits",
        "--classes",
        "4",
        "--grid",
        "16x12",
        "--steps",
        "8",
        "--out",
        s(&d.path().join("g")),
    ]);
    assert!(ok, "{err}");
    let g = image::open(d.path().join("g/000000_class4.png")).unwrap();
    assert_eq!((g.width(), g.height()), (16, 12));
}
