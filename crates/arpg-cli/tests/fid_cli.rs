//! `arpg sample-fid` and `arpg eval` from the command line: sharding over processes (on the
//! CPU), resuming, the archive, and the errors for bad inputs.

use arpg::eval::npz;
use std::path::Path;
use std::process::Command;

fn arpg(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_arpg"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_ne!(o.status.code(), Some(101), "arpg {args:?} panicked:\n{err}");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        err,
    )
}

fn sample_fid(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "sample-fid",
        "--model",
        "digits",
        "--num-samples",
        "30",
        "--per-class",
        "3",
        "--shard-size",
        "8",
        "--batch-size",
        "8",
        "--steps",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = arpg(&args);
    (ok, err)
}

fn images(p: &Path) -> (usize, usize, usize, Vec<u8>) {
    let mut r = npz::ImageReader::open(p, "arr_0").unwrap();
    let (n, h, w) = (r.n, r.height, r.width);
    let (_, bytes) = r.next_batch(n).unwrap().unwrap();
    (n, h, w, bytes)
}

#[test]
fn overlapped_and_sequential_pipelines_write_the_same_archive_and_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let (over, seq) = (dir.path().join("over"), dir.path().join("seq"));
    let (ok, err) = sample_fid(&over, &[]);
    assert!(ok, "{err}");
    let (ok, err) = sample_fid(&seq, &["--no-overlap"]);
    assert!(ok, "{err}");
    assert_eq!(
        images(&over.join("samples.npz")),
        images(&seq.join("samples.npz"))
    );
    for i in [0usize, 7, 8, 29] {
        let name = format!("images/{i:06}_class{}.png", (i / 3) % 10);
        assert_eq!(
            std::fs::read(over.join(&name)).unwrap(),
            std::fs::read(seq.join(&name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn sample_fid_is_the_same_on_one_or_two_processes_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let (ok, err) = sample_fid(&one, &[]);
    assert!(ok, "{err}");
    assert!(err.contains("images/s"), "throughput is reported: {err}");
    let (n, h, w, a) = images(&one.join("samples.npz"));
    assert_eq!((n, h, w), (30, 8, 8));
    assert_eq!(std::fs::read_dir(one.join("images")).unwrap().count(), 30);
    // Class order: 3 per class, 10 classes.
    assert!(one.join("images/000029_class9.png").exists());

    // Two CPU processes (as --gpus 2 does with GPUs): the same images, shard for shard.
    let (ok, err) = sample_fid(&two, &["--gpus", "2", "--no-png"]);
    assert!(ok, "{err}");
    assert!(err.contains("rank 1:"), "{err}");
    assert!(!two.join("images").exists());
    assert_eq!(images(&two.join("samples.npz")).3, a);

    // A lost shard is redone, the finished ones are kept.
    std::fs::remove_file(two.join("shards/shard_00001.npy")).unwrap();
    let kept = std::fs::metadata(two.join("shards/shard_00000.npy"))
        .unwrap()
        .modified()
        .unwrap();
    let (ok, err) = sample_fid(&two, &["--no-png"]);
    assert!(ok, "{err}");
    assert!(err.contains("3 of 4 shards already done"), "{err}");
    assert!(err.contains("8 images in"), "only the missing shard: {err}");
    let now = std::fs::metadata(two.join("shards/shard_00000.npy"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(kept, now);
    assert_eq!(images(&two.join("samples.npz")).3, a);

    // Other settings into the same folder are refused.
    let (ok, err) = sample_fid(&two, &["--seed", "1"]);
    assert!(!ok && err.contains("other settings"), "{err}");
}

#[test]
fn eval_scores_and_notes_resizing() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.npz");
    let r = dir.path().join("r.npz");
    let px = |n: usize, side: usize, k: usize| -> Vec<u8> {
        (0..n * side * side * 3)
            .map(|i| ((i * k + i / 7) % 256) as u8)
            .collect()
    };
    let (sv, rv) = (px(4, 8, 3), px(5, 12, 5));
    npz::write(&s, vec![npz::Entry::u8s("arr_0", &[4, 8, 8, 3], &sv)]).unwrap();
    npz::write(&r, vec![npz::Entry::u8s("arr_0", &[5, 12, 12, 3], &rv)]).unwrap();
    let json = dir.path().join("scores.json");
    let (ok, out, err) = arpg(&[
        "eval",
        "--samples",
        s.to_str().unwrap(),
        "--ref",
        r.to_str().unwrap(),
        "--inception",
        "random",
        "--batch-size",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("resized to 299x299"), "{err}");
    for k in ["Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"] {
        assert!(out.contains(k), "{out}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(j["fid"].as_f64().unwrap() > 0.0);
    assert_eq!(j["num_samples"], 4);
    let p = j["precision"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
}

#[test]
fn eval_rejects_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let imgs = vec![7u8; 3 * 4 * 4 * 3];
    let floats = vec![0.5f32; 3 * 4 * 4 * 3];
    let four = vec![7u8; 4 * 4 * 4 * 3];
    npz::write(
        &path("ok.npz"),
        vec![npz::Entry::u8s("arr_0", &[4, 4, 4, 3], &four)],
    )
    .unwrap();
    npz::write(
        &path("float.npz"),
        vec![npz::Entry::f32s("arr_0", &[3, 4, 4, 3], &floats)],
    )
    .unwrap();
    npz::write(
        &path("chw.npz"),
        vec![npz::Entry::u8s("arr_0", &[3, 3, 4, 4], &imgs)],
    )
    .unwrap();
    npz::write(
        &path("one.npz"),
        vec![npz::Entry::u8s("arr_0", &[1, 4, 4, 3], &imgs[..48])],
    )
    .unwrap();
    let mu = vec![0f64; 2048];
    npz::write(
        &path("mu_only.npz"),
        vec![npz::Entry::f64s("mu", &[2048], &mu)],
    )
    .unwrap();
    let small = vec![0f64; 4];
    npz::write(
        &path("bad_sigma.npz"),
        vec![
            npz::Entry::u8s("arr_0", &[3, 4, 4, 3], &imgs),
            npz::Entry::f64s("mu", &[2048], &mu),
            npz::Entry::f64s("sigma", &[2, 2], &small),
        ],
    )
    .unwrap();
    std::fs::write(path("junk.pth"), b"junk").unwrap();
    let eval = |samples: &str, reference: &str, inception: &str| {
        let (ok, _, err) = arpg(&[
            "eval",
            "--samples",
            path(samples).to_str().unwrap(),
            "--ref",
            path(reference).to_str().unwrap(),
            "--inception",
            inception,
        ]);
        assert!(!ok, "{samples} / {reference} should fail");
        err
    };
    let cases = [
        (
            eval("float.npz", "ok.npz", "random"),
            "expected uint8 images",
        ),
        (eval("chw.npz", "ok.npz", "random"), "N x H x W x 3"),
        (eval("one.npz", "ok.npz", "random"), "needs at least 4"),
        (eval("ok.npz", "mu_only.npz", "random"), "not the other"),
        (
            eval("ok.npz", "bad_sigma.npz", "random"),
            "expected (2048, 2048)",
        ),
        (eval("ok.npz", "missing.npz", "random"), "missing.npz"),
        (
            eval("ok.npz", "ok.npz", path("junk.pth").to_str().unwrap()),
            "junk.pth",
        ),
    ];
    for (err, want) in cases {
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
}
