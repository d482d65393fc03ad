//! Fused kernels where candle has none, one module an op. Sampling is launch-bound (hundreds
//! of small kernels per step) and training spends its time in the attention softmax and the
//! norms, so each kernel saved is time saved.
//!
//! Each module holds one candle custom op with its CPU version (the kernel's arithmetic in
//! Rust), its CUDA launch and its backward, beside the slow composite of tensor ops it replaces:
//! the model's path wherever the op does not apply, and what the tests compare it with. The
//! CUDA sources (`*.cu` here) are compiled to PTX by `build.rs` under the `cuda` feature.
//!
//! `fused` functions return `None` where the kernel does not apply: off CUDA, a dtype it lacks,
//! `ARPG_NO_FUSED` set, or a device that refuses the PTX (then once a warning, not an error).
//! The `check` functions compare a kernel with its composite on a device (`arpg check-parity`).
//!
//! `cudnn` is the one library called directly: convolutions through a run-time-loaded cuDNN.

pub mod adamw;
pub mod attn_softmax;
pub mod cross_entropy;
pub mod cudnn;
pub mod decode;
pub mod draw;
pub mod dropout;
pub mod embedding;
pub mod group_norm;
pub mod heads;
pub mod residual_norm;
pub mod rms_norm;
pub mod rope;
pub mod upsample;
pub mod widen;

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Tensor};

/// False with `ARPG_NO_FUSED` set: every op takes the generic path (for A/B measurements).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ARPG_NO_FUSED").is_none())
}

/// Whether the fused kernels run on `dev`: enabled, CUDA, and the PTX loaded there.
pub fn on(dev: &Device) -> bool {
    enabled() && loaded(dev)
}

/// Whether this build's PTX is loaded on `dev` (CUDA only). A driver older than the nvcc that
/// built it refuses the PTX: then the generic path, and one warning for the process.
pub fn loaded(dev: &Device) -> bool {
    if !dev.is_cuda() {
        return false;
    }
    #[cfg(feature = "cuda")]
    if let Ok(cu) = dev.as_cuda_device() {
        return cuda::loaded(cu);
    }
    let _ = dev;
    false
}

/// The precision of the parts the reference runs in float32 (norms, RoPE, softmax): float32,
/// or float64 when the whole model runs in float64 (gradient checks).
pub fn at_least_f32(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// max |a - b| / max |b| over all elements, in f32: how the checks compare a fused kernel's
/// output (or gradient) `a` with the composite's `b`.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(d / (b.abs()?.max_all()?.to_scalar::<f32>()? as f64).max(1e-12))
}

/// A contiguous CPU input's values widened to f32 (exact for bf16/f16), for the CPU versions.
fn cpu_f32(s: &CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Vec<f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: strided input")))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F64(v) => v[a..b].iter().map(|&x| x as f32).collect(),
        _ => candle_core::bail!("{what}: {:?} input", s.dtype()),
    })
}

/// f32 results rounded once to `dt`, as the kernels store them.
fn cpu_store(v: Vec<f32>, dt: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dt {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(|x| x as f64).collect()),
        dt => candle_core::bail!("{dt:?} output"),
    })
}

/// `v` rounded to `dt` and widened back (the kernels' intermediate roundings).
fn round_to(dt: DType, v: f32) -> f32 {
    match dt {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// `t` contiguous and starting on a 16-byte boundary (kernels reading 8 bf16 at a time).
pub(crate) fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    Ok(match t.layout().start_offset() % 8 {
        0 => t,
        _ => t.copy()?,
    })
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, Layout};

    /// Every kernel of `fused.cu`, compiled by `build.rs`, loaded once per device.
    pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    pub(crate) const MODULE: &str = "arpg_fused";

    pub(crate) fn loaded(dev: &CudaDevice) -> bool {
        type Seen = Vec<(candle_core::cuda_backend::DeviceId, bool)>;
        static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(Vec::new());
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, ok)) = seen.iter().find(|(id, _)| *id == dev.id()) {
            return ok;
        }
        let ok = match dev.get_or_load_custom_func("rope_i_bf16_f32", MODULE, PTX) {
            Ok(_) => true,
            Err(e) => {
                static WARN: std::sync::Once = std::sync::Once::new();
                WARN.call_once(|| {
                    tracing::warn!("fused kernels unavailable ({e}); using the generic ops")
                });
                false
            }
        };
        seen.push((dev.id(), ok));
        ok
    }

    /// Launch kernel `name` of [`PTX`] on `dev` with `cfg` and the arguments in order.
    macro_rules! launch {
        ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
            use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
            let func = $dev.get_or_load_custom_func($name, $crate::kernels::cuda::MODULE,
                $crate::kernels::cuda::PTX)?;
            let mut builder = func.builder();
            $(builder.arg($arg);)+
            // Safety: every call site passes the kernel's arguments in its order and types.
            unsafe { builder.launch($cfg) }.map_err($crate::kernels::cuda::err)?;
        }};
    }
    pub(crate) use launch;

    pub(crate) fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("fused kernel launch: {e:?}"))
    }

    /// The contiguous elements of an input, typed.
    pub(crate) fn view<'a, T: CudaDType>(
        st: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: strided input")))?;
        Ok(st.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// The contiguous elements of an in-place op's destination, typed and writable.
    pub(crate) fn view_mut<'a, T: CudaDType>(
        st: &'a mut CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaViewMut<'a, T>> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: strided destination")))?;
        Ok(st.as_cuda_slice_mut::<T>()?.slice_mut(a..b))
    }

    /// The CUDA storage `s` of a contiguous tensor with layout `l` (from
    /// `Tensor::storage_and_layout`), typed: the inputs of ops with several outputs, which
    /// are plain functions rather than custom ops.
    pub(crate) fn cuda_view<'a, T: CudaDType>(
        s: &'a candle_core::Storage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        match s {
            candle_core::Storage::Cuda(c) => view(c, l, what),
            _ => candle_core::bail!("{what}: not a CUDA tensor"),
        }
    }

    /// A tensor (no autograd graph) over a fresh buffer a kernel filled.
    pub(crate) fn tensor<T: CudaDType>(
        s: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<candle_core::Shape>,
    ) -> candle_core::Tensor {
        candle_core::Tensor::from_storage(
            candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )
    }

    /// One warp per row, eight rows a block.
    pub(crate) fn warp_rows(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A custom op's `cpu_fwd` that refuses: a backward helper that has no CPU version (the
    /// backward takes tensor ops off CUDA).
    macro_rules! cuda_only {
        ($name:literal; $($arg:ident: $ty:ty),+) => {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(&self, $($arg: $ty),+) -> candle_core::Result<(CpuStorage, Shape)> {
                let _ = ($($arg),+);
                candle_core::bail!(concat!($name, ": CUDA only"))
            }
        };
    }
    pub(crate) use cuda_only;
}
