//! The `arpg` command line end to end: parity through the flags, and clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/parity-a"
    ))
    .join(name)
}

fn json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap()
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

/// Runs, must fail with exit code 1 (not a panic's 101) and mention every `needle`.
fn fails(args: &[&str], needles: &[&str]) {
    let o = arpg(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "arpg {args:?} should fail");
    assert_ne!(o.status.code(), Some(101), "arpg {args:?} panicked:\n{err}");
    assert!(!err.contains("panicked"), "arpg {args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "arpg {args:?}: error lacks {n:?}:\n{err}");
    }
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).unwrap();
    p.to_string_lossy().to_string()
}

fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap()],
        _ => panic!(),
    }
}

#[test]
fn greedy_sampling_through_the_cli_matches_the_reference() {
    let d = tempfile::tempdir().unwrap();
    let j = json();
    let cfg = write_json(d.path(), "cfg.json", &j["arpg_config"]);
    let w = fixture("a_arpg.pt");
    for (i, case) in j["generate"].as_array().unwrap().iter().enumerate() {
        let order = write_json(d.path(), &format!("order{i}.json"), &case["order"]);
        let classes: Vec<String> = flat(&case["classes"])
            .iter()
            .map(|c| (*c as u32).to_string())
            .collect();
        let out = d.path().join(format!("t{i}.json"));
        ok(&[
            "sample",
            "--config",
            &cfg,
            "--weights",
            w.to_str().unwrap(),
            "--classes",
            &classes.join(","),
            "--order",
            &order,
            "--temperature",
            "0",
            "--steps",
            &case["steps"].to_string(),
            "--cfg",
            &case["cfg"].to_string(),
            "--cfg-schedule",
            case["cfg_schedule"].as_str().unwrap(),
            "--schedule",
            case["sample_schedule"].as_str().unwrap(),
            "--tokens-out",
            out.to_str().unwrap(),
            "--out",
            d.path().join("png").to_str().unwrap(),
        ]);
        let got: Vec<Vec<u32>> =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let want: Vec<u32> = flat(&case["tokens"]).iter().map(|&x| x as u32).collect();
        assert_eq!(got.concat(), want, "case {i}");
        // Without VQ weights, only tokens are written.
        assert!(!d.path().join("png/grid.png").exists());
    }
}

#[test]
fn vq_decode_and_encode_through_the_cli_match_the_reference() {
    let d = tempfile::tempdir().unwrap();
    let j = json();
    let vcfg = write_json(d.path(), "vq.json", &j["vq_config"]);
    let w = fixture("a_vq.safetensors");
    let toks = write_json(d.path(), "codes.json", &j["vq_decode"]["codes"]);
    let raw = d.path().join("raw.npy");
    ok(&[
        "decode",
        "--vq-config",
        &vcfg,
        "--vq-weights",
        w.to_str().unwrap(),
        "--tokens",
        &toks,
        "--out",
        d.path().join("dec").to_str().unwrap(),
        "--raw-out",
        raw.to_str().unwrap(),
    ]);
    let npy = arpg::data::npy::read(&raw).unwrap();
    assert_eq!(npy.shape, vec![2, 3, 8, 8]);
    let want = flat(&j["vq_decode"]["image"]);
    for (a, b) in npy.floats().iter().zip(&want) {
        assert!(
            (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{a} vs {b}"
        );
    }
    assert!(d.path().join("dec/000001.png").exists());

    let img = flat(&j["vq_encode"]["image"]);
    let body: Vec<u8> = img.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
    let raw_in = d.path().join("in.npy");
    std::fs::write(
        &raw_in,
        arpg::data::npy::to_bytes("<f4", &[2, 3, 8, 8], &body),
    )
    .unwrap();
    let out = d.path().join("idx.json");
    ok(&[
        "encode",
        "--vq-config",
        &vcfg,
        "--vq-weights",
        w.to_str().unwrap(),
        "--raw-in",
        raw_in.to_str().unwrap(),
        "--tokens-out",
        out.to_str().unwrap(),
    ]);
    let got: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want: Vec<u32> = flat(&j["vq_encode"]["indices"])
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(got.concat(), want);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let j = json();
    let cfg = write_json(d.path(), "cfg.json", &j["arpg_config"]);
    let w = fixture("a_arpg.safetensors");
    let w = w.to_str().unwrap();
    let t = d.path().join("t.json");
    let t = t.to_str().unwrap();
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "sample",
            "--config",
            &cfg,
            "--weights",
            w,
            "--tokens-out",
            t,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&'static str], needles: &[&str]| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        fails(&refs, needles);
    };
    run(
        &["--classes", "10", "--steps", "4"],
        &["class id 10", "10 classes"],
    );
    run(&["--classes", "1", "--steps", "0"], &["--steps 0"]);
    run(&["--classes", "1", "--steps", "65"], &["--steps 65"]);
    run(
        &["--classes", "1", "--steps", "4", "--top-p", "0"],
        &["--top-p"],
    );
    run(
        &["--classes", "1", "--steps", "4", "--device", "tpu"],
        &["--device"],
    );
    fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--weights",
            "/nonexistent/x.pt",
            "--classes",
            "1",
        ],
        &["/nonexistent/x.pt"],
    );
    // A checkpoint of another configuration: shape mismatches are listed.
    let mut other = j["arpg_config"].clone();
    other["dim"] = serde_json::json!(32);
    let ocfg = write_json(d.path(), "other.json", &other);
    fails(
        &[
            "sample",
            "--config",
            &ocfg,
            "--weights",
            w,
            "--classes",
            "1",
            "--tokens-out",
            t,
        ],
        &["shape mismatches", "embeddings.weight"],
    );
    // Unknown keys in a config file.
    let mut bad = j["arpg_config"].clone();
    bad["dimension"] = serde_json::json!(3);
    let bcfg = write_json(d.path(), "bad.json", &bad);
    fails(
        &[
            "sample",
            "--config",
            &bcfg,
            "--weights",
            w,
            "--classes",
            "1",
        ],
        &["bad.json", "dimension"],
    );
    // A corrupt checkpoint.
    let corrupt = d.path().join("corrupt.pt");
    std::fs::write(&corrupt, b"PK\x03\x04garbage").unwrap();
    fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--weights",
            corrupt.to_str().unwrap(),
            "--classes",
            "1",
        ],
        &["corrupt.pt"],
    );
    // An order that is not a permutation.
    let order = write_json(d.path(), "order.json", &serde_json::json!([0, 0, 1]));
    run(
        &[
            "--classes",
            "1",
            "--order",
            Box::leak(order.into_boxed_str()),
        ],
        &["order.json", "repeated"],
    );
    // Tokens outside the codebook.
    let vcfg = write_json(d.path(), "vq.json", &j["vq_config"]);
    let toks = write_json(d.path(), "big.json", &serde_json::json!([[0, 1, 2, 64]]));
    fails(
        &[
            "decode",
            "--vq-config",
            &vcfg,
            "--vq-weights",
            fixture("a_vq.pt").to_str().unwrap(),
            "--tokens",
            &toks,
        ],
        &["token 64", "64 entries"],
    );
}

#[test]
fn the_builtin_digits_model_samples_offline() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("digits");
    let run = |seed: &str, tokens: &str| {
        ok(&[
            "sample",
            "--model",
            "digits",
            "--classes",
            "3,7",
            "--per-class",
            "2",
            "--steps",
            "8",
            "--cfg",
            "2",
            "--seed",
            seed,
            "--out",
            out.to_str().unwrap(),
            "--tokens-out",
            d.path().join(tokens).to_str().unwrap(),
        ])
    };
    run("5", "a.json");
    for f in ["000000_class3.png", "000003_class7.png", "grid.png"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let img = image::open(out.join("000000_class3.png")).unwrap();
    assert_eq!((img.width(), img.height()), (8, 8));
    // Same seed, same tokens; another seed, other tokens.
    run("5", "b.json");
    run("6", "c.json");
    let read = |n: &str| std::fs::read_to_string(d.path().join(n)).unwrap();
    assert_eq!(read("a.json"), read("b.json"));
    assert_ne!(read("a.json"), read("c.json"));
}

#[test]
fn offline_presets_name_the_file_and_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args([
            "sample",
            "--model",
            "ARPG-L",
            "--classes",
            "1",
            "--out",
            d.path().join("o").to_str().unwrap(),
        ])
        .env("HF_HOME", d.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("arpg_300m.pt") && err.contains("--weights"),
        "{err}"
    );
    let toks = write_json(d.path(), "t.json", &serde_json::json!([[1, 2, 3, 4]]));
    let o = Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args(["decode", "--tokens", &toks])
        .env("HF_HOME", d.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("vq_ds16_c2i.pt") && err.contains("--vq-weights"),
        "{err}"
    );
}
