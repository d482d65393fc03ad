//! Under the `cuda` feature, compiles `src/kernels/*.cu` to PTX in OUT_DIR (the code
//! `include_str!`s it from there), with the nvcc that candle-kernels' build already needs.
//! CPU builds need no CUDA compiler and do nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["fused"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for v in ["CUDA_HOME", "CUDA_PATH", "NVCC", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    for s in SOURCES {
        println!("cargo:rerun-if-changed=src/kernels/{s}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    // PTX for a virtual architecture: the driver JIT-compiles it for the GPU it finds. The
    // default is the H200's (no nvidia-smi on the build machine to ask).
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    for s in SOURCES {
        let src = Path::new("src/kernels").join(format!("{s}.cu"));
        let dst = out.join(format!("{s}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", &format!("-arch=compute_{cap}")])
            .arg(&src)
            .arg("-o")
            .arg(&dst)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}

/// `$NVCC`, else `$CUDA_HOME/bin/nvcc` (or `$CUDA_PATH`), else `nvcc` on PATH, else the
/// usual install folders (candle-kernels' build looks in the same places).
fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    let from_env = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|r| PathBuf::from(r).join("bin/nvcc"));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nvcc"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let usual = ["/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc"].map(PathBuf::from);
    from_env
        .chain(on_path)
        .chain(usual)
        .find(|p| p.is_file())
        .unwrap_or_else(|| "nvcc".into())
}
