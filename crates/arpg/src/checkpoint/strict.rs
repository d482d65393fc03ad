//! A `VarBuilder` backend that checks a state dict strictly against what a model asks for:
//! every missing key, shape mismatch and unexpected key is collected and reported at once.

use super::StateDict;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Buffers that checkpoints carry but models do not load.
const IGNORED: &[&str] = &["freqs_cis", "quantize.codebook_used"];

#[derive(Default)]
struct Report {
    used: BTreeSet<String>,
    missing: Vec<String>,
    mismatched: Vec<String>,
}

struct Strict {
    tensors: HashMap<String, Tensor>,
    report: Arc<Mutex<Report>>,
}

impl SimpleBackend for Strict {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut r = self.report.lock().unwrap();
        match self.tensors.get(name) {
            None => {
                r.missing.push(format!("{name} {:?}", s.dims()));
                // A placeholder lets construction go on so every problem is reported at once.
                Tensor::zeros(s, dtype, dev)
            }
            Some(t) if t.shape() != &s => {
                r.mismatched.push(format!(
                    "{name}: checkpoint {:?}, model {:?}",
                    t.dims(),
                    s.dims()
                ));
                r.used.insert(name.to_string());
                Tensor::zeros(s, dtype, dev)
            }
            Some(t) => {
                r.used.insert(name.to_string());
                t.to_device(dev)?.to_dtype(dtype)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => {
                self.report.lock().unwrap().used.insert(name.to_string());
                t.to_device(dev)?.to_dtype(dtype)
            }
            None => candle_core::bail!("missing tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Build a model from `sd` with `build`, failing with one message that lists every missing
/// key, shape mismatch and unexpected key (buffers such as `freqs_cis` are ignored).
pub fn build_strict<T>(
    sd: &StateDict,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<T>,
) -> Result<T> {
    let report = Arc::new(Mutex::new(Report::default()));
    let backend = Strict {
        tensors: sd.tensors.clone(),
        report: report.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = build(vb)?;
    let r = report.lock().unwrap();
    let unexpected: Vec<&String> = sd
        .tensors
        .keys()
        .filter(|k| {
            !r.used.contains(*k)
                && !IGNORED
                    .iter()
                    .any(|i| k.as_str() == *i || k.ends_with(&format!(".{i}")))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    report_mismatch(
        sd,
        r.missing.clone(),
        r.mismatched.clone(),
        unexpected.into_iter().cloned().collect(),
    )?;
    // NaN or Inf weights would decode every token as 0, silently.
    for name in &r.used {
        let t = &sd.tensors[name];
        if t.dtype().is_float() {
            let finite = t
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                .is_finite();
            if !finite {
                bail!(
                    "checkpoint {}: tensor {name} holds NaN or Inf",
                    sd.source.display()
                );
            }
        }
    }
    Ok(model)
}

/// Compare a state dict with the names and shapes a model will ask for, before anything of the
/// model is allocated: every missing key, shape mismatch and unexpected key in one message.
pub fn check_shapes(sd: &StateDict, expected: &[(String, Vec<usize>)]) -> Result<()> {
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, shape) in expected {
        match sd.tensors.get(name) {
            None => missing.push(format!("{name} {shape:?}")),
            Some(t) if t.dims() != shape.as_slice() => mismatched.push(format!(
                "{name}: checkpoint {:?}, model {shape:?}",
                t.dims()
            )),
            Some(_) => {}
        }
    }
    let names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let unexpected: Vec<String> = sd
        .tensors
        .keys()
        .filter(|k| {
            !names.contains(k.as_str())
                && !IGNORED
                    .iter()
                    .any(|i| k.as_str() == *i || k.ends_with(&format!(".{i}")))
        })
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    report_mismatch(sd, missing, mismatched, unexpected)
}

fn report_mismatch(
    sd: &StateDict,
    missing: Vec<String>,
    mismatched: Vec<String>,
    unexpected: Vec<String>,
) -> Result<()> {
    if missing.is_empty() && mismatched.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "checkpoint {} does not match the model:",
        sd.source.display()
    );
    let list = |msg: &mut String, title: &str, items: Vec<String>| {
        if !items.is_empty() {
            let n = items.len();
            let shown: Vec<_> = items.into_iter().take(20).collect();
            msg.push_str(&format!("\n  {title} ({n}): {}", shown.join(", ")));
            if n > 20 {
                msg.push_str(", ...");
            }
        }
    };
    list(&mut msg, "missing keys", missing);
    list(&mut msg, "shape mismatches", mismatched);
    list(&mut msg, "unexpected keys", unexpected);
    msg.push_str("\n  (is --model / --config / --vq-config the configuration these weights were trained with?)");
    bail!(msg)
}

/// A `VarBuilder` that makes freshly initialised tensors (normal(0, 0.02) for weight
/// matrices, the init hint otherwise), deterministic in `seed`, for benchmarks and tests.
pub fn random_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    random_backend(seed, false, dtype, device)
}

/// Like [`random_var_builder`], but every tensor is random whatever its init hint (1-D
/// `*weight`s near 1, other 1-D tensors near 0): for networks such as the VQ tokenizer whose
/// constructors ask for plain `get`s, which would otherwise all be zeros.
pub fn random_var_builder_dense(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    random_backend(seed, true, dtype, device)
}

/// `n` values of `0.02 * normal` from ChaCha8 seeded with `seed`, the same as one generator
/// drawing them in turn (each draw takes exactly four 32-bit words), made in blocks on all
/// cores: one thread took ~20 s for ARPG-L's weights.
fn normals(seed: u64, n: usize) -> Vec<f32> {
    use rand::SeedableRng;
    const BLOCK: usize = 1 << 18;
    const WORDS: u128 = 4;
    let mut out = vec![0f32; n];
    let blocks: Vec<(usize, &mut [f32])> = out.chunks_mut(BLOCK).enumerate().collect();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = blocks.len().div_ceil(threads).max(1);
    let mut blocks = blocks.into_iter();
    std::thread::scope(|scope| loop {
        let mine: Vec<_> = blocks.by_ref().take(per).collect();
        if mine.is_empty() {
            break;
        }
        scope.spawn(move || {
            for (k, block) in mine {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                rng.set_word_pos(WORDS * (k * BLOCK) as u128);
                for v in block {
                    *v = 0.02 * crate::util::normal(&mut rng);
                }
            }
        });
    });
    out
}

fn random_backend(seed: u64, dense: bool, dtype: DType, device: &Device) -> VarBuilder<'static> {
    struct Random {
        seed: u64,
        dense: bool,
    }
    impl SimpleBackend for Random {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            use rand::{Rng, SeedableRng};
            // Seed per tensor name so the result does not depend on construction order.
            let mut hash = self.seed ^ 0x9E37_79B9_7F4A_7C15;
            for b in name.bytes() {
                hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01B3);
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hash);
            let n = s.elem_count();
            let data: Vec<f32> = match h {
                _ if self.dense && s.rank() < 2 => {
                    let base = if name.ends_with("weight") { 1.0 } else { 0.0 };
                    (0..n)
                        .map(|_| base + rng.random_range(-0.1f32..0.1))
                        .collect()
                }
                Init::Const(c) if !self.dense => vec![c as f32; n],
                _ if s.rank() >= 2 => normals(hash, n),
                _ => (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect(),
            };
            Tensor::from_vec(data, s, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("random init cannot provide {name} without a shape")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }
    VarBuilder::from_backend(Box::new(Random { seed, dense }), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    #[test]
    fn block_parallel_normals_equal_one_generator_drawing_in_turn() {
        use rand::SeedableRng;
        let n = 3 * (1 << 18) + 17;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
        let want: Vec<f32> = (0..n)
            .map(|_| 0.02 * crate::util::normal(&mut rng))
            .collect();
        assert!(super::normals(99, n) == want);
        assert!(super::normals(100, 5) != want[..5]);
    }
}
