//! Parsing `--device` and `--dtype`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("--device {s:?}: bad GPU index"))?,
                None => 0,
            };
            Device::new_cuda(n).with_context(|| {
                if cfg!(feature = "cuda") {
                    format!("--device {s}: cannot open the GPU")
                } else {
                    format!("--device {s}: this binary was built without CUDA (build with --features cuda)")
                }
            })
        }
        _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    }
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => bail!("--dtype {s:?}: expected f32, bf16 or f16"),
    }
}

/// Seed the device's own generator (GPU sampling draws there); the CPU path uses the
/// caller's seeded generator instead.
pub fn seed(device: &Device, seed: u64) -> Result<()> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    Ok(())
}
