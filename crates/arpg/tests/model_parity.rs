//! The ARPG model against the reference PyTorch outputs (tests/fixtures/parity-a).

mod common;
use arpg::checkpoint::{build_strict, StateDict, Weights};
use arpg::eval::parity::teacher_forced_logits;
use arpg::model::{Arpg, Mode};
use arpg::ArpgConfig;
use candle_core::{DType, Device, Tensor};
use common::*;

fn config() -> ArpgConfig {
    serde_json::from_value(fixture_json()["arpg_config"].clone()).unwrap()
}

fn load(file: &str) -> Arpg {
    let sd = StateDict::load(&fixture(file), Weights::Model).unwrap();
    build_strict(&sd, DType::F32, &Device::Cpu, |vb| Arpg::new(&config(), vb)).unwrap()
}

#[test]
fn greedy_decodes_and_logits_match_the_reference_through_the_parity_report() {
    let r = arpg::eval::parity::check(&fixture(""), DType::F32, &Device::Cpu).unwrap();
    assert!(r.teacher_logits_rel_err < 1e-4, "{r:?}");
    assert!(
        (r.loss - r.reference_loss).abs() < 1e-4 * r.reference_loss,
        "{r:?}"
    );
    assert_eq!(r.greedy_equal, vec![true, true]);
    assert_eq!(r.greedy_equal_replayed, vec![true, true]);
    assert!(r.teacher_logits_rel_l2 < 1e-4, "{r:?}");
    assert!(r.vq_decode_rel_err < 1e-4 && r.vq_encode_equal, "{r:?}");
}

#[test]
fn teacher_forced_logits_and_loss_match_the_reference() {
    let model = load("a_arpg.safetensors");
    let j = &fixture_json()["teacher_forcing"];
    for differentiable in [true, false] {
        let mut mode = Mode {
            differentiable,
            dropout: None,
        };
        let (logits, targets) = teacher_forced_logits(&model, j, &mut mode).unwrap();
        let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rel = assert_close(&got, &flat_f32(&j["logits"]), 1e-4, "teacher-forced logits");
        eprintln!("teacher-forced logits (differentiable={differentiable}): max rel err {rel:e}");
        let t = Tensor::from_vec(targets.clone(), targets.len(), &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &t).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap();
        let want = j["loss"].as_f64().unwrap() as f32;
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs(),
            "loss {loss} vs {want}"
        );
    }
}

#[test]
fn pt_and_safetensors_load_the_same_weights() {
    let a = StateDict::load(&fixture("a_arpg.pt"), Weights::Model).unwrap();
    let b = StateDict::load(&fixture("a_arpg.safetensors"), Weights::Model).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        let u = &b.tensors[k];
        let diff = (t - u)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{k}");
    }
    // And the model built from the .pt decodes like the reference too.
    let _ = load("a_arpg.pt");
}

#[test]
fn strict_loading_lists_missing_unexpected_and_mismatched_keys() {
    let mut sd = StateDict::load(&fixture("a_arpg.safetensors"), Weights::Model).unwrap();
    sd.tensors.remove("head.weight");
    sd.tensors.insert(
        "bogus.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    sd.tensors.insert(
        "norm.weight".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    sd.tensors.insert(
        "freqs_cis".into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = build_strict(&sd, DType::F32, &Device::Cpu, |vb| Arpg::new(&config(), vb))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing keys (1): head.weight"), "{err}");
    assert!(err.contains("unexpected keys (1): bogus.weight"), "{err}");
    assert!(
        err.contains("norm.weight: checkpoint [7], model [64]"),
        "{err}"
    );
    assert!(!err.contains("freqs_cis"), "{err}");
}

#[test]
fn ema_request_without_ema_weights_is_an_error() {
    let err = format!(
        "{:#}",
        StateDict::load(&fixture("a_arpg.pt"), Weights::Ema).unwrap_err()
    );
    assert!(err.contains("a_arpg.pt") && err.contains("ema"), "{err}");
}

#[test]
fn corrupt_and_missing_checkpoints_are_reported_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.pt");
    let bytes = std::fs::read(fixture("a_arpg.pt")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", StateDict::load(&p, Weights::Model).unwrap_err());
    assert!(err.contains("broken.pt"), "{err}");
    let q = dir.path().join("garbage.safetensors");
    std::fs::write(&q, b"not a checkpoint at all").unwrap();
    let err = format!("{:#}", StateDict::load(&q, Weights::Model).unwrap_err());
    assert!(err.contains("garbage.safetensors"), "{err}");
    let err = format!(
        "{:#}",
        StateDict::load(&dir.path().join("none.pt"), Weights::Model).unwrap_err()
    );
    assert!(err.contains("none.pt"), "{err}");
}

#[test]
fn half_precision_checkpoints_load_into_an_f32_model() {
    let sd = StateDict::load(&fixture("a_arpg.safetensors"), Weights::Model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for dt in [DType::BF16, DType::F16] {
        let p = dir.path().join(format!("{dt:?}.safetensors"));
        arpg::checkpoint::save_safetensors_atomic(
            &arpg::checkpoint::cast_all(&sd.tensors, dt).unwrap(),
            &p,
        )
        .unwrap();
        let half = StateDict::load(&p, Weights::Model).unwrap();
        assert!(half.tensors.values().all(|t| t.dtype() == dt));
        let model = build_strict(&half, DType::F32, &Device::Cpu, |vb| {
            Arpg::new(&config(), vb)
        })
        .unwrap();
        let j = &fixture_json()["teacher_forcing"];
        let (logits, _) = teacher_forced_logits(&model, j, &mut Mode::inference()).unwrap();
        let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = flat_f32(&j["logits"]);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err < 3e-2, "{dt:?} weights: relative error {err}");
    }
}

#[test]
fn cfg_one_and_zero_run_one_half_and_match_the_guided_formula() {
    use arpg::sampler::{decode, CfgSchedule, Request, SampleConfig, TokenFilter};
    let model = load("a_arpg.safetensors");
    let classes = [2usize, 7];
    let order: Vec<usize> = (0..64).rev().collect();
    let orders = vec![order.clone(), order];
    let known = vec![vec![], vec![]];
    let run = |cfg: f32| {
        let sc = SampleConfig {
            steps: 8,
            cfg,
            cfg_schedule: CfgSchedule::Constant,
            filter: TokenFilter {
                temperature: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        decode(
            &model,
            &Request {
                classes: &classes,
                known: &known,
                orders: &orders,
                condition: None,
            },
            &sc,
            &mut rng,
        )
        .unwrap()
    };
    // cfg 1: the conditional half alone; cfg 0: the null class alone (the reference raises).
    assert_eq!(run(1.0), run(1.0 + 1e-6));
    assert_eq!(run(0.0), run(1e-6));
    assert_ne!(run(0.0), run(1.0));
}
