//! Shared helpers for the parity tests: the reference fixtures in `tests/fixtures/parity-a`.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/parity-a"
    ))
    .join(name)
}

pub fn fixture_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("a.json")).unwrap()).unwrap()
}

pub fn flat_f32(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat_f32).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not a number array"),
    }
}

pub fn flat_u32(v: &serde_json::Value) -> Vec<u32> {
    flat_f32(v).into_iter().map(|x| x as u32).collect()
}

/// max |a - b| / max |b|, and a per-element check |a - b| <= tol * (1 + |b|).
pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}[{i}] is not finite");
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
        worst = worst.max((x - y).abs());
    }
    let rel = worst / scale.max(1e-12);
    assert!(rel <= tol, "{what}: relative error {rel}");
    rel
}
