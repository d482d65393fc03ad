//! The paper repository's commands (hp-l33/ARPG GETTING_STARTED.md), typed as they are there
//! with `torchrun ... sample_c2i_ddp.py` / `train_c2i.py` replaced by `arpg sample-fid` /
//! `arpg train`. Downloads are stood in for by small local files: the parity fixture's model
//! and VQ (`--config` / `--vq-config` describe their sizes) and the packed UCI digits; the
//! reference's own flags (--num-fid-samples, ...) keep the runs short.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/parity-a"
    ))
    .join(name)
}

fn arpg_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arpg"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok_in(dir: &Path, args: &[&str]) -> String {
    let o = arpg_in(dir, args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "arpg {args:?} failed:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixture's model and VQ configs, written into `dir`.
fn configs(dir: &Path) -> (PathBuf, PathBuf) {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap();
    let (c, v) = (dir.join("cfg.json"), dir.join("vq.json"));
    std::fs::write(&c, j["arpg_config"].to_string()).unwrap();
    std::fs::write(&v, j["vq_config"].to_string()).unwrap();
    (c, v)
}

#[test]
fn getting_started_sampling_commands_mean_what_the_reference_means() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, vq) = configs(d.path());
    let (gpt, vqw) = (fixture("a_arpg.pt"), fixture("a_vq.pt"));
    let stand_ins = |out: &str| -> Vec<String> {
        [
            "--config",
            s(&cfg),
            "--vq-config",
            s(&vq),
            "--num-fid-samples",
            "2",
            "--per-proc-batch-size",
            "2",
            "--sample-dir",
            out,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        ok_in(d.path(), &refs);
    };
    // GETTING_STARTED.md, ARPG-L, as typed (checkpoint names pointing at the stand-ins).
    let typed = |cfg_scale: &str, out: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            "sample-fid",
            "--gpt-model",
            "ARPG-L",
            "--gpt-ckpt",
            s(&gpt),
            "--vq-ckpt",
            s(&vqw),
            "--sample-schedule",
            "arccos",
            "--cfg-scale",
            cfg_scale,
            "--step",
            "64",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(stand_ins(out));
        v
    };
    run(typed("5.0", "ref"));
    // The same run in this tool's own flag names.
    let mut native: Vec<String> = [
        "sample-fid",
        "--model",
        "ARPG-L",
        "--weights",
        s(&gpt),
        "--vq-weights",
        s(&vqw),
        "--schedule",
        "arccos",
        "--cfg",
        "5.0",
        "--steps",
        "64",
        "--config",
        s(&cfg),
        "--vq-config",
        s(&vq),
        "--num-samples",
        "2",
        "--batch-size",
        "2",
        "--out",
        "native",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    run(native.clone());
    let npz = |dir: &str| std::fs::read(d.path().join(dir).join("samples.npz")).unwrap();
    assert_eq!(npz("ref"), npz("native"), "the aliases are our flags");
    // --cfg-scale is the guidance scale: another scale, other images.
    run(typed("1.0", "ref_cfg1"));
    assert_ne!(npz("ref"), npz("ref_cfg1"));
    // --step is the number of decoding steps: 64 is all the fixture's 64 tokens one by one,
    // 65 is impossible for it, and the error names the flag.
    native[12] = "65".into();
    let refs: Vec<&str> = native.iter().map(|x| x.as_str()).collect();
    let o = arpg_in(d.path(), &refs);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--steps 65"));
    // The reference's fixed flags: its own values are accepted, others named in an error.
    let mut a = typed("5.0", "fixed");
    a.extend(
        [
            "--vq-model",
            "VQ-16",
            "--precision",
            "none",
            "--cfg-interval",
            "-1",
            "--compile",
        ]
        .map(String::from),
    );
    run(a.clone());
    a.extend(["--image-size", "384"].map(String::from));
    let refs: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    let o = arpg_in(d.path(), &refs);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--image-size 384"),
        "{err}"
    );
}

#[test]
fn getting_started_training_command_means_what_the_reference_means() {
    let d = tempfile::tempdir().unwrap();
    let csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits/digits.csv.gz"
    );
    ok_in(d.path(), &["pack", "--digits", csv, "--out", "codes.pack"]);
    let cfg = d.path().join("tiny.json");
    std::fs::write(&cfg, r#"{"dim":32,"n_layer":2,"n_head":2,"vocab_size":17,"num_classes":10,"block_size":64,"multiple_of":16}"#).unwrap();
    // GETTING_STARTED.md's training command as typed, the digits pack standing in for the
    // ImageNet codes and --config for ARPG-L's size; --until 1 stops after one step.
    let err = ok_in(
        d.path(),
        &[
            "train",
            "--gpt-model",
            "ARPG-L",
            "--code-path",
            "codes.pack",
            "--epochs",
            "400",
            "--global-batch-size",
            "1024",
            "--lr",
            "4e-4",
            "--config",
            s(&cfg),
            "--until",
            "1",
        ],
    );
    // 1,438 training digits: one full batch of 1024 per epoch (the reference drops the
    // rest), so 400 steps, the reference's default 100-epoch warm-up, and --lr absolute.
    assert!(
        err.contains("batch 1024, lr 4e-4 (absolute), 400 steps (1 per epoch), warm-up 100 steps"),
        "{err}"
    );
    // Its default --results-dir, `results`.
    let log = std::fs::read_to_string(d.path().join("results/train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 1);
    // Warm-up is linear to 4e-4 over 100 steps, counted as train_c2i.py counts it
    // (lr * epoch / warmup_epochs): its first step at lr 0.
    let lr = first["lr"].as_f64().unwrap();
    assert_eq!(lr, 0.0);
    assert!(d.path().join("results/model.safetensors").exists());
    // Stochastic depth is not offered: the flag is named in the error.
    let o = arpg_in(
        d.path(),
        &[
            "train",
            "--code-path",
            "codes.pack",
            "--config",
            s(&cfg),
            "--drop-path-rate",
            "0.1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--drop-path-rate 0.1"),
        "{err}"
    );
}
