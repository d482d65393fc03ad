//! Hostile input from the command line (issue #17): no panic, no abort, no exit 0 on bad
//! input, nothing lost. Each test names the numbered item or crash class it checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_arpg"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "arpg {args:?} failed:\n{err}");
    err
}

/// Must fail with exit code 1 (no panic, no abort) and mention every needle.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "arpg {args:?}: exit {:?}\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "arpg {args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "arpg {args:?}: error lacks {n:?}:\n{err}");
    }
    err
}

/// A zip archive at `path` holding one uncompressed entry.
fn write_stored_zip(path: &Path, name: &str, bytes: &[u8]) {
    let mut z = Vec::new();
    {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(&mut z));
        w.start_file(
            name,
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        std::io::Write::write_all(&mut w, bytes).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(path, &z).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/parity-a"
    ))
    .join(name)
}

fn digits_csv() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits/digits.csv.gz"
    )
}

fn tiny_config(dir: &Path, extra: &str) -> String {
    let p = dir.join(format!("tiny{}.json", extra.len()));
    std::fs::write(
        &p,
        format!(
            r#"{{"dim":32,"n_layer":2,"n_head":2,"vocab_size":17,"num_classes":10,"block_size":64,"multiple_of":16{extra}}}"#
        ),
    )
    .unwrap();
    p.to_string_lossy().to_string()
}

fn digits_pack(dir: &Path) -> PathBuf {
    let pack = dir.join("d.pack");
    ok(&["pack", "--digits", digits_csv(), "--out", s(&pack)]);
    pack
}

fn train_args<'a>(pack: &'a Path, cfg: &'a str, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        s(pack),
        "--config",
        cfg,
        "--out",
        s(out),
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
        "--lr-absolute",
    ]
}

fn log_steps(p: &Path) -> Vec<u64> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

fn wait_for_log_lines(log: &Path, n: usize) {
    let t0 = Instant::now();
    while std::fs::read_to_string(log)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < n
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn item1_training_into_an_existing_run_is_refused_unless_resumed_or_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path(), "");
    let out = d.path().join("run");
    let mut a = train_args(&pack, &cfg, &out);
    a.extend(["--steps", "2"]);
    ok(&a);
    let ckpt = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    fails(
        &a,
        &["already holds a training run", "--resume", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(out.join("checkpoint.safetensors")).unwrap(),
        ckpt
    );
    assert_eq!(log_steps(&out.join("train.jsonl")), vec![1, 2]);
    // Resuming another run's checkpoint into this folder would replace it, too.
    let other = d.path().join("other");
    let mut b = train_args(&pack, &cfg, &other);
    b.extend(["--steps", "1"]);
    ok(&b);
    let mut c = train_args(&pack, &cfg, &out);
    let oc = other.join("checkpoint.safetensors");
    c.extend(["--steps", "3", "--resume", s(&oc)]);
    fails(&c, &["holds another training run"]);
    // --overwrite starts over: the log holds only the new run.
    a.push("--overwrite");
    ok(&a);
    assert_eq!(log_steps(&out.join("train.jsonl")), vec![1, 2]);
}

#[test]
fn item3_and_zero_values_training_hyperparameters_are_validated() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path(), "");
    let out = d.path().join("run");
    let base = train_args(&pack, &cfg, &out);
    let cases: &[(&[&str], &str)] = &[
        (&["--min-lr", "1"], "--min-lr"),
        (&["--min-lr=-1e-5"], "--min-lr"),
        (&["--min-lr", "NaN"], "--min-lr"),
        (&["--weight-decay", "NaN"], "--weight-decay"),
        (&["--weight-decay=-0.1"], "--weight-decay"),
        (&["--grad-clip", "NaN"], "--grad-clip"),
        (&["--grad-clip=-1"], "--grad-clip"),
        (&["--warmup-steps", "10", "--steps", "5"], "--warmup-steps"),
        (&["--log-every", "0"], "--log-every"),
        (&["--ckpt-every", "0"], "--ckpt-every"),
        (&["--lr", "inf"], "--lr"),
        (&["--batch-size", "100000000"], "would need"),
    ];
    for (extra, needle) in cases {
        let mut a = base.clone();
        if let Some(i) = a.iter().position(|x| *x == extra[0]) {
            a.drain(i..i + 2);
        }
        a.extend_from_slice(extra);
        fails(&a, &[needle]);
    }
    assert!(!out.join("checkpoint.safetensors").exists());
    // The banner's peak learning rate is the one logged at the first step (no warm-up).
    let mut a = base.clone();
    a.extend(["--steps", "1"]);
    let o = bin().args(&a).output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let peak: f64 = err
        .split("peak lr ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    let logged: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("train.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        (logged["lr"].as_f64().unwrap() - peak).abs() < 1e-6 * peak,
        "{err}"
    );
}

#[test]
fn item2_pack_refuses_tokens_and_labels_that_do_not_fit() {
    let d = tempfile::tempdir().unwrap();
    let npy = |p: &Path, shape: &[usize], v: &[i64]| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let body: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(p, arpg::data::npy::to_bytes("<i8", shape, &body)).unwrap();
    };
    let paper = d.path().join("paper");
    npy(&paper.join("0/a.npy"), &[4], &[1, 2, 70000, 3]);
    let out = d.path().join("p.pack");
    fails(
        &[
            "pack",
            "--paper",
            s(&paper),
            "--vocab-size",
            "100000",
            "--out",
            s(&out),
        ],
        &["a.npy", "70000", "16 bits"],
    );
    let ll = d.path().join("ll");
    npy(&ll.join("codes/0.npy"), &[4], &[1, 2, 3, 4]);
    npy(&ll.join("labels/0.npy"), &[1], &[(1i64 << 32) + 2]);
    fails(
        &["pack", "--llamagen", s(&ll), "--out", s(&out)],
        &["labels/0.npy", "4294967298", "32 bits"],
    );
    assert!(!out.exists());
}

#[test]
fn item4_a_pt_with_a_corrupted_zip_entry_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("a_arpg.pt")).unwrap();
    // The middle of the archive is tensor data (stored, uncompressed).
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let pt = d.path().join("bad.pt");
    std::fs::write(&pt, &bytes).unwrap();
    let cfg = d.path().join("cfg.json");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap();
    std::fs::write(&cfg, j["arpg_config"].to_string()).unwrap();
    fails(
        &[
            "sample",
            "--config",
            s(&cfg),
            "--weights",
            s(&pt),
            "--steps",
            "2",
            "--tokens-out",
            s(&d.path().join("t.json")),
            "--out",
            s(&d.path().join("o")),
        ],
        &["bad.pt", "CRC"],
    );
}

#[test]
fn item5_non_finite_weights_and_config_values_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap();
    let mut t =
        candle_core::safetensors::load(fixture("a_arpg.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let name = "norm.weight";
    let w = t[name].to_vec1::<f32>().unwrap();
    let mut bad = w.clone();
    bad[0] = f32::NAN;
    t.insert(
        name.into(),
        candle_core::Tensor::from_vec(bad, w.len(), &candle_core::Device::Cpu).unwrap(),
    );
    let nan = d.path().join("nan.safetensors");
    candle_core::safetensors::save(&t, &nan).unwrap();
    let cfg = d.path().join("cfg.json");
    std::fs::write(&cfg, j["arpg_config"].to_string()).unwrap();
    let sample = |cfg: &Path, w: &Path| {
        vec![
            "sample".to_string(),
            "--config".into(),
            s(cfg).into(),
            "--weights".into(),
            s(w).into(),
            "--steps".into(),
            "2".into(),
            "--tokens-out".into(),
            s(&d.path().join("t.json")).into(),
            "--out".into(),
            s(&d.path().join("o")).into(),
        ]
    };
    let a = sample(&cfg, &nan);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&a, &["nan.safetensors", name, "NaN"]);
    for (key, value) in [
        ("rope_base", "0"),
        ("norm_eps", "-1e-5"),
        ("ffn_dim_multiplier", "0"),
    ] {
        let mut c = j["arpg_config"].clone();
        c[key] = serde_json::from_str(value).unwrap();
        let p = d.path().join(format!("{key}.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        let a = sample(&p, &fixture("a_arpg.safetensors"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        fails(&a, &[key, &format!("{key}.json")]);
    }
    // A guidance scale that overflows the logits is refused before sampling.
    let mut a = sample(&cfg, &fixture("a_arpg.safetensors"));
    a.extend(["--cfg".to_string(), "3.4e38".to_string()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails(&a, &["--cfg", "overflow"]);
    assert!(!d.path().join("t.json").exists());
}

fn eval_npz(dir: &Path, name: &str, entries: Vec<arpg::eval::npz::Entry>) -> PathBuf {
    let p = dir.join(name);
    arpg::eval::npz::write(&p, entries).unwrap();
    p
}

#[test]
fn item5_eval_refuses_nan_and_indefinite_reference_statistics() {
    use arpg::eval::npz::Entry;
    let d = tempfile::tempdir().unwrap();
    let imgs = vec![9u8; 4 * 4 * 4 * 3];
    let samples = eval_npz(
        d.path(),
        "s.npz",
        vec![Entry::u8s("arr_0", &[4, 4, 4, 3], &imgs)],
    );
    let (pd, sd) = (2048, 7 * 17 * 17);
    let eye = |n: usize, v: f64| -> Vec<f64> {
        (0..n * n)
            .map(|i| if i % (n + 1) == 0 { v } else { 0.0 })
            .collect()
    };
    let (mu, mus) = (vec![0.0; pd], vec![0.0; sd]);
    let mut nan_sigma = eye(pd, 1.0);
    nan_sigma[5] = f64::NAN;
    let (good_s, neg) = (eye(sd, 1.0), eye(pd, -1.0));
    for (name, sigma, needle) in [
        ("nan.npz", &nan_sigma, "NaN"),
        ("neg.npz", &neg, "positive semi-definite"),
    ] {
        let r = eval_npz(
            d.path(),
            name,
            vec![
                Entry::f64s("mu", &[pd], &mu),
                Entry::f64s("sigma", &[pd, pd], sigma),
                Entry::f64s("mu_s", &[sd], &mus),
                Entry::f64s("sigma_s", &[sd, sd], &good_s),
            ],
        );
        fails(
            &[
                "eval",
                "--samples",
                s(&samples),
                "--ref",
                s(&r),
                "--inception",
                "random",
            ],
            &[name, "sigma", needle],
        );
    }
}

#[test]
fn item6_a_second_ctrl_c_during_the_final_save_still_leaves_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path(), "");
    let out = d.path().join("run");
    let mut a = train_args(&pack, &cfg, &out);
    a.extend(["--steps", "100000"]);
    let child = bin()
        .args(&a)
        .env("ARPG_TEST_SLOW_PERSIST_MS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log_lines(&out.join("train.jsonl"), 2);
    signal(child.id(), "-INT");
    // The first save sleeps 1.5 s before its rename: the second Ctrl-C lands inside it.
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), "-INT");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted again"), "{err}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "checkpoint.safetensors",
            "config.json",
            "model.safetensors",
            "train.jsonl"
        ],
        "{err}"
    );
    let last = *log_steps(&out.join("train.jsonl")).last().unwrap();
    let mut r = train_args(&pack, &cfg, &out);
    let ckpt = out.join("checkpoint.safetensors");
    let until = (last + 1).to_string();
    r.extend(["--steps", "100000", "--resume", s(&ckpt), "--until", &until]);
    ok(&r);
}

#[test]
fn item11_resume_after_a_crash_logs_no_step_twice_and_plot_reads_a_cut_log() {
    let d = tempfile::tempdir().unwrap();
    let pack = digits_pack(d.path());
    let cfg = tiny_config(d.path(), "");
    let out = d.path().join("run");
    let mut a = train_args(&pack, &cfg, &out);
    a.extend(["--steps", "100000", "--ckpt-every", "2"]);
    let mut child = bin()
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = out.join("train.jsonl");
    wait_for_log_lines(&log, 5);
    child.kill().unwrap(); // a crash: no final save
    child.wait().unwrap();
    // The crash cut the last line.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, br#"{"step": 99, "lo"#).unwrap();
    drop(f);
    let png = d.path().join("loss.png");
    let err = ok(&["plot", s(&log), "--out", s(&png)]);
    assert!(err.contains("cut short") && png.exists(), "{err}");
    let ckpt = out.join("checkpoint.safetensors");
    let logged = log_steps(&log).len();
    let until = (logged + 3).to_string();
    let mut r = train_args(&pack, &cfg, &out);
    r.extend(["--steps", "100000", "--resume", s(&ckpt), "--until", &until]);
    ok(&r);
    let steps = log_steps(&log);
    let want: Vec<u64> = (1..=steps.len() as u64).collect();
    assert_eq!(steps, want, "every step once, in order");
    assert_eq!(*steps.last().unwrap() as usize, logged + 3);
}

#[test]
fn item7_tokenize_loses_no_image_and_shifts_no_label() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("images");
    let img = image::RgbImage::from_fn(10, 10, |x, y| image::Rgb([x as u8 * 20, y as u8 * 20, 0]));
    for (c, name) in [
        ("cat", "a.png"),
        ("cat", "b.Png"),
        ("dog", "c.JPG"),
        ("dog", "notes.txt"),
    ] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        if name.ends_with("txt") {
            std::fs::write(root.join(c).join(name), "x").unwrap();
        } else {
            img.save_with_format(
                root.join(c).join(name),
                match name.ends_with("JPG") {
                    true => image::ImageFormat::Jpeg,
                    false => image::ImageFormat::Png,
                },
            )
            .unwrap();
        }
    }
    let out = d.path().join("codes");
    let args_sized = |out: &Path, size: &str| {
        vec![
            "tokenize".to_string(),
            s(&root).into(),
            s(out).into(),
            "--tokenizer".into(),
            "pixel".into(),
            "--image-size".into(),
            size.into(),
        ]
    };
    let args = |out: &Path| args_sized(out, "8");
    let a = args(&out);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let err = ok(&a);
    assert!(
        err.contains("3 images in 2 classes") && err.contains("1 entries"),
        "{err}"
    );
    assert!(out.join("0/b.npy").exists() && out.join("1/c.npy").exists());
    let codes = arpg::data::npy::read(&out.join("0/a.npy")).unwrap();
    assert_eq!(codes.shape, vec![1, 2, 64]);
    assert!(
        codes.ints(&out).unwrap().iter().all(|&t| t < 17),
        "pixel tokens"
    );
    // Two images of one stem would both be written to a.npy.
    img.save(root.join("cat/a.jpg")).unwrap();
    fails(&a, &["a.png", "a.jpg", "rename one"]);
    std::fs::remove_file(root.join("cat/a.jpg")).unwrap();
    // An output folder inside the image root would be read as a class by the next run.
    let inside = root.join("codes");
    let b = args(&inside);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    fails(&b, &["inside the image root"]);
    assert!(!inside.exists());
    let z = args_sized(&out, "0");
    let z: Vec<&str> = z.iter().map(String::as_str).collect();
    fails(&z, &["--image-size"]);
}

#[test]
fn item8_a_truncated_shard_is_sampled_again_and_named() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("fid");
    let args = [
        "sample-fid",
        "--model",
        "digits",
        "--num-samples",
        "4",
        "--per-class",
        "1",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--no-png",
        "--out",
        s(&out),
    ];
    ok(&args);
    let shard = out.join("shards/shard_00000.npy");
    let full = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &full[..full.len() - 7]).unwrap();
    let err = ok(&args);
    assert!(
        err.contains("shard_00000.npy") && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(std::fs::read(&shard).unwrap(), full);
    let mut r = arpg::eval::npz::ImageReader::open(&out.join("samples.npz"), "arr_0").unwrap();
    assert_eq!(r.n, 4);
    assert!(r.next_batch(4).unwrap().is_some());
}

#[test]
fn item9_check_parity_fails_when_parity_fails_and_names_missing_keys() {
    let d = tempfile::tempdir().unwrap();
    for f in ["a_arpg.safetensors", "a_vq.safetensors"] {
        std::fs::copy(fixture(f), d.path().join(f)).unwrap();
    }
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap();
    let l = &mut j["teacher_forcing"]["logits"];
    let first = l.as_array_mut().unwrap();
    // Shift the reference logits: the model's no longer match them.
    fn shift(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Array(a) => a.iter_mut().for_each(shift),
            serde_json::Value::Number(n) => *v = serde_json::json!(n.as_f64().unwrap() + 1.0),
            _ => {}
        }
    }
    first.iter_mut().for_each(shift);
    std::fs::write(d.path().join("a.json"), j.to_string()).unwrap();
    fails(
        &["check-parity", "--fixtures", s(d.path())],
        &["parity fails", "teacher_logits_rel_err"],
    );
    j.as_object_mut().unwrap().remove("vq_decode");
    std::fs::write(d.path().join("a.json"), j.to_string()).unwrap();
    fails(
        &["check-parity", "--fixtures", s(d.path())],
        &["a.json", "vq_decode"],
    );
}

#[test]
fn item10_a_second_sample_into_the_same_folder_leaves_only_its_own_images() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("mine.png"), b"not ours").unwrap();
    let sample = |classes: &str, per: &str| {
        ok(&[
            "sample",
            "--model",
            "digits",
            "--classes",
            classes,
            "--per-class",
            per,
            "--steps",
            "2",
            "--out",
            s(&out),
        ]);
    };
    sample("1,2", "2");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 6);
    sample("3", "1");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["000000_class3.png", "grid.png", "mine.png"]);
}

#[test]
fn crash_class_npy_headers_malformed_from_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let headers = [
        "{'descr': 'x', 'fortran_order': False, 'shape': (4,), }",
        "{'descr': '<i8', 'fortran_order': False, 'shape': ), }",
        "{'descr': '<i8', 'fortran_order': False, 'shape': (99999999999999999999,), }",
        "{'descr': '<i8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
        "{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000000,), }",
        "{'descr': '<i8', 'fortran_order': False, 'sh",
        "{'descr': ",
        "",
    ];
    for (i, h) in headers.iter().enumerate() {
        let root = d.path().join(format!("r{i}"));
        std::fs::create_dir_all(root.join("0")).unwrap();
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&[0u8; 32]);
        std::fs::write(root.join("0/a.npy"), &b).unwrap();
        fails(
            &[
                "pack",
                "--paper",
                s(&root),
                "--out",
                s(&d.path().join("x.pack")),
            ],
            &["a.npy"],
        );
    }
    // A v2 header claiming 4 GB.
    let root = d.path().join("v2");
    std::fs::create_dir_all(root.join("0")).unwrap();
    std::fs::write(root.join("0/a.npy"), b"\x93NUMPY\x02\x00\xff\xff\xff\xff{").unwrap();
    fails(
        &[
            "pack",
            "--paper",
            s(&root),
            "--out",
            s(&d.path().join("x.pack")),
        ],
        &["header"],
    );
    // Decoder input through the same reader.
    fails(
        &[
            "encode",
            "--raw-in",
            s(&root.join("0/a.npy")),
            "--tokens-out",
            s(&d.path().join("t.json")),
        ],
        &["a.npy"],
    );
}

#[test]
fn crash_class_zero_and_huge_values() {
    let d = tempfile::tempdir().unwrap();
    let o = d.path().join("o");
    let digits = [
        "sample",
        "--model",
        "digits",
        "--steps",
        "2",
        "--out",
        s(&o),
    ];
    fails(
        &[&digits[..], &["--per-class", "18446744073709551615"]].concat(),
        &["would need"],
    );
    fails(
        &[&digits[..], &["--per-class", "100000000000"]].concat(),
        &["would need"],
    );
    fails(
        &[&digits[..], &["--grid", "100000x100000"]].concat(),
        &["would need"],
    );
    for (k, v) in [
        ("ffn_dim_multiplier", "0"),
        ("multiple_of", "4611686018427387904"),
        ("dim", "1000000000"),
    ] {
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny_config(d.path(), "")).unwrap())
                .unwrap();
        c[k] = serde_json::from_str(v).unwrap();
        let p = d.path().join(format!("{k}.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        let e = fails(
            &[
                "sample",
                "--config",
                s(&p),
                "--init",
                "random",
                "--steps",
                "2",
                "--out",
                s(&o),
            ],
            &[],
        );
        assert!(
            e.contains(k) || e.contains("overflow") || e.contains("would need"),
            "{k}: {e}"
        );
        // With --weights the mismatches are reported, not an allocation.
        let w = fixture("a_arpg.safetensors");
        let e = fails(
            &[
                "sample",
                "--config",
                s(&p),
                "--weights",
                s(&w),
                "--steps",
                "2",
                "--out",
                s(&o),
            ],
            &[],
        );
        assert!(
            e.contains(k) || e.contains("overflow") || e.contains("does not match"),
            "{k}: {e}"
        );
    }
    // A config that validates but cannot be allocated: refused by size, or with --weights by
    // its mismatches, before anything is allocated.
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_config(d.path(), "")).unwrap()).unwrap();
    c["dim"] = serde_json::json!(1 << 20);
    let p = d.path().join("wide.json");
    std::fs::write(&p, c.to_string()).unwrap();
    fails(
        &[
            "sample",
            "--config",
            s(&p),
            "--init",
            "random",
            "--steps",
            "2",
            "--out",
            s(&o),
        ],
        &["would need"],
    );
    let w = fixture("a_arpg.safetensors");
    fails(
        &[
            "sample",
            "--config",
            s(&p),
            "--weights",
            s(&w),
            "--steps",
            "2",
            "--out",
            s(&o),
        ],
        &["does not match", "shape mismatches"],
    );
    fails(&["eval-digits", "--per-class", "0"], &["--per-class"]);
    fails(
        &["eval-digits", "--per-class", "100000000000"],
        &["would need"],
    );
    // An empty digits CSV.
    let empty = d.path().join("empty.csv.gz");
    let mut gz = flate2_writer(&empty);
    std::io::Write::write_all(&mut gz, b"").unwrap();
    drop(gz);
    fails(
        &[
            "pack",
            "--digits",
            s(&empty),
            "--out",
            s(&d.path().join("e.pack")),
        ],
        &["empty.csv.gz"],
    );
    fails(
        &["eval-digits", "--data", s(&empty), "--per-class", "1"],
        &["empty.csv.gz"],
    );
    fails(
        &[
            "encode",
            "--tokenizer",
            "pixel",
            "--image",
            s(&fixture("a.json")),
            "--image-size",
            "0",
            "--tokens-out",
            s(&d.path().join("t.json")),
        ],
        &["--image-size"],
    );
}

fn flate2_writer(p: &Path) -> impl std::io::Write {
    flate2::write::GzEncoder::new(
        std::fs::File::create(p).unwrap(),
        flate2::Compression::default(),
    )
}

#[test]
fn crash_class_unbounded_sizes_are_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    // A 1024 x 1024 token grid to decode (the VQ's attention alone is 4 TB).
    let grid = vec![vec![0u32; 1024 * 1024]];
    let t = d.path().join("big.json");
    std::fs::write(&t, serde_json::to_string(&grid).unwrap()).unwrap();
    let vcfg = d.path().join("vq.json");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap();
    std::fs::write(&vcfg, j["vq_config"].to_string()).unwrap();
    fails(
        &[
            "decode",
            "--tokens",
            s(&t),
            "--vq-config",
            s(&vcfg),
            "--vq-weights",
            s(&fixture("a_vq.safetensors")),
            "--out",
            s(&d.path().join("o")),
        ],
        &["would need", "1024x1024"],
    );
    // An .npz whose header claims 100000 x 100000 images.
    let p = d.path().join("huge.npz");
    let h = arpg::data::npy::to_bytes("|u1", &[10, 100000, 100000, 3], &[1, 2, 3]);
    write_stored_zip(&p, "arr_0.npy", &h);
    fails(
        &[
            "eval",
            "--samples",
            s(&p),
            "--ref",
            s(&p),
            "--inception",
            "random",
        ],
        &["huge.npz", "truncated"],
    );
}

#[test]
fn crash_class_unbounded_reads_of_devices_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let o = d.path().join("o");
    let cfg = tiny_config(d.path(), "");
    fails(
        &[
            "sample",
            "--config",
            "/dev/zero",
            "--init",
            "random",
            "--out",
            s(&o),
        ],
        &["/dev/zero", "not a regular file"],
    );
    fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--weights",
            "/dev/zero",
            "--out",
            s(&o),
        ],
        &["/dev/zero", "not a regular file"],
    );
    fails(
        &[
            "decode",
            "--tokens",
            "/dev/zero",
            "--tokenizer",
            "pixel",
            "--out",
            s(&o),
        ],
        &["/dev/zero", "not a regular file"],
    );
    fails(
        &[
            "sample",
            "--model",
            "digits",
            "--order",
            "/dev/zero",
            "--out",
            s(&o),
        ],
        &["/dev/zero", "not a regular file"],
    );
    let pack = digits_pack(d.path());
    fails(
        &[
            "train",
            "--data",
            s(&pack),
            "--resume",
            "/dev/zero",
            "--out",
            s(&o),
        ],
        &["/dev/zero", "not a regular file"],
    );
    fails(&["plot", "/dev/zero"], &["/dev/zero"]);
}

#[test]
fn late_and_weak_errors_come_early_and_name_the_culprit() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let under = file.join("t.json");
    let o = d.path().join("o");
    fails(
        &[
            "sample",
            "--model",
            "digits",
            "--steps",
            "2",
            "--tokens-out",
            s(&under),
            "--out",
            s(&o),
        ],
        &["--tokens-out"],
    );
    fails(
        &["eval-digits", "--json-out", s(&under), "--per-class", "1"],
        &["--json-out"],
    );
    // --tokenizer pixel in encode / decode: a round trip of a digit.
    let digit = image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([x as u8 * 32; 3]));
    let png = d.path().join("d.png");
    digit.save(&png).unwrap();
    let t = d.path().join("t.json");
    ok(&[
        "encode",
        "--tokenizer",
        "pixel",
        "--image",
        s(&png),
        "--image-size",
        "8",
        "--tokens-out",
        s(&t),
    ]);
    let toks: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&t).unwrap()).unwrap();
    assert_eq!(toks[0].len(), 64);
    ok(&[
        "decode",
        "--tokenizer",
        "pixel",
        "--tokens",
        s(&t),
        "--out",
        s(&o),
    ]);
    assert_eq!(image::open(o.join("000000.png")).unwrap().width(), 8);
    std::fs::write(&t, "[[17,0,0,0]]").unwrap();
    fails(
        &[
            "decode",
            "--tokenizer",
            "pixel",
            "--tokens",
            s(&t),
            "--out",
            s(&o),
        ],
        &["17"],
    );
    // A truncated JPEG is refused, not encoded as grey; so is one whose scan data is cut in
    // the middle and EOI appended (whole-looking).
    let jpg = d.path().join("cut.jpg");
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 9]))
        .save(&jpg)
        .unwrap();
    let bytes = std::fs::read(&jpg).unwrap();
    let sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    let mut cut_scan = bytes[..(sos + bytes.len()) / 2].to_vec();
    cut_scan.extend_from_slice(&[0xFF, 0xD9]);
    let cases: [(&str, &[u8], &[&str]); 2] = [
        (
            "cut.jpg",
            &bytes[..bytes.len() / 2],
            &["cut.jpg", "truncated"],
        ),
        (
            "cutscan.jpg",
            &cut_scan,
            &["cutscan.jpg", "corrupt JPEG", "MCUs"],
        ),
    ];
    for (name, body, needles) in cases {
        let jpg = d.path().join(name);
        std::fs::write(&jpg, body).unwrap();
        let encode = [
            "encode",
            "--tokenizer",
            "pixel",
            "--image",
            s(&jpg),
            "--image-size",
            "8",
            "--tokens-out",
            s(&t),
        ];
        fails(&encode, needles);
    }
    // Non-square raw input, which decode could not read back.
    let raw = d.path().join("raw.npy");
    arpg::tokenizer::image::write_npy_f32(&raw, &[1, 3, 16, 32], &vec![0.0; 3 * 16 * 32]).unwrap();
    fails(
        &["encode", "--raw-in", s(&raw), "--tokens-out", s(&t)],
        &["raw.npy", "square"],
    );
    // inpaint: the same --steps rule as sample.
    let mask = d.path().join("m.png");
    image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([if x < 4 { 255 } else { 0 }; 3]))
        .save(&mask)
        .unwrap();
    fails(
        &[
            "sample",
            "--model",
            "digits",
            "--steps",
            "65",
            "--out",
            s(&o),
        ],
        &["--steps 65"],
    );
    fails(
        &[
            "inpaint",
            "--model",
            "digits",
            "--image",
            s(&png),
            "--mask",
            s(&mask),
            "--class",
            "1",
            "--steps",
            "65",
            "--out",
            s(&o),
        ],
        &["--steps 65"],
    );
    // A .safetensors whose first byte is 0x80 is not a legacy pickle.
    let st = d.path().join("inc.safetensors");
    let mut meta = std::collections::HashMap::new();
    let mut pad = String::new();
    loop {
        meta.insert("pad".to_string(), pad.clone());
        let t = std::collections::HashMap::from([(
            "x".to_string(),
            candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        )]);
        let b = safetensors::tensor::serialize(
            t.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta.clone()),
        )
        .unwrap();
        if b[0] == 0x80 {
            std::fs::write(&st, &b).unwrap();
            break;
        }
        pad.push('x');
    }
    let imgs = vec![9u8; 4 * 4 * 4 * 3];
    let sm = eval_npz(
        d.path(),
        "s.npz",
        vec![arpg::eval::npz::Entry::u8s("arr_0", &[4, 4, 4, 3], &imgs)],
    );
    let e = fails(
        &[
            "eval",
            "--samples",
            s(&sm),
            "--ref",
            s(&sm),
            "--inception",
            s(&st),
        ],
        &["inc.safetensors"],
    );
    assert!(!e.contains("legacy") && !e.contains("pickle"), "{e}");
    fails(
        &[
            "eval",
            "--samples",
            s(&sm),
            "--ref",
            s(&sm),
            "--inception",
            "random",
            "--json",
            s(&under),
        ],
        &["--json"],
    );
    fails(
        &[
            "eval",
            "--samples",
            s(&sm),
            "--ref",
            s(&sm),
            "--inception",
            "random",
            "--is-splits",
            "0",
        ],
        &["--is-splits"],
    );
}

#[test]
fn a_pickle_that_panics_candles_reader_is_an_error_without_a_panic_message() {
    // `archive/data.pkl` holding a LONG1 of 9 bytes: candle's unpickler shifts past 64 bits
    // (a panic in a build with overflow checks), which the loader turns into an error.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.pt");
    let pickle = [0x80, 0x02, 0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, b'.'];
    write_stored_zip(&p, "archive/data.pkl", &pickle);
    let cfg = tiny_config(d.path(), "");
    let err = fails(
        &[
            "sample",
            "--config",
            &cfg,
            "--weights",
            s(&p),
            "--out",
            s(&d.path().join("o")),
        ],
        &["bad.pt"],
    );
    assert!(!err.contains("thread '"), "{err}");
}
