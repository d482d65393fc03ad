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
            let dev = Device::new_cuda(n).with_context(|| {
                if cfg!(feature = "cuda") {
                    format!("--device {s}: cannot open the GPU")
                } else {
                    format!("--device {s}: this binary was built without CUDA (build with --features cuda)")
                }
            })?;
            crate::util::watch_device(&dev);
            keep_pool_memory(&dev)?;
            Ok(dev)
        }
        _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    }
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        // `none` and `fp16`: the reference's --precision / --mixed-precision names.
        "f32" | "float32" | "none" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        _ => bail!("--dtype {s:?}: expected f32, bf16 or f16 (or none, bf16, fp16)"),
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

/// Allocator-level memory high-water marks of a CUDA device in bytes (what torch's
/// `max_memory_allocated` is to PyTorch): `pool` is the stream-ordered pool candle allocates
/// from, `graphs` the memory CUDA graphs allocate while they run. Excludes the CUDA context
/// and cuBLAS' workspace, which nvidia-smi counts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PeakMemory {
    pub pool: u64,
    pub graphs: u64,
}

/// The high-water marks since the last [`reset_peak_memory`]; `None` off CUDA.
pub fn peak_memory(device: &Device) -> Result<Option<PeakMemory>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let (pool, dev) = cuda_pool(d)?;
        let (mut p, mut g) = (0u64, 0u64);
        // Safety: both attributes are 64-bit values written through the pointers.
        unsafe {
            check(sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut p as *mut u64 as *mut _,
            ))?;
            check(sys::cuDeviceGetGraphMemAttribute(
                dev,
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                &mut g as *mut u64 as *mut _,
            ))?;
        }
        return Ok(Some(PeakMemory { pool: p, graphs: g }));
    }
    let _ = device;
    Ok(None)
}

/// Restart the high-water marks from the memory in use now.
pub fn reset_peak_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        device.synchronize()?;
        let (pool, dev) = cuda_pool(d)?;
        let mut zero = 0u64;
        // Safety: setting a high-water mark takes a 64-bit zero (reset to the current use).
        unsafe {
            check(sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            ))?;
            check(sys::cuDeviceSetGraphMemAttribute(
                dev,
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            ))?;
        }
    }
    let _ = device;
    Ok(())
}

/// Let the stream-ordered pool keep the memory it has reserved. CUDA's default release
/// threshold (0) hands every freed byte back to the OS at each stream or device
/// synchronisation, so that a loop which synchronises once per batch (or training step)
/// maps its gigabytes of buffers afresh every time; PyTorch's caching allocator keeps them
/// too. `ARPG_POOL_RELEASE=1` restores CUDA's default, for comparison.
pub fn keep_pool_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        if std::env::var("ARPG_POOL_RELEASE").is_ok_and(|v| v == "1") {
            return Ok(());
        }
        let (pool, _) = cuda_pool(d)?;
        let mut keep = u64::MAX;
        // Safety: the release threshold is a 64-bit value read through the pointer.
        unsafe {
            check(sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut _,
            ))?;
        }
    }
    let _ = device;
    Ok(())
}

/// A range for a profiler started with `--profile-from-start off` (Nsight Compute's `ncu`):
/// only the work queued while it is alive is profiled. Does nothing without a profiler.
pub struct ProfilerRange {
    #[cfg(feature = "cuda")]
    _range: Option<candle_core::cuda_backend::cudarc::driver::Profiler>,
}

pub fn profiler_range(device: &Device) -> ProfilerRange {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::Profiler;
        let bound = d.cuda_stream().context().bind_to_thread().is_ok();
        return ProfilerRange {
            _range: bound.then(|| Profiler::new().ok()).flatten(),
        };
    }
    let _ = device;
    ProfilerRange {
        #[cfg(feature = "cuda")]
        _range: None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_pool(
    d: &candle_core::CudaDevice,
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
    candle_core::cuda_backend::cudarc::driver::sys::CUdevice,
)> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
    let dev = ctx.cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // Safety: writes one pool handle.
    unsafe { check(sys::cuDeviceGetDefaultMemPool(&mut pool, dev))? };
    Ok((pool, dev))
}

#[cfg(feature = "cuda")]
fn check(r: candle_core::cuda_backend::cudarc::driver::sys::CUresult) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        anyhow::bail!("CUDA memory pool: {r:?}")
    }
}

/// The same GPU on a stream of its own (for work that should overlap with `device`'s, such as
/// the VQ decoder beside the token decoder); the CPU stays the CPU. Tensors move between the
/// two with `to_device`, a device-to-device copy ordered by CUDA events.
pub fn second_stream(device: &Device) -> Result<Device> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Device::new_cuda_with_stream(gpu_id)
            .with_context(|| format!("cannot open a second stream on cuda:{gpu_id}")),
        _ => Ok(device.clone()),
    }
}

/// Wait until the work queued on `device` (this thread's stream) is done, so that another
/// stream may read its results: a CUDA-graph replay records no events that would order a copy
/// on another stream after it (without this the VQ stream read tokens not yet drawn). Only the
/// producing thread waits; the other stream keeps working meanwhile.
pub fn tokens_ready(device: &Device) -> Result<()> {
    if device.is_cuda() {
        device.synchronize()?;
    }
    Ok(())
}
