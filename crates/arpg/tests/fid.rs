//! The ImageNet evaluation against its Python references (fixtures in tests/fixtures/fid/,
//! made by scripts/fid_stats_fixture.py and scripts/fid_inception_fixture.py).

use arpg::eval::inception::{self, InceptionV3, Preprocess};
use arpg::eval::npz;
use arpg::eval::stats::{self, Gaussian, IsSplits};
use candle_core::Device;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/fid")
        .join(name)
}

fn floats(path: &Path, name: &str) -> Vec<f64> {
    npz::read_array(path, name)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .floats()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn floats64(path: &Path, name: &str) -> Vec<f64> {
    match npz::read_array(path, name).unwrap().data {
        arpg::data::npy::NpyData::Float(v) => v,
        _ => panic!("{name} is not float"),
    }
}

fn f32s(path: &Path, name: &str) -> Vec<f32> {
    npz::read_array(path, name).unwrap().floats()
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(&x, y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    eprintln!(
        "{what}: {a} vs {b}, relative difference {:e}",
        (a - b).abs() / b.abs().max(1.0)
    );
    assert!(
        (a - b).abs() <= tol * b.abs().max(1.0),
        "{what}: {a} vs {b} (tolerance {tol})"
    );
}

#[test]
fn gaussian_fit_and_frechet_distance_match_numpy_scipy() {
    let p = fixture("stats.npz");
    let a = Gaussian::fit(&f32s(&p, "feat_a"), 32, &Device::Cpu).unwrap();
    let b = Gaussian::fit(&f32s(&p, "feat_b"), 32, &Device::Cpu).unwrap();
    for (x, y) in a.mu.iter().zip(floats64(&p, "mu_a")) {
        close(*x, y, 1e-12, "mu");
    }
    for (x, y) in a.sigma.iter().zip(floats64(&p, "sigma_a")) {
        close(*x, y, 1e-12, "sigma");
    }
    let fid = stats::frechet_distance(&a, &b).unwrap();
    close(fid, floats64(&p, "fid")[0], 1e-9, "FID");
    // Given statistics are used as they are (a reference batch's mu / sigma).
    let given = Gaussian::new(floats64(&p, "mu_b"), floats64(&p, "sigma_b")).unwrap();
    close(
        stats::frechet_distance(&a, &given).unwrap(),
        fid,
        1e-9,
        "FID from given stats",
    );
    // 20 vectors in 32 dimensions: a singular covariance, where sqrtm is least stable.
    let c = Gaussian::fit(&f32s(&p, "feat_c"), 32, &Device::Cpu).unwrap();
    close(
        stats::frechet_distance(&c, &a).unwrap(),
        floats64(&p, "fid_low_rank")[0],
        1e-6,
        "FID, rank-deficient",
    );
    // The same through the full d x d route (given statistics carry no low-rank factor).
    let c_given = Gaussian::new(c.mu.clone(), c.sigma.clone()).unwrap();
    close(
        stats::frechet_distance(&c_given, &a).unwrap(),
        floats64(&p, "fid_low_rank")[0],
        1e-6,
        "FID, rank-deficient, full route",
    );
    // Same statistics: zero distance.
    assert!(stats::frechet_distance(&a, &a).unwrap().abs() < 1e-9);
}

#[test]
fn statistics_reject_bad_inputs() {
    let e = Gaussian::fit(&[1.0; 32], 32, &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("at least 2"), "{e:#}");
    let a = Gaussian::new(vec![0.0; 2], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
    let b = Gaussian::new(vec![0.0; 3], vec![0.0; 9]).unwrap();
    assert!(stats::frechet_distance(&a, &b).is_err());
    assert!(Gaussian::new(vec![0.0; 2], vec![0.0; 3]).is_err());
    let e = stats::inception_score(&[0.0; 10], 2, IsSplits::Count(10)).unwrap_err();
    assert!(format!("{e:#}").contains("need at least 10"), "{e:#}");
    let few = vec![0f32; 3 * 4];
    let e = stats::precision_recall(&few, &few, 4, 3, &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("at least 4"), "{e:#}");
}

#[test]
fn symmetric_eigen_decomposes() {
    // A symmetric matrix with known eigenvalues 1, 2, 4 (Q diag Q^T for a rotation Q).
    let (c, s) = (0.6f64, 0.8f64);
    let q = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0];
    let l = [1.0, 2.0, 4.0];
    let mut a = [0.0; 9];
    for i in 0..3 {
        for j in 0..3 {
            a[i * 3 + j] = (0..3).map(|k| q[i * 3 + k] * l[k] * q[j * 3 + k]).sum();
        }
    }
    let (mut ev, vt) = stats::symmetric_eigen(&a, 3, true).unwrap();
    // Each row of vt is a unit eigenvector: A v = lambda v.
    for r in 0..3 {
        let v = &vt[r * 3..r * 3 + 3];
        for i in 0..3 {
            let av: f64 = (0..3).map(|k| a[i * 3 + k] * v[k]).sum();
            assert!((av - ev[r] * v[i]).abs() < 1e-12);
        }
    }
    ev.sort_by(f64::total_cmp);
    for (x, y) in ev.iter().zip(l) {
        assert!((x - y).abs() < 1e-12, "{ev:?}");
    }
}

#[test]
fn inception_score_matches_numpy() {
    let p = fixture("stats.npz");
    let logits = f32s(&p, "logits");
    let (m, s) = stats::inception_score(&logits, 100, IsSplits::Size(50)).unwrap();
    let want = floats64(&p, "is_size50");
    close(m, want[0], 1e-10, "IS (split size 50)");
    close(s, want[1], 1e-9, "IS std (split size 50)");
    let (m, s) = stats::inception_score(&logits, 100, IsSplits::Count(10)).unwrap();
    let want = floats64(&p, "is_count10");
    close(m, want[0], 1e-10, "IS (10 splits)");
    close(s, want[1], 1e-9, "IS std (10 splits)");
}

#[test]
fn precision_recall_match_adm() {
    let p = fixture("stats.npz");
    let (a, b) = (f32s(&p, "feat_a"), f32s(&p, "feat_b"));
    let xa = candle_core::Tensor::from_slice(&a, (300, 32), &Device::Cpu).unwrap();
    let radii = stats::manifold_radii(&xa, 3).unwrap();
    assert!(rel_err(&radii, &floats(&p, "radii_a")) < 1e-5);
    let (prec, rec) = stats::precision_recall(&a, &b, 32, 3, &Device::Cpu).unwrap();
    assert_eq!(prec, floats64(&p, "precision")[0]);
    assert_eq!(rec, floats64(&p, "recall")[0]);
}

#[test]
fn inception_features_match_pytorch_fid() {
    let p = fixture("inception.npz");
    let mut r = npz::ImageReader::open(&p, "arr_0").unwrap();
    assert_eq!((r.n, r.height, r.width), (3, 64, 64));
    let (n, imgs) = r.next_batch(8).unwrap().unwrap();
    assert!(r.next_batch(8).unwrap().is_none());
    let net = InceptionV3::synthetic(&Device::Cpu).unwrap();
    for (pre, tag) in [(Preprocess::PytorchFid, "fid"), (Preprocess::Adm, "adm")] {
        let f = net.forward_images(&imgs, n, 64, 64, pre).unwrap();
        let pool: Vec<f32> = f.pool.flatten_all().unwrap().to_vec1().unwrap();
        let spatial: Vec<f32> = f.spatial.flatten_all().unwrap().to_vec1().unwrap();
        let logits: Vec<f32> = f.logits.flatten_all().unwrap().to_vec1().unwrap();
        let errs = [
            rel_err(&pool, &floats(&p, &format!("pool_{tag}"))),
            rel_err(&spatial, &floats(&p, &format!("spatial_{tag}"))),
            rel_err(&logits, &floats(&p, &format!("logits_{tag}"))),
        ];
        eprintln!("{tag}: max relative error pool / spatial / logits = {errs:?}");
        assert!(errs.iter().all(|&e| e < 1e-4), "{tag}: {errs:?}");
    }
}

#[test]
fn resize_matrices_interpolate() {
    // Rows sum to one; the identity size is the identity; TF's legacy mapping samples the
    // first source pixel at output 0, PyTorch's half-pixel mapping clamps there too.
    for half in [false, true] {
        let m = inception::resize_matrix(256, 299, half);
        for row in m.chunks(256) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        let id = inception::resize_matrix(5, 5, half);
        for i in 0..5 {
            assert_eq!(id[i * 5 + i], 1.0);
        }
    }
    // 2 -> 4, TF legacy: src = 0, 0.5, 1, 1.5 (clamped at the edge).
    let m = inception::resize_matrix(2, 4, false);
    assert_eq!(m, vec![1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0]);
    // 2 -> 4, half-pixel: src = max(-0.25, 0), 0.25, 0.75, 1.25 -> clamped.
    let m = inception::resize_matrix(2, 4, true);
    assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
}

#[test]
fn weights_load_from_legacy_and_zip_pth_strictly() {
    for f in ["legacy.pth", "zip.pth"] {
        let sd = inception::load_state_dict(&fixture(f)).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        let mut keys: Vec<_> = sd.tensors.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, vec!["a", "b"], "{f}: num_batches_tracked is dropped");
        let a: Vec<Vec<f32>> = sd.tensors["a"].to_vec2().unwrap();
        assert_eq!(a, vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
        let b: Vec<f32> = sd.tensors["b"].to_vec1().unwrap();
        assert_eq!(b, vec![1.5, -2.0]);
        // Not the Inception network: one error naming the file and the missing keys.
        let e = format!(
            "{:#}",
            InceptionV3::load(&fixture(f), &Device::Cpu).err().unwrap()
        );
        assert!(
            e.contains(f) && e.contains("missing keys") && e.contains("Conv2d_1a_3x3.conv.weight"),
            "{e}"
        );
        assert!(e.contains("unexpected"), "{e}");
    }
    let e = format!(
        "{:#}",
        inception::load_state_dict(&fixture("stats.npz"))
            .err()
            .unwrap()
    );
    assert!(e.contains("stats.npz"), "{e}");
}

#[test]
fn weights_load_from_safetensors_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = InceptionV3::synthetic_state_dict().unwrap();
    // 94 convolutions with BatchNorm (5 tensors each) and the classifier (2).
    assert_eq!(sd.len(), 94 * 5 + 2);
    let net = InceptionV3::synthetic(&Device::Cpu).unwrap();
    let imgs = vec![100u8; 2 * 20 * 20 * 3];
    let want: Vec<f32> = net
        .forward_images(&imgs, 2, 20, 20, Preprocess::Adm)
        .unwrap()
        .pool
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let counter = candle_core::Tensor::new(&[5i64], &Device::Cpu).unwrap();
    sd.insert("Mixed_5b.branch1x1.bn.num_batches_tracked".into(), counter);
    let p = dir.path().join("inception.safetensors");
    arpg::checkpoint::save_safetensors_atomic(&sd, &p).unwrap();
    let loaded = InceptionV3::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let got: Vec<f32> = loaded
        .forward_images(&imgs, 2, 20, 20, Preprocess::Adm)
        .unwrap()
        .pool
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);
    // A renamed tensor: the file, the missing key and the unexpected one, in one error.
    let t = sd.remove("Mixed_7c.branch_pool.conv.weight").unwrap();
    sd.insert("Mixed_7c.branch_pool.conv.weights".into(), t);
    let bad = dir.path().join("bad.safetensors");
    arpg::checkpoint::save_safetensors_atomic(&sd, &bad).unwrap();
    let e = format!("{:#}", InceptionV3::load(&bad, &Device::Cpu).err().unwrap());
    for want in [
        "bad.safetensors",
        "missing keys (1): Mixed_7c.branch_pool.conv.weight",
        "Mixed_7c.branch_pool.conv.weights",
    ] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
}

#[test]
fn npz_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.npz");
    let imgs: Vec<u8> = (0..2 * 4 * 5 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let mu = [1.0f64, 2.0];
    let sigma = [1.0f32, 0.5, 0.5, 2.0];
    npz::write(
        &p,
        vec![
            npz::Entry::u8s("arr_0", &[2, 4, 5, 3], &imgs),
            npz::Entry::f64s("mu", &[2], &mu),
            npz::Entry::f32s("sigma", &[2, 2], &sigma),
        ],
    )
    .unwrap();
    let mut names = npz::names(&p).unwrap();
    names.sort();
    assert_eq!(names, vec!["arr_0", "mu", "sigma"]);
    let mut r = npz::ImageReader::open(&p, "arr_0").unwrap();
    let (k1, b1) = r.next_batch(1).unwrap().unwrap();
    let (k2, b2) = r.next_batch(5).unwrap().unwrap();
    assert_eq!((k1, k2), (1, 1));
    assert_eq!([b1, b2].concat(), imgs);
    let (shape, s) = npz::read_floats(&p, "sigma", &[Some(2), Some(2)]).unwrap();
    assert_eq!(shape, vec![2, 2]);
    assert_eq!(s, vec![1.0, 0.5, 0.5, 2.0]);
    let err = |e: anyhow::Error| format!("{e:#}");
    // Wrong shape, wrong dtype, missing array, images with the wrong layout.
    assert!(
        err(npz::read_floats(&p, "sigma", &[Some(3), Some(3)]).unwrap_err())
            .contains("expected (3, 3)")
    );
    assert!(
        err(npz::read_floats(&p, "arr_0", &[None, None, None, None]).unwrap_err())
            .contains("expected float32 or float64")
    );
    assert!(err(npz::read_array(&p, "mu_s").unwrap_err()).contains("no array `mu_s` (it has: "));
    assert!(err(npz::ImageReader::open(&p, "mu").err().unwrap()).contains("expected uint8 images"));
    npz::write(&p, vec![npz::Entry::u8s("arr_0", &[2, 60], &imgs[..120])]).unwrap();
    assert!(err(npz::ImageReader::open(&p, "arr_0").err().unwrap()).contains("N x H x W x 3"));
    // A lie about the size is caught when writing.
    assert!(npz::write(&p, vec![npz::Entry::u8s("arr_0", &[3, 60], &imgs[..120])]).is_err());
    // Not a zip at all.
    std::fs::write(&p, b"not a zip").unwrap();
    assert!(err(npz::names(&p).unwrap_err()).contains("not an .npz"));
}

/// Real weights (not in the repository): `python3 scripts/fid_real_weights.py ...` writes them
/// and the PyTorch features of the two photos under .ref/; then
/// `cargo test -p arpg --test fid real_weights -- --ignored --nocapture`.
#[test]
#[ignore]
fn real_weights_match_pytorch_on_photos() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ref");
    let weights = std::env::var_os("ARPG_FID_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or(root.join("pt_inception_fidhelper.pth"));
    let feats = root.join("photos_features.npz");
    let net = InceptionV3::load(&weights, &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let mut r = npz::ImageReader::open(&feats, "arr_0").unwrap();
    let (h, w) = (r.height, r.width);
    let (n, imgs) = r.next_batch(16).unwrap().unwrap();
    for (pre, tag) in [(Preprocess::Adm, "adm"), (Preprocess::PytorchFid, "fid")] {
        let f = net.forward_images(&imgs, n, h, w, pre).unwrap();
        let pool: Vec<f32> = f.pool.flatten_all().unwrap().to_vec1().unwrap();
        let spatial: Vec<f32> = f.spatial.flatten_all().unwrap().to_vec1().unwrap();
        let errs = [
            rel_err(&pool, &floats(&feats, &format!("pool_{tag}"))),
            rel_err(&spatial, &floats(&feats, &format!("spatial_{tag}"))),
        ];
        eprintln!("{tag}: {n} photos {h}x{w}, max relative error pool_3 / spatial = {errs:?}");
        assert!(errs.iter().all(|&e| e < 1e-4), "{tag}: {errs:?}");
    }
}
