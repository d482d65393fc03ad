//! VQ tokenizer parity against the reference PyTorch outputs in tests/fixtures/parity-a/.

use arpg::config::VqConfig;
use arpg::tokenizer::vq::VqModel;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/parity-a/"
);

fn fixture() -> Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}a.json")).expect("read a.json");
    serde_json::from_str(&text).expect("parse a.json")
}

fn model(fx: &Value) -> VqModel {
    let cfg: VqConfig = serde_json::from_value(fx["vq_config"].clone()).expect("vq_config");
    let path = format!("{FIXTURES}a_vq.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }
        .expect("load weights");
    VqModel::new(&cfg, vb).expect("build VqModel")
}

/// Flattens a nested JSON array of numbers, returning (shape, values).
fn flatten(v: &Value) -> (Vec<usize>, Vec<f64>) {
    match v {
        Value::Array(items) => {
            let parts: Vec<_> = items.iter().map(flatten).collect();
            let inner = parts.first().map(|p| p.0.clone()).unwrap_or_default();
            let mut shape = vec![items.len()];
            shape.extend(inner);
            (shape, parts.into_iter().flat_map(|p| p.1).collect())
        }
        Value::Number(n) => (vec![], vec![n.as_f64().expect("number")]),
        other => panic!("unexpected JSON value {other}"),
    }
}

fn tensor_f32(v: &Value) -> Tensor {
    let (shape, vals) = flatten(v);
    Tensor::from_vec(
        vals.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn decode_matches_reference() {
    let fx = fixture();
    let vq = model(&fx);
    let case = &fx["vq_decode"];
    let (shape, codes) = flatten(&case["codes"]);
    let codes = Tensor::from_vec(
        codes.into_iter().map(|x| x as u32).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap();
    let grid = (
        case["grid"][0].as_u64().unwrap() as usize,
        case["grid"][1].as_u64().unwrap() as usize,
    );
    let (want_shape, want) = flatten(&case["image"]);

    let got = vq.decode(&codes, grid).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    assert_eq!(got.dims(), want_shape.as_slice());
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut max_abs, mut max_ref) = (0f64, 0f64);
    for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
        let d = (a as f64 - b).abs();
        assert!(
            d <= 1e-4 * (1.0 + b.abs()),
            "element {i}: got {a}, want {b}"
        );
        max_abs = max_abs.max(d);
        max_ref = max_ref.max(b.abs());
    }
    let rel = max_abs / max_ref;
    eprintln!("vq decode: max |a-b| = {max_abs:.3e}, relative {rel:.3e}");
    assert!(rel <= 1e-4, "relative error {rel}");

    // i64 codes decode identically.
    let codes64 = codes.to_dtype(DType::I64).unwrap();
    let got64 = vq
        .decode(&codes64, grid)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got64, got);
}

#[test]
fn encode_matches_reference() {
    let fx = fixture();
    let vq = model(&fx);
    let case = &fx["vq_encode"];
    let images = tensor_f32(&case["image"]);
    let (want_shape, want) = flatten(&case["indices"]);
    let got = vq.encode(&images).unwrap();
    assert_eq!(got.dtype(), DType::U32);
    assert_eq!(got.dims(), want_shape.as_slice());
    let got = got.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let want: Vec<u32> = want.into_iter().map(|x| x as u32).collect();
    assert_eq!(got, want);

    // Also from f64 input (any float dtype is accepted).
    let got64 = vq
        .encode(&images.to_dtype(DType::F64).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(got64.to_vec1::<u32>().unwrap(), want);
}

#[test]
fn encode_decode_round_trip_is_consistent() {
    // Re-encoding a decoded image need not give the same codes with random weights, but it
    // must run end to end on the decoder's output shape.
    let fx = fixture();
    let vq = model(&fx);
    let images = tensor_f32(&fx["vq_encode"]["image"]);
    let codes = vq.encode(&images).unwrap();
    let out = vq.decode(&codes, (4, 4)).unwrap();
    assert_eq!(out.dims(), images.dims());
    assert_eq!(vq.encode(&out).unwrap().dims(), codes.dims());
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let fx = fixture();
    let vq = model(&fx);
    let dev = Device::Cpu;

    let mut ids = vec![0u32; 16];
    ids[5] = 64;
    let e = format!(
        "{:#}",
        vq.decode(&Tensor::from_vec(ids, (1, 16), &dev).unwrap(), (4, 4))
            .unwrap_err()
    );
    assert!(e.contains("64") && e.contains("codebook"), "{e}");
    let mut ids = vec![0i64; 16];
    ids[0] = -1;
    let e = format!(
        "{:#}",
        vq.decode(&Tensor::from_vec(ids, (1, 16), &dev).unwrap(), (4, 4))
            .unwrap_err()
    );
    assert!(e.contains("-1"), "{e}");
    let e = format!(
        "{:#}",
        vq.decode(&Tensor::zeros((1, 16), DType::U32, &dev).unwrap(), (3, 4))
            .unwrap_err()
    );
    assert!(e.contains("3x4"), "{e}");
    assert!(vq
        .decode(&Tensor::zeros((1, 16), DType::F32, &dev).unwrap(), (4, 4))
        .is_err());

    let e = format!(
        "{:#}",
        vq.encode(&Tensor::zeros((1, 3, 8, 7), DType::F32, &dev).unwrap())
            .unwrap_err()
    );
    assert!(e.contains("8x7") && e.contains("patch size 2"), "{e}");
    assert!(vq
        .encode(&Tensor::zeros((1, 1, 8, 8), DType::F32, &dev).unwrap())
        .is_err());
    assert!(vq
        .encode(&Tensor::zeros((3, 8, 8), DType::F32, &dev).unwrap())
        .is_err());
    let nan = Tensor::full(f32::NAN, (1, 3, 8, 8), &dev).unwrap();
    let e = format!("{:#}", vq.encode(&nan).unwrap_err());
    assert!(e.contains("NaN"), "{e}");

    // Weights that do not match the config are a load error.
    let mut cfg: VqConfig = serde_json::from_value(fx["vq_config"].clone()).unwrap();
    cfg.ch = 64;
    let path = format!("{FIXTURES}a_vq.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &dev) }.unwrap();
    assert!(VqModel::new(&cfg, vb).is_err());
}

#[test]
fn half_precision_runs_close_to_f32() {
    let fx = fixture();
    let f32_model = model(&fx);
    let cfg = f32_model.config().clone();
    let (shape, codes) = flatten(&fx["vq_decode"]["codes"]);
    let codes = Tensor::from_vec(
        codes.into_iter().map(|x| x as u32).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap();
    let want = f32_model.decode(&codes, (4, 4)).unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let images = tensor_f32(&fx["vq_encode"]["image"]);
    for dtype in [DType::BF16, DType::F16] {
        let path = format!("{FIXTURES}a_vq.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, &Device::Cpu) }.unwrap();
        let vq = VqModel::new(&cfg, vb).unwrap();
        let got = vq.decode(&codes, (4, 4)).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let err = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("vq decode {dtype:?}: relative error {:.3e}", err / scale);
        assert!(
            err / scale < 0.05,
            "{dtype:?} decode relative error {}",
            err / scale
        );
        assert_eq!(vq.encode(&images).unwrap().dims(), &[2, 16]);
    }
}
