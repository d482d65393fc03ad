//! `arpg pack` / `arpg train` from the command line: Ctrl-C, resume, loading what was trained.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_arpg"))
}

fn tiny_config(dir: &Path) -> String {
    let p = dir.join("tiny.json");
    std::fs::write(&p, r#"{"dim":32,"n_layer":2,"n_head":2,"vocab_size":17,"num_classes":10,"block_size":64,"multiple_of":16}"#).unwrap();
    p.to_string_lossy().to_string()
}

/// The training split of the repository's UCI digits, packed into `dir/d.pack`.
fn digits_pack(dir: &Path) -> std::path::PathBuf {
    let csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits/digits.csv.gz"
    );
    let pack = dir.join("d.pack");
    assert!(bin()
        .args(["pack", "--digits", csv, "--out", pack.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    pack
}

#[test]
fn ctrl_c_stops_training_with_a_usable_checkpoint_and_resume_continues() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path());
    let out = d.path().join("run");
    let child = bin()
        .args([
            "train",
            "--data",
            pack.to_str().unwrap(),
            "--config",
            &cfg,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "100000",
            "--batch-size",
            "8",
            "--log-every",
            "1",
            "--lr",
            "1e-3",
            "--lr-absolute",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("train.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&log)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ckpt = out.join("checkpoint.safetensors");
    let weights = out.join("model.safetensors");
    assert!(ckpt.exists() && weights.exists());
    // No temporary files left behind, and the weights load into `arpg sample`.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| [
            "checkpoint.safetensors",
            "model.safetensors",
            "train.jsonl",
            "config.json"
        ]
        .contains(&n.as_str())),
        "{names:?}"
    );
    let o = bin()
        .args([
            "sample",
            "--config",
            &cfg,
            "--weights",
            weights.to_str().unwrap(),
            "--classes",
            "1",
            "--steps",
            "4",
            "--out",
            d.path().join("s").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Resume continues from the saved step to --until.
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    let o = bin()
        .args([
            "train",
            "--data",
            pack.to_str().unwrap(),
            "--resume",
            ckpt.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "100000",
            "--until",
            &(lines + 2).to_string(),
            "--batch-size",
            "8",
            "--log-every",
            "1",
            "--lr",
            "1e-3",
            "--lr-absolute",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(
        last["step"].as_u64().unwrap() as usize >= lines + 2,
        "{last}"
    );
    // A corrupt pack is reported with its path.
    let bytes = std::fs::read(&pack).unwrap();
    std::fs::write(&pack, &bytes[..bytes.len() - 3]).unwrap();
    let o = bin()
        .args([
            "train",
            "--data",
            pack.to_str().unwrap(),
            "--config",
            &cfg,
            "--out",
            out.to_str().unwrap(),
            "--overwrite",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("d.pack") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn tokenize_then_pack_a_folder_per_class_tree_resumably() {
    let d = tempfile::tempdir().unwrap();
    let fx = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/parity-a"
    ));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("a.json")).unwrap()).unwrap();
    let vcfg = d.path().join("vq.json");
    std::fs::write(&vcfg, j["vq_config"].to_string()).unwrap();
    let root = d.path().join("images");
    for (c, name) in [("cat", "a.png"), ("cat", "b.png"), ("dog", "c.jpg")] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        let img = image::RgbImage::from_fn(20, 14, |x, y| {
            image::Rgb([(x * 12) as u8, (y * 17) as u8, name.len() as u8 * 9])
        });
        img.save(root.join(c).join(name)).unwrap();
    }
    let out = d.path().join("codes");
    let vq_weights = fx.join("a_vq.safetensors");
    let args = [
        "tokenize",
        root.to_str().unwrap(),
        out.to_str().unwrap(),
        "--vq-config",
        vcfg.to_str().unwrap(),
        "--vq-weights",
        vq_weights.to_str().unwrap(),
        "--image-size",
        "8",
        "--ten-crop",
    ];
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = arpg::data::npy::read(&out.join("0/a.npy")).unwrap();
    assert_eq!(a.shape, vec![1, 10, 16]);
    assert!(out.join("1/c.npy").exists());
    let mtime = std::fs::metadata(out.join("0/a.npy"))
        .unwrap()
        .modified()
        .unwrap();
    let o = bin().args(args).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 already encoded"));
    assert_eq!(
        std::fs::metadata(out.join("0/a.npy"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    let pack = d.path().join("codes.pack");
    let o = bin()
        .args([
            "pack",
            "--paper",
            out.to_str().unwrap(),
            "--vocab-size",
            "64",
            "--out",
            pack.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = arpg::data::Packed::open(&pack).unwrap();
    assert_eq!(
        (p.len(), p.seq_len, p.total_crops(), p.label(2)),
        (3, 16, 30, 1)
    );
}

#[test]
fn multi_process_training_without_nccl_or_with_bad_launcher_variables_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path());
    let out = d.path().join("run");
    let train = |extra: &[&str], env: &[(&str, &str)]| {
        let o = bin()
            .args(["train", "--data", pack.to_str().unwrap(), "--config", &cfg])
            .args(["--out", out.to_str().unwrap(), "--steps", "1"])
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    if !cfg!(feature = "nccl") {
        let e = train(&["--gpus", "2"], &[]);
        assert!(e.contains("--gpus 2") && e.contains("NCCL"), "{e}");
        let e = train(
            &[],
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")],
        );
        assert!(e.contains("WORLD_SIZE=2") && e.contains("NCCL"), "{e}");
    }
    let e = train(&["--gpus", "0"], &[]);
    assert!(e.contains("--gpus"), "{e}");
    let e = train(
        &[],
        &[("WORLD_SIZE", "2"), ("RANK", "5"), ("MASTER_PORT", "1")],
    );
    assert!(e.contains("RANK=5"), "{e}");
    assert!(!out.join("checkpoint.safetensors").exists());
}

#[test]
fn the_hand_written_step_trains_from_the_command_line_like_autograd() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path());
    let run = |step: &str| {
        let out = d.path().join(step);
        let o = bin()
            .args(["train", "--data", pack.to_str().unwrap(), "--config", &cfg])
            .args([
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "6",
                "--batch-size",
                "8",
            ])
            .args(["--dropout", "0", "--log-every", "2", "--step", step])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("train.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<f64>>()
    };
    let (auto, hand) = (run("autograd"), run("hand"));
    assert_eq!(auto.len(), 3);
    for (a, h) in auto.iter().zip(&hand) {
        assert!((a - h).abs() < 1e-4 * a, "losses {auto:?} vs {hand:?}");
    }
    let o = bin()
        .args(["train", "--data", pack.to_str().unwrap(), "--config", &cfg])
        .args([
            "--out",
            d.path().join("x").to_str().unwrap(),
            "--step",
            "fast",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--step"), "{e}");
}

#[test]
fn a_bucket_size_of_nothing_is_refused_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path());
    for mb in ["0", "inf"] {
        let out = d.path().join(format!("run-{mb}"));
        let o = bin()
            .args(["train", "--data", pack.to_str().unwrap(), "--config", &cfg])
            .args(["--out", out.to_str().unwrap(), "--steps", "1"])
            .args(["--bucket-mb", mb])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("--bucket-mb"), "{e}");
        assert!(!out.join("checkpoint.safetensors").exists());
    }
}
