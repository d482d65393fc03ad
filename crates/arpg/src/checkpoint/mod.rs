//! Checkpoints: PyTorch zip `.pt` and `.safetensors` files in the reference's key layout,
//! strict key and shape checking, and the official weights on the Hugging Face hub.

pub mod hub;
mod strict;

pub use strict::{build_strict, check_shapes, random_var_builder, random_var_builder_dense};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which weights of a checkpoint to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The trained weights (`model`, `state_dict`, `module` or the top level).
    Model,
    /// The exponential moving average (`ema`).
    Ema,
}

/// A flat map from parameter name to tensor, with the file it came from.
#[derive(Debug, Clone)]
pub struct StateDict {
    pub tensors: HashMap<String, Tensor>,
    pub source: PathBuf,
}

/// Keys under which training scripts store the state dict, in the order they are tried.
const MODEL_KEYS: &[&str] = &["model", "state_dict", "module"];
/// Key prefixes added by DDP wrappers and `torch.compile`, stripped on load.
const WRAPPER_PREFIXES: &[&str] = &["module.", "_orig_mod."];

impl StateDict {
    /// Load a `.pt` (PyTorch zip) or `.safetensors` file, detected by content.
    pub fn load(path: &Path, which: Weights) -> Result<Self> {
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = crate::util::open_regular(path, "checkpoint")?;
            f.read_exact(&mut magic)
                .with_context(|| format!("checkpoint {} is empty or truncated", path.display()))?;
        }
        let tensors = if &magic == b"PK\x03\x04" {
            load_pt(path, which)
        } else {
            load_safetensors(path, which)
        }
        .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
        if tensors.is_empty() {
            bail!("checkpoint {} holds no tensors", path.display());
        }
        Ok(Self {
            tensors: strip_wrappers(tensors),
            source: path.to_path_buf(),
        })
    }
}

fn strip_wrappers(mut t: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    for p in WRAPPER_PREFIXES {
        if t.keys().all(|k| k.starts_with(p)) {
            t = t
                .into_iter()
                .map(|(k, v)| (k[p.len()..].to_string(), v))
                .collect();
        }
    }
    t
}

fn load_safetensors(path: &Path, which: Weights) -> Result<HashMap<String, Tensor>> {
    let all = candle_core::safetensors::load(path, &Device::Cpu)
        .context("not a valid PyTorch zip or safetensors file")?;
    // Flat files may keep several state dicts side by side under `ema.` / `model.` prefixes.
    let pick = |prefix: &str| -> HashMap<String, Tensor> {
        all.iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect()
    };
    match which {
        Weights::Ema => {
            let ema = pick("ema.");
            if ema.is_empty() {
                bail!("--ema was given but the file has no `ema.`-prefixed tensors");
            }
            Ok(ema)
        }
        Weights::Model => {
            // Training checkpoints keep `model.`, `ema.` and `optim.` tensors side by side.
            let model = pick("model.");
            if model.is_empty() {
                Ok(all)
            } else {
                Ok(model)
            }
        }
    }
}

fn load_pt(path: &Path, which: Weights) -> Result<HashMap<String, Tensor>> {
    let keys = pt_top_level_keys(path)?;
    let key: Option<&str> = match which {
        Weights::Ema => {
            if !keys.iter().any(|k| k == "ema") {
                bail!(
                    "--ema was given but the checkpoint has no `ema` entry (top-level keys: {})",
                    keys.join(", ")
                );
            }
            Some("ema")
        }
        Weights::Model => MODEL_KEYS
            .iter()
            .copied()
            .find(|k| keys.iter().any(|x| x == k)),
    };
    verify_zip_crcs(path)?;
    let pth = pickle_guard("the PyTorch pickle", || {
        Ok(candle_core::pickle::PthTensors::new(path, key)?)
    })
    .context("cannot read the PyTorch pickle")?;
    let mut out = HashMap::new();
    for name in pth.tensor_infos().keys() {
        let t = pth
            .get(name)
            .with_context(|| format!("cannot read tensor {name}"))?
            .with_context(|| format!("tensor {name} is missing from the archive"))?;
        out.insert(name.clone(), t);
    }
    if out.is_empty() {
        bail!(
            "no tensors found (top-level keys: {}; expected a state dict at the top level or under {})",
            keys.join(", "),
            MODEL_KEYS.join(", ")
        );
    }
    Ok(out)
}

/// The string keys of the top-level pickled dict of a PyTorch zip checkpoint.
fn pt_top_level_keys(path: &Path) -> Result<Vec<String>> {
    use candle_core::pickle::{Object, Stack};
    let file = std::fs::File::open(path)?;
    let mut zip = zip_archive(file)?;
    let name = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with("data.pkl"))
        .context("not a PyTorch checkpoint: no data.pkl in the zip archive")?;
    let reader = zip.by_name(&name)?;
    let mut reader = std::io::BufReader::new(reader);
    let obj = pickle_guard("pickle in data.pkl", || {
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .context("corrupt pickle in data.pkl")?;
        stack.finalize().context("corrupt pickle in data.pkl")
    })?;
    Ok(match obj {
        Object::Dict(kv) => kv
            .into_iter()
            .filter_map(|(k, _)| match k {
                Object::Unicode(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => vec![],
    })
}

/// Read every entry of a zip archive through its CRC-32: the tensor reader reads only the
/// bytes it needs and never reaches the end of an entry, where the zip reader checks it.
pub fn verify_zip_crcs(path: &Path) -> Result<()> {
    let mut zip = zip_archive(crate::util::open_regular(path, "checkpoint")?)?;
    for i in 0..zip.len() {
        let mut e = zip.by_index(i).context("corrupt zip archive")?;
        let name = e.name().map(|n| n.to_string()).unwrap_or_default();
        std::io::copy(&mut e, &mut std::io::sink()).with_context(|| {
            format!("zip entry {name} is corrupt (its data does not match its CRC-32)")
        })?;
    }
    Ok(())
}

fn zip_archive(file: std::fs::File) -> Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>> {
    zip::ZipArchive::new(std::io::BufReader::new(file)).context("corrupt zip archive")
}

/// Save tensors as `.safetensors`, atomically.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    save_safetensors_with_metadata(tensors, HashMap::new(), path)
}

/// Every tensor in `dtype`, e.g. to store a bf16 copy.
pub fn cast_all(t: &HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    t.iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
        .collect()
}

/// Save tensors with string metadata as `.safetensors`, atomically.
pub fn save_safetensors_with_metadata(
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::tensor::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
            .with_context(|| format!("cannot serialise {}", path.display()))?;
    crate::util::write_atomic(path, &bytes)
}

/// Load all tensors of a `.safetensors` file with its string metadata.
pub fn load_safetensors_with_metadata(
    path: &Path,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut bytes = Vec::new();
    {
        use std::io::Read;
        crate::util::open_regular(path, "checkpoint")?
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// Run one of candle's pickle readers, turning its panics into errors: on corrupt input it
/// indexes tuples unchecked (`rebuild_args`) and shifts past 64 bits (a long `LONG1`).
pub(crate) fn pickle_guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    quiet_panics::install();
    quiet_panics::QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    quiet_panics::QUIET.with(|q| q.set(false));
    r.unwrap_or_else(|_| anyhow::bail!("corrupt {what}: malformed tensor record"))
}

/// A panic caught by [`pickle_guard`] becomes an error naming the file; the default hook
/// would still print "thread panicked at ..." first. This hook stays silent for panics on a
/// thread inside a guard and defers to the previous hook otherwise.
mod quiet_panics {
    use std::cell::Cell;

    thread_local! {
        pub static QUIET: Cell<bool> = const { Cell::new(false) };
    }

    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !QUIET.with(|q| q.get()) {
                    previous(info);
                }
            }));
        });
    }
}
