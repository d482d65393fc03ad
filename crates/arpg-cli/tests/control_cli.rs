//! Controllable generation through the command line: conditions (files, Canny edges of
//! photos, digit sketches), packing them, training a control model, sampling and inpainting
//! with one, and the errors around them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(p: &str) -> String {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join(p)
        .to_string_lossy()
        .to_string()
}

fn arpg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = arpg(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "arpg {args:?} failed:\n{err}");
    err
}

fn fails(args: &[&str], needles: &[&str]) {
    let o = arpg(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "arpg {args:?} should fail");
    assert_ne!(o.status.code(), Some(101), "arpg {args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "arpg {args:?}: error lacks {n:?}:\n{err}");
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// The fixture-sized VQ tokenizer (2x2 pixels per token, 64 codes) and a control model for
/// its 8x8 token grid: conditions are 16x16.
fn vq_control_model(dir: &Path, dropout: f64) -> (String, String) {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/parity-a/a.json")).unwrap(),
    )
    .unwrap();
    let vq = dir.join("vq.json");
    std::fs::write(&vq, j["vq_config"].to_string()).unwrap();
    let mut cfg = j["arpg_config"].clone();
    cfg["control"] =
        serde_json::json!({"channels": 1, "patch": 2, "layers": 1, "dropout": dropout});
    let c = dir.join(format!("control{dropout}.json"));
    std::fs::write(&c, cfg.to_string()).unwrap();
    (s(&c), s(&vq))
}

#[test]
fn a_random_control_model_samples_from_canny_edges_of_a_photo() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, vq) = vq_control_model(d.path(), 0.1);
    let run = |photo: &str, out: &str, tokens: Option<&str>| {
        let mut args = vec![
            "sample",
            "--config",
            &cfg,
            "--init",
            "random",
            "--vq-config",
            &vq,
            "--classes",
            "1,2",
            "--per-class",
            "2",
            "--steps",
            "4",
            "--condition",
            photo,
            "--canny",
            // Greedy: a random model's logits are nearly flat, so its argmax shows the
            // condition's (small) effect where a draw might not.
            "--temperature",
            "0",
        ];
        let cond_out = s(&d.path().join(format!("{out}-cond.png")));
        let out = s(&d.path().join(out));
        args.extend(["--condition-out", &cond_out, "--out", &out]);
        if let Some(t) = tokens {
            args.extend(["--tokens-out", t]);
        }
        let err = ok(&args);
        (err, cond_out, out)
    };
    let china = repo("data/photos/china.jpg");
    let (err, cond, out) = run(&china, "a", None);
    assert!(
        err.contains("resized to the model's 16x16 as ADM resizes"),
        "{err}"
    );
    let c = image::open(&cond).unwrap().to_luma8();
    assert_eq!(c.dimensions(), (16, 16));
    assert!(
        c.pixels().all(|p| p[0] == 0 || p[0] == 255),
        "edges are binary"
    );
    assert!(c.pixels().any(|p| p[0] == 255), "the photo has edges");
    let png = image::open(Path::new(&out).join("000003_class2.png")).unwrap();
    assert_eq!((png.width(), png.height()), (16, 16));
    // Same seed and condition, same tokens; another photo's edges, other tokens.
    let t = |n: &str| s(&d.path().join(n));
    run(&china, "b", Some(&t("b.json")));
    run(&china, "c", Some(&t("c.json")));
    run(&repo("data/photos/flower.jpg"), "d", Some(&t("d.json")));
    let read = |n: &str| std::fs::read_to_string(t(n)).unwrap();
    assert_eq!(read("b.json"), read("c.json"));
    assert_ne!(read("b.json"), read("d.json"));
    // The condition used for the edges is what a plain --condition of that image gives.
    let again = s(&d.path().join("again"));
    let again_t = t("again.json");
    ok(&[
        "sample",
        "--config",
        &cfg,
        "--init",
        "random",
        "--vq-config",
        &vq,
        "--classes",
        "1,2",
        "--per-class",
        "2",
        "--steps",
        "4",
        "--condition",
        &cond,
        "--temperature",
        "0",
        "--out",
        &again,
        "--tokens-out",
        &again_t,
    ]);
    assert_eq!(read("b.json"), read("again.json"));
}

#[test]
fn condition_errors_name_the_flag_or_file() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, vq) = vq_control_model(d.path(), 0.0);
    let out = s(&d.path().join("o"));
    let photo = repo("data/photos/china.jpg");
    fails(
        &[
            "sample",
            "--model",
            "digits",
            "--condition",
            &photo,
            "--out",
            &out,
        ],
        &["--condition", "no control encoder"],
    );
    fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--init",
            "random",
            "--vq-config",
            &vq,
            "--steps",
            "2",
            "--out",
            &out,
        ],
        &["without condition dropout", "--condition"],
    );
    fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--init",
            "random",
            "--vq-config",
            &vq,
            "--condition",
            &photo,
            "--control-guidance",
            "joint",
            "--out",
            &out,
        ],
        &["--control-guidance class"],
    );
    let txt = d.path().join("notes.txt");
    std::fs::write(&txt, "not an image").unwrap();
    fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--init",
            "random",
            "--vq-config",
            &vq,
            "--condition",
            &s(&txt),
            "--out",
            &out,
        ],
        &["--condition", "notes.txt"],
    );
    fails(
        &[
            "sample",
            "--model",
            "digits-sketch",
            "--condition",
            &photo,
            "--grid",
            "16x8",
            "--out",
            &out,
        ],
        &["--grid"],
    );
    fails(
        &[
            "sample",
            "--model",
            "digits-sketch",
            "--canny",
            "--out",
            &out,
        ],
        &["--condition"],
    );
    fails(
        &[
            "sample",
            "--model",
            "digits-sketch",
            "--condition",
            &photo,
            "--canny",
            "--canny-low",
            "300",
            "--out",
            &out,
        ],
        &["--canny-low 300"],
    );
}

/// A digit's sketch as an 8x8 PNG (white = stroke).
fn sketch_png(dir: &Path, index: usize) -> (String, u32, [u8; 64]) {
    let all =
        arpg::data::digits::load_csv_gz(Path::new(&repo("data/digits/digits.csv.gz"))).unwrap();
    let (_, test) = arpg::data::digits::split(&all);
    let d = &test[index];
    let sk = arpg::control::digit_sketch(&d.pixels);
    let img = image::GrayImage::from_raw(8, 8, sk.to_vec()).unwrap();
    let p = dir.join(format!("sketch{index}.png"));
    img.save(&p).unwrap();
    (s(&p), d.label, sk)
}

#[test]
fn digits_sketches_pack_train_sample_and_inpaint() {
    let d = tempfile::tempdir().unwrap();
    let pack = s(&d.path().join("sketch.pack"));
    let digits = repo("data/digits/digits.csv.gz");
    ok(&[
        "pack",
        "--digits",
        &digits,
        "--control",
        "sketch",
        "--out",
        &pack,
    ]);
    let p = arpg::data::Packed::open(Path::new(&pack)).unwrap();
    assert_eq!(p.condition_shape(), Some((1, 8, 8)));
    let px: Vec<u8> = p.tokens(0, 0).iter().map(|&t| t as u8).collect();
    assert_eq!(
        p.condition(0, 0),
        arpg::control::digit_sketch(&px.try_into().unwrap())
    );
    fails(
        &[
            "pack",
            "--paper",
            &s(d.path()),
            "--control",
            "sketch",
            "--out",
            &pack,
        ],
        &["--control sketch is for --digits"],
    );
    // A few steps fine-tuning the class-only digits model with a new encoder.
    let run = s(&d.path().join("run"));
    let err = ok(&[
        "train",
        "--data",
        &pack,
        "--config",
        &repo("models/digits-sketch/config.json"),
        "--init-from",
        &repo("models/digits/model.safetensors"),
        "--control-dropout",
        "0.2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--out",
        &run,
    ]);
    assert!(err.contains("new (control.*)"), "{err}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("run/config.json")).unwrap())
            .unwrap();
    assert_eq!(written["control"]["dropout"], 0.2);
    // Class-only data cannot train a control model.
    let plain = s(&d.path().join("plain.pack"));
    ok(&["pack", "--digits", &digits, "--out", &plain]);
    fails(
        &[
            "train",
            "--data",
            &plain,
            "--config",
            &repo("models/digits-sketch/config.json"),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--out",
            &s(&d.path().join("run2")),
        ],
        &["plain.pack", "--control"],
    );
    // The shipped sketch model draws the sketch's digit; the condition is written back.
    let (sketch, label, _) = sketch_png(d.path(), 3);
    let out = s(&d.path().join("samples"));
    let used = s(&d.path().join("used.png"));
    ok(&[
        "sample",
        "--model",
        "digits-sketch",
        "--condition",
        &sketch,
        "--classes",
        &label.to_string(),
        "--per-class",
        "4",
        "--condition-out",
        &used,
        "--out",
        &out,
    ]);
    assert_eq!(
        image::open(&used).unwrap().to_luma8().into_raw(),
        image::open(&sketch).unwrap().to_luma8().into_raw()
    );
    assert!(Path::new(&out)
        .join("000003_class".to_string() + &label.to_string() + ".png")
        .exists());
    // Inpainting the lower half composes with the condition.
    let img = s(&d
        .path()
        .join("samples")
        .join(format!("000000_class{label}.png")));
    let mask = d.path().join("mask.png");
    image::GrayImage::from_fn(8, 8, |_, y| image::Luma([if y >= 4 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    ok(&[
        "inpaint",
        "--model",
        "digits-sketch",
        "--image",
        &img,
        "--mask",
        &s(&mask),
        "--class",
        &label.to_string(),
        "--condition",
        &sketch,
        "--samples",
        "2",
        "--out",
        &s(&d.path().join("inp")),
    ]);
    assert!(d.path().join("inp/inpaint_1.png").exists());
}

#[test]
fn tokenize_stores_conditions_that_pack_and_train_read() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, vq) = vq_control_model(d.path(), 0.1);
    let vq_weights = repo("tests/fixtures/parity-a/a_vq.safetensors");
    let root = d.path().join("images");
    let conds = d.path().join("depth");
    for (c, name) in [("cat", "a"), ("cat", "b"), ("dog", "c")] {
        for dir in [&root, &conds] {
            std::fs::create_dir_all(dir.join(c)).unwrap();
        }
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            let sq = (10..30).contains(&x) && (8..22).contains(&y);
            image::Rgb(if sq {
                [250, 240, name.len() as u8]
            } else {
                [(x * 3) as u8, 20, 30]
            })
        });
        img.save(root.join(c).join(format!("{name}.png"))).unwrap();
        image::GrayImage::from_fn(40, 30, |x, _| image::Luma([(x * 6) as u8]))
            .save(conds.join(c).join(format!("{name}.png")))
            .unwrap();
    }
    let tokenize = |out: &Path, control: &str| {
        ok(&[
            "tokenize",
            &s(&root),
            &s(out),
            "--vq-config",
            &vq,
            "--vq-weights",
            &vq_weights,
            "--image-size",
            "16",
            "--control",
            control,
        ])
    };
    // Canny edges of each crop, beside the codes, and packed with them.
    let codes = d.path().join("codes");
    let err = tokenize(&codes, "canny");
    assert!(err.contains("--control stored"), "{err}");
    let c = arpg::data::npy::read(&codes.join("0/a.control.npy")).unwrap();
    assert_eq!(c.shape, vec![2, 1, 16, 16]);
    let pack = s(&d.path().join("c.pack"));
    ok(&[
        "pack",
        "--paper",
        &s(&codes),
        "--control",
        "stored",
        "--vocab-size",
        "64",
        "--out",
        &pack,
    ]);
    let p = arpg::data::Packed::open(Path::new(&pack)).unwrap();
    assert_eq!((p.len(), p.condition_shape()), (3, Some((1, 16, 16))));
    // The crop and its mirror: mirrored edges.
    let (a, b) = (p.condition(0, 0), p.condition(0, 1));
    assert!(a.contains(&255));
    for y in 0..16 {
        for x in 0..16 {
            assert_eq!(a[y * 16 + x], b[y * 16 + 15 - x]);
        }
    }
    // A plain pack of the same codes skips the condition files.
    let plain = s(&d.path().join("plain.pack"));
    ok(&[
        "pack",
        "--paper",
        &s(&codes),
        "--vocab-size",
        "64",
        "--out",
        &plain,
    ]);
    assert_eq!(
        arpg::data::Packed::open(Path::new(&plain)).unwrap().len(),
        3
    );
    // A folder of condition images mirroring the tree; a missing one is named.
    let codes2 = d.path().join("codes2");
    tokenize(&codes2, &s(&conds));
    let c2 = arpg::data::npy::read(&codes2.join("1/c.control.npy")).unwrap();
    assert_eq!(c2.shape, vec![2, 1, 16, 16]);
    std::fs::remove_file(conds.join("cat/b.png")).unwrap();
    let o = arpg(&[
        "tokenize",
        &s(&root),
        &s(&d.path().join("codes3")),
        "--vq-config",
        &vq,
        "--vq-weights",
        &vq_weights,
        "--image-size",
        "16",
        "--control",
        &s(&conds),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("b.png"), "{err}");
    // Two training steps of a control model on the canny pack.
    ok(&[
        "train",
        "--data",
        &pack,
        "--config",
        &cfg,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        &s(&d.path().join("run")),
    ]);
    assert!(d.path().join("run/model.safetensors").exists());
}

#[test]
fn train_control_adds_an_encoder_shaped_by_the_data() {
    let d = tempfile::tempdir().unwrap();
    let digits = repo("data/digits/digits.csv.gz");
    let pack = s(&d.path().join("sketch.pack"));
    ok(&[
        "pack",
        "--digits",
        &digits,
        "--control",
        "sketch",
        "--out",
        &pack,
    ]);
    let run = d.path().join("run");
    ok(&[
        "train",
        "--data",
        &pack,
        "--config",
        &repo("models/digits/config.json"),
        "--init-from",
        &repo("models/digits/model.safetensors"),
        "--control",
        "replace",
        "--control-layers",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--out",
        &s(&run),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["control"],
        serde_json::json!({"channels": 1, "patch": 1, "layers": 1, "query": "replace", "dropout": 0.1})
    );
    let plain = s(&d.path().join("plain.pack"));
    ok(&["pack", "--digits", &digits, "--out", &plain]);
    fails(
        &[
            "train",
            "--data",
            &plain,
            "--config",
            &repo("models/digits/config.json"),
            "--control",
            "add",
            "--steps",
            "1",
            "--out",
            &s(&d.path().join("run2")),
        ],
        &["--control", "plain.pack", "no conditions"],
    );
}
