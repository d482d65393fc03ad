//! 2D convolution through cuDNN, loaded at run time.
//!
//! Why not candle's `cudnn` feature: it links `libcudnn.so.9`, so a binary built with it does
//! not start on a machine without cuDNN; it also builds descriptors and asks for an algorithm
//! on every call and sets no math type. Here the library is opened with `dlopen` on first use
//! (a missing library gives one warning and candle's im2col path), descriptors and the chosen
//! algorithm are cached per shape, and the math type is explicit: f32 stays true f32 (FMA, no
//! TF32, so it matches the reference fixtures), bf16/f16 use tensor cores.
//!
//! Algorithms are timed once per shape (`FindEx`, with a stable pick among near-ties; see
//! `stable_pick`). Both layouts are supported: NHWC is what the VQ runs on a GPU.
//!
//! The bias, and a residual `z` where the caller has one, are added in the convolution's own
//! epilogue (`cudnnConvolutionBiasActivationForward`, identity activation) where cuDNN allows
//! it: a separate bias pass (`cudnnAddTensor`) and residual add cost the bf16 VQ decoder a
//! third of its time on the H200. Exact f32 keeps the separate passes.

use anyhow::Result;
use candle_core::Tensor;

static ALLOW_TF32: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Let f32 convolutions use TF32 tensor cores (inputs rounded to 10 mantissa bits, f32
/// accumulation), as PyTorch's `torch.backends.cudnn.allow_tf32` does and as the paper's
/// sampling script sets. Off by default, so f32 stays exact (what the parity checks need).
/// `ARPG_CUDNN_TF32=1` turns it on too.
pub fn set_allow_tf32(on: bool) {
    ALLOW_TF32.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn allow_tf32() -> bool {
    ALLOW_TF32.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var_os("ARPG_CUDNN_TF32").is_some_and(|v| v == "1")
}

/// `ARPG_NO_CUDNN=1` keeps candle's convolution (A/B runs).
pub fn enabled() -> bool {
    std::env::var_os("ARPG_NO_CUDNN").is_none_or(|v| v.is_empty() || v == "0")
}

/// Memory layout of a convolution's activations and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// x `[n, c, h, w]`, weights `[cout, cin, kh, kw]` (torch's, candle's).
    Nchw,
    /// x `[n, h, w, c]`, weights `[cout, kh, kw, cin]`: the layout cuDNN's tensor-core kernels
    /// read directly (NCHW bf16 pays a transpose in each convolution).
    Nhwc,
}

/// Whether [`conv2d`] runs on `device`: CUDA with cuDNN loaded and not turned off.
pub fn available(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        device.is_cuda() && enabled() && imp::library().is_some()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// An algorithm whose epilogue adds the bias (cuDNN fuses an identity activation with
/// `IMPLICIT_PRECOMP_GEMM` only) is taken when it is at most this much slower than the fastest:
/// a separate bias pass over the output costs about as much as the convolution at the
/// decoder's top level.
const FUSED_SLACK: f32 = 1.5;

/// Orders timed algorithms (`key`: algorithm number, time; fastest first on entry) so that
/// the first is the one to run: the lowest-numbered within 15% of the fastest, so that timing
/// noise rarely changes the pick and separate processes (the GPUs of a `sample-fid` run) decode
/// with the same algorithm and give the same bytes; but `fused` (the algorithm that takes the
/// bias in its epilogue) first when it is within [`FUSED_SLACK`] of that pick.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn order_timed<T>(timed: &mut [T], key: impl Fn(&T) -> (i32, f32), fused: Option<i32>) {
    let Some(best) = timed.first().map(|p| key(p).1) else {
        return;
    };
    let cut = timed.iter().take_while(|p| key(p).1 <= best * 1.15).count();
    timed[..cut].sort_by_key(|p| key(p).0);
    if let Some(f) = fused {
        let near = key(&timed[0]).1 * FUSED_SLACK;
        if let Some(i) = timed.iter().position(|p| key(p).0 == f && key(p).1 <= near) {
            timed[..=i].rotate_right(1);
        }
    }
}

/// `ARPG_CUDNN_FUSE=0` adds the bias and the residual in passes of their own (A/B runs).
#[cfg(feature = "cuda")]
fn fuse_enabled() -> bool {
    std::env::var_os("ARPG_CUDNN_FUSE").is_none_or(|v| v != "0")
}

/// `conv2d(x, w) + b (+ z)` (square kernel, symmetric `pad`, `stride`, no dilation or groups)
/// on cuDNN, in `format`; `z` has the output's shape and dtype. `Ok(None)` where it does not
/// apply (CPU, cuDNN missing or turned off, an unsupported dtype): the caller then runs
/// candle's convolution (NCHW only).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    z: Option<&Tensor>,
    pad: usize,
    stride: usize,
    format: Format,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if x.device().is_cuda()
            && enabled()
            && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && x.dtype() == w.dtype()
            && x.dtype() == b.dtype()
            && z.is_none_or(|z| z.dtype() == x.dtype())
            && imp::library().is_some()
        {
            let x = x.contiguous()?;
            let w = w.contiguous()?;
            let b = b.contiguous()?;
            let z = z.map(|z| z.contiguous()).transpose()?;
            return Ok(Some(x.apply_op3_no_bwd(
                &w,
                &b,
                &imp::Conv {
                    pad,
                    stride,
                    nhwc: format == Format::Nhwc,
                    z,
                },
            )?));
        }
    }
    let _ = (x, w, b, z, pad, stride, format);
    Ok(None)
}

/// On CUDA with cuDNN: [`conv2d`] with a residual against candle's convolution plus the
/// bias and the residual, relative (max |diff| / max |composite|), as `[f32 NCHW (exact, the
/// separate passes), bf16 NHWC at a decoder shape (the fused epilogue where cuDNN takes it)]`.
pub fn check(device: &candle_core::Device) -> Result<Option<[f64; 2]>> {
    use candle_core::DType;
    if !available(device) {
        return Ok(None);
    }
    let mut out = [0f64; 2];
    for (k, (n, c, h, bf16)) in [(2, 32, 9, false), (4, 128, 32, true)]
        .into_iter()
        .enumerate()
    {
        let x = Tensor::randn(0f32, 1.0, (n, c, h, h), device)?;
        let w = (Tensor::randn(0f32, 1.0, (c, c, 3, 3), device)? / (9.0 * c as f64).sqrt())?;
        let b = Tensor::randn(0f32, 1.0, c, device)?;
        let z = Tensor::randn(0f32, 1.0, (n, c, h, h), device)?;
        let dt = if bf16 { DType::BF16 } else { DType::F32 };
        let q = |t: &Tensor| t.to_dtype(dt)?.to_dtype(DType::F32);
        // The composite from the same (rounded) inputs, in f32.
        let want = (q(&x)?
            .conv2d(&q(&w)?, 1, 1, 1, 1)?
            .broadcast_add(&q(&b)?.reshape((1, c, 1, 1))?)?
            + q(&z)?)?;
        let got = if bf16 {
            let nhwc = |t: &Tensor| -> Result<Tensor> {
                Ok(t.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(dt)?)
            };
            conv2d(
                &nhwc(&x)?,
                &nhwc(&w)?,
                &b.to_dtype(dt)?,
                Some(&nhwc(&z)?),
                1,
                1,
                Format::Nhwc,
            )?
            .map(|y| y.permute((0, 3, 1, 2)))
            .transpose()?
        } else {
            conv2d(&x, &w, &b, Some(&z), 1, 1, Format::Nchw)?
        };
        let Some(got) = got else {
            return Ok(None);
        };
        out[k] = super::rel_diff(&got, &want)?;
    }
    Ok(Some(out))
}

/// Convolution shapes planned so far, and how many of them add the bias in cuDNN's epilogue.
pub fn fused_plans() -> (usize, usize) {
    #[cfg(feature = "cuda")]
    {
        imp::fused_plans()
    }
    #[cfg(not(feature = "cuda"))]
    (0, 0)
}

/// The cuDNN version in use (e.g. 91500 for 9.15.0), or `None` where it is not loaded.
pub fn version() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        imp::library().map(|l| l.version)
    }
    #[cfg(not(feature = "cuda"))]
    None
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape};
    use std::collections::HashMap;
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::sync::{Mutex, OnceLock};

    type Status = c_int;
    type Handle = *mut c_void;
    type Desc = *mut c_void;

    // cudnn_graph.h / cudnn_cnn.h enums (stable across cuDNN 8 and 9).
    const FORMAT_NCHW: c_int = 0;
    const FORMAT_NHWC: c_int = 1;
    const DT_FLOAT: c_int = 0;
    const DT_HALF: c_int = 2;
    const DT_BFLOAT16: c_int = 9;
    const CROSS_CORRELATION: c_int = 1;
    const DEFAULT_MATH: c_int = 0;
    const TENSOR_OP_MATH: c_int = 1;
    const TENSOR_OP_MATH_ALLOW_CONVERSION: c_int = 2;
    const FMA_MATH: c_int = 3;
    const ALGO_IMPLICIT_PRECOMP_GEMM: c_int = 1;
    const ACTIVATION_IDENTITY: c_int = 5;
    const NOT_PROPAGATE_NAN: c_int = 0;
    /// Largest workspace an algorithm may ask for: the decoder's own activations at batch 64
    /// are ~1 GiB each in bf16, and the peak-memory budget is the reference's.
    const WORKSPACE_LIMIT: usize = 1 << 30;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct AlgoPerf {
        algo: c_int,
        status: Status,
        time: f32,
        memory: usize,
        determinism: c_int,
        math_type: c_int,
        reserved: [c_int; 3],
    }

    macro_rules! api {
        ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)+) => {
            #[allow(non_snake_case)]
            pub(super) struct Lib {
                pub version: usize,
                $($name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)+
                _lib: libloading::Library,
            }
            impl Lib {
                #[allow(non_snake_case)]
                fn open(path: &str) -> Result<Self, String> {
                    // Safety: cuDNN's initialisers have no preconditions; the symbols are
                    // declared with cuDNN's C signatures below.
                    unsafe {
                        let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
                        let version: libloading::Symbol<unsafe extern "C" fn() -> usize> =
                            lib.get(b"cudnnGetVersion\0").map_err(|e| e.to_string())?;
                        let version = version();
                        $(let $name = *lib
                            .get(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| e.to_string())?;)+
                        Ok(Self { version, $($name,)+ _lib: lib })
                    }
                }
            }
        };
    }

    api! {
        cudnnGetErrorString: fn(Status) -> *const c_char;
        cudnnCreate: fn(*mut Handle) -> Status;
        cudnnSetStream: fn(Handle, *mut c_void) -> Status;
        cudnnCreateTensorDescriptor: fn(*mut Desc) -> Status;
        cudnnSetTensor4dDescriptor: fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status;
        cudnnCreateFilterDescriptor: fn(*mut Desc) -> Status;
        cudnnSetFilter4dDescriptor: fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status;
        cudnnCreateConvolutionDescriptor: fn(*mut Desc) -> Status;
        cudnnSetConvolution2dDescriptor:
            fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_int) -> Status;
        cudnnSetConvolutionMathType: fn(Desc, c_int) -> Status;
        cudnnGetConvolutionForwardAlgorithm_v7:
            fn(Handle, Desc, Desc, Desc, Desc, c_int, *mut c_int, *mut AlgoPerf) -> Status;
        cudnnFindConvolutionForwardAlgorithmEx: fn(
            Handle, Desc, *const c_void, Desc, *const c_void, Desc, Desc, *mut c_void, c_int,
            *mut c_int, *mut AlgoPerf, *mut c_void, usize
        ) -> Status;
        cudnnGetConvolutionForwardWorkspaceSize:
            fn(Handle, Desc, Desc, Desc, Desc, c_int, *mut usize) -> Status;
        cudnnConvolutionForward: fn(
            Handle, *const c_void, Desc, *const c_void, Desc, *const c_void, Desc, c_int,
            *mut c_void, usize, *const c_void, Desc, *mut c_void
        ) -> Status;
        cudnnAddTensor:
            fn(Handle, *const c_void, Desc, *const c_void, *const c_void, Desc, *mut c_void)
                -> Status;
        cudnnCreateActivationDescriptor: fn(*mut Desc) -> Status;
        cudnnSetActivationDescriptor: fn(Desc, c_int, c_int, f64) -> Status;
        cudnnConvolutionBiasActivationForward: fn(
            Handle, *const c_void, Desc, *const c_void, Desc, *const c_void, Desc, c_int,
            *mut c_void, usize, *const c_void, Desc, *const c_void, Desc, *const c_void, Desc,
            Desc, *mut c_void
        ) -> Status;
    }

    // Safety: the function pointers and the library handle may be used from any thread.
    unsafe impl Send for Lib {}
    unsafe impl Sync for Lib {}

    /// The library, opened once; `None` (after one warning) where it cannot be.
    pub(super) fn library() -> Option<&'static Lib> {
        static LIB: OnceLock<Option<Lib>> = OnceLock::new();
        LIB.get_or_init(|| {
            let mut errors = Vec::new();
            for name in ["libcudnn.so.9", "libcudnn.so"] {
                match Lib::open(name) {
                    Ok(lib) => {
                        tracing::debug!("cuDNN {} from {name}", lib.version);
                        return Some(lib);
                    }
                    Err(e) => errors.push(e),
                }
            }
            tracing::warn!(
                "cuDNN not found ({}); convolutions fall back to candle's im2col path, which is \
                 several times slower. Put libcudnn.so.9 (e.g. the nvidia-cudnn-cu13 wheel's \
                 nvidia/cudnn/lib) on LD_LIBRARY_PATH, or set ARPG_NO_CUDNN=1 to silence this.",
                errors.join("; ")
            );
            None
        })
        .as_ref()
    }

    fn check(lib: &Lib, what: &str, s: Status) -> candle_core::Result<()> {
        if s == 0 {
            return Ok(());
        }
        // Safety: cuDNN returns a static NUL-terminated string for every status.
        let msg = unsafe { CStr::from_ptr((lib.cudnnGetErrorString)(s)) };
        candle_core::bail!("cuDNN {what}: {} (status {s})", msg.to_string_lossy())
    }

    /// Descriptors and the algorithm for one convolution shape on one device.
    struct Plan {
        x: Desc,
        w: Desc,
        y: Desc,
        bias: Desc,
        conv: Desc,
        /// The identity activation of the fused call.
        act: Desc,
        algo: c_int,
        workspace: usize,
        /// Add the bias (and `z`) in the convolution's epilogue; cleared, after one warning,
        /// when cuDNN refuses it.
        fuse: bool,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        ordinal: usize,
        dtype: c_int,
        x: [c_int; 4],
        w: [c_int; 4],
        pad: c_int,
        stride: c_int,
        tf32: bool,
        nhwc: bool,
    }

    struct State {
        /// One handle per candle device (each has its own stream).
        handles: HashMap<candle_core::cuda_backend::DeviceId, Handle>,
        plans: HashMap<Key, Plan>,
    }

    // Safety: every use of the raw handles and descriptors is under the mutex.
    unsafe impl Send for State {}

    pub(super) fn fused_plans() -> (usize, usize) {
        let st = state().lock().unwrap_or_else(|p| p.into_inner());
        (st.plans.len(), st.plans.values().filter(|p| p.fuse).count())
    }

    fn state() -> &'static Mutex<State> {
        static STATE: OnceLock<Mutex<State>> = OnceLock::new();
        STATE.get_or_init(|| {
            Mutex::new(State {
                handles: HashMap::new(),
                plans: HashMap::new(),
            })
        })
    }

    /// `d` in cuDNN's order (n, c, h, w) whatever the memory format.
    fn tensor_desc(lib: &Lib, dt: c_int, d: [c_int; 4], nhwc: bool) -> candle_core::Result<Desc> {
        let format = if nhwc { FORMAT_NHWC } else { FORMAT_NCHW };
        let mut desc = std::ptr::null_mut();
        // Safety: `desc` is written by create and then configured.
        unsafe {
            check(
                lib,
                "create tensor",
                (lib.cudnnCreateTensorDescriptor)(&mut desc),
            )?;
            let s = (lib.cudnnSetTensor4dDescriptor)(desc, format, dt, d[0], d[1], d[2], d[3]);
            check(lib, &format!("tensor {d:?}"), s)?;
        }
        Ok(desc)
    }

    /// Algorithms are timed once per shape (`FindEx`): on the H200 the heuristics' first
    /// choice made the TF32 decoder 2.7x slower (0.648 s against 0.237 s for 64 images).
    /// `ARPG_CUDNN_FIND=0` takes the heuristics' choice instead.
    fn find() -> bool {
        std::env::var_os("ARPG_CUDNN_FIND").is_none_or(|v| v != "0")
    }

    /// Device buffers for `FindEx` to time the algorithms on.
    struct Probe {
        x: *const c_void,
        w: *const c_void,
        y: *mut c_void,
        work: *mut c_void,
        work_size: usize,
    }

    /// Long (~200 lines) because each cuDNN call is an FFI call with its descriptors spelled
    /// out under one `unsafe` contract; splitting it would hand raw handles between functions
    /// without making any step clearer. (Left whole also because a split could only be tested
    /// on a GPU.)
    fn plan(
        lib: &Lib,
        handle: Handle,
        k: &Key,
        probe: Option<&Probe>,
    ) -> candle_core::Result<Plan> {
        let oh = (k.x[2] + 2 * k.pad - k.w[2]) / k.stride + 1;
        let ow = (k.x[3] + 2 * k.pad - k.w[3]) / k.stride + 1;
        let x = tensor_desc(lib, k.dtype, k.x, k.nhwc)?;
        let y = tensor_desc(lib, k.dtype, [k.x[0], k.w[0], oh, ow], k.nhwc)?;
        let bias = tensor_desc(lib, k.dtype, [1, k.w[0], 1, 1], k.nhwc)?;
        let (mut w, mut conv) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut perf = [AlgoPerf::default(); 16];
        let mut found = 0;
        let found_ok: c_int;
        let exact = k.dtype == DT_FLOAT && !k.tf32;
        // Safety: descriptors are created before use; `perf` holds `perf.len()` entries and the
        // probe's buffers are as large as the descriptors say.
        unsafe {
            check(
                lib,
                "create filter",
                (lib.cudnnCreateFilterDescriptor)(&mut w),
            )?;
            let s = (lib.cudnnSetFilter4dDescriptor)(
                w,
                k.dtype,
                if k.nhwc { FORMAT_NHWC } else { FORMAT_NCHW },
                k.w[0],
                k.w[1],
                k.w[2],
                k.w[3],
            );
            check(lib, &format!("filter {:?}", k.w), s)?;
            check(
                lib,
                "create conv",
                (lib.cudnnCreateConvolutionDescriptor)(&mut conv),
            )?;
            // bf16/f16 accumulate in f32 (cuDNN's PSEUDO_*_CONFIG).
            let s = (lib.cudnnSetConvolution2dDescriptor)(
                conv,
                k.pad,
                k.pad,
                k.stride,
                k.stride,
                1,
                1,
                CROSS_CORRELATION,
                DT_FLOAT,
            );
            check(lib, "conv descriptor", s)?;
            let math = if exact { FMA_MATH } else { TENSOR_OP_MATH };
            check(
                lib,
                "math type",
                (lib.cudnnSetConvolutionMathType)(conv, math),
            )?;
            let s = match probe {
                Some(p) => (lib.cudnnFindConvolutionForwardAlgorithmEx)(
                    handle,
                    x,
                    p.x,
                    w,
                    p.w,
                    conv,
                    y,
                    p.y,
                    perf.len() as c_int,
                    &mut found,
                    perf.as_mut_ptr(),
                    p.work,
                    p.work_size,
                ),
                None => (lib.cudnnGetConvolutionForwardAlgorithm_v7)(
                    handle,
                    x,
                    w,
                    conv,
                    y,
                    perf.len() as c_int,
                    &mut found,
                    perf.as_mut_ptr(),
                ),
            };
            check(lib, "algorithm search", s)?;
        }
        let found = found.clamp(0, perf.len() as c_int);
        if probe.is_some() {
            // Keep the usable ones only, then order them for a stable pick.
            let mut ok: Vec<AlgoPerf> = perf[..found as usize]
                .iter()
                .filter(|p| {
                    p.status == 0
                        && p.memory <= WORKSPACE_LIMIT
                        && p.time >= 0.0
                        && (!exact
                            || !matches!(
                                p.math_type,
                                TENSOR_OP_MATH | TENSOR_OP_MATH_ALLOW_CONVERSION
                            ))
                })
                .copied()
                .collect();
            let fused = (!exact && super::fuse_enabled()).then_some(ALGO_IMPLICIT_PRECOMP_GEMM);
            super::order_timed(&mut ok, |p| (p.algo, p.time), fused);
            perf[..ok.len()].copy_from_slice(&ok);
            found_ok = ok.len() as c_int;
        } else {
            found_ok = found;
        }
        // The best algorithm that fits the workspace limit and, for exact f32, does no TF32
        // (tensor-op math would round the inputs to 10 mantissa bits).
        let best = perf[..found_ok as usize]
            .iter()
            .find(|p| {
                p.status == 0
                    && p.memory <= WORKSPACE_LIMIT
                    && (!exact
                        || !matches!(
                            p.math_type,
                            TENSOR_OP_MATH | TENSOR_OP_MATH_ALLOW_CONVERSION
                        ))
            })
            .copied()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "cuDNN has no algorithm for conv x {:?} w {:?} within {} MiB of workspace",
                    k.x,
                    k.w,
                    WORKSPACE_LIMIT >> 20
                ))
            })?;
        let mut workspace = 0usize;
        let mut act = std::ptr::null_mut();
        // Safety: as above.
        unsafe {
            check(
                lib,
                "create activation",
                (lib.cudnnCreateActivationDescriptor)(&mut act),
            )?;
            let s = (lib.cudnnSetActivationDescriptor)(
                act,
                ACTIVATION_IDENTITY,
                NOT_PROPAGATE_NAN,
                0.0,
            );
            check(lib, "identity activation", s)?;
            let math = if exact {
                FMA_MATH
            } else {
                best.math_type.max(DEFAULT_MATH)
            };
            check(
                lib,
                "math type",
                (lib.cudnnSetConvolutionMathType)(conv, math),
            )?;
            let s = (lib.cudnnGetConvolutionForwardWorkspaceSize)(
                handle,
                x,
                w,
                conv,
                y,
                best.algo,
                &mut workspace,
            );
            check(lib, "workspace size", s)?;
        }
        let fuse = !exact && super::fuse_enabled() && best.algo == ALGO_IMPLICIT_PRECOMP_GEMM;
        tracing::debug!(
            "cuDNN conv{} x {:?} w {:?}: algorithm {} math {} workspace {} MiB fused {fuse} ({})",
            if k.nhwc { " NHWC" } else { "" },
            k.x,
            k.w,
            best.algo,
            best.math_type,
            workspace >> 20,
            if probe.is_some() {
                "timed"
            } else {
                "heuristic"
            }
        );
        Ok(Plan {
            x,
            w,
            y,
            bias,
            conv,
            act,
            algo: best.algo,
            workspace,
            fuse,
        })
    }

    pub(super) struct Conv {
        pub pad: usize,
        pub stride: usize,
        pub nhwc: bool,
        /// Added to the output (contiguous, the output's shape and dtype).
        pub z: Option<candle_core::Tensor>,
    }

    /// A 4-d shape in cuDNN's (n, c, h, w) order: NHWC tensors and OHWI filters are permuted.
    fn dims(l: &Layout, nhwc: bool) -> candle_core::Result<[c_int; 4]> {
        let (a, b, c, d) = l.shape().dims4()?;
        let d4 = [a as c_int, b as c_int, c as c_int, d as c_int];
        Ok(if nhwc {
            [d4[0], d4[3], d4[1], d4[2]]
        } else {
            d4
        })
    }

    impl CustomOp3 for Conv {
        fn name(&self) -> &'static str {
            "arpg-cudnn-conv2d"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("arpg-cudnn-conv2d: CUDA only")
        }

        /// Long (~210 lines) for the reason `plan` is: shape checks, the cached plan, then the
        /// fused call and its fallback as FFI calls over the same borrowed device pointers,
        /// whose guards must outlive every call.
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let lib = library().ok_or_else(|| candle_core::Error::Msg("cuDNN missing".into()))?;
            let (xd, wd) = (dims(xl, self.nhwc)?, dims(wl, self.nhwc)?);
            if xd[1] != wd[1] || wd[2] != wd[3] || bl.shape().elem_count() != wd[0] as usize {
                candle_core::bail!(
                    "cuDNN conv: x {:?}, w {:?}, b {:?}",
                    xl.shape(),
                    wl.shape(),
                    bl.shape()
                );
            }
            let off = |l: &Layout| {
                l.contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("cuDNN conv: strided input".into()))
            };
            let (xo, wo, bo) = (off(xl)?, off(wl)?, off(bl)?);
            let dt = match x.dtype() {
                DType::F32 => DT_FLOAT,
                DType::BF16 => DT_BFLOAT16,
                DType::F16 => DT_HALF,
                other => candle_core::bail!("cuDNN conv: {other:?}"),
            };
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            let key = Key {
                ordinal: stream.context().ordinal(),
                dtype: dt,
                x: xd,
                w: wd,
                pad: self.pad as c_int,
                stride: self.stride as c_int,
                tf32: super::allow_tf32(),
                nhwc: self.nhwc,
            };
            let (pad, st) = (key.pad, key.stride);
            let oh = ((xd[2] + 2 * pad - wd[2]) / st + 1) as usize;
            let ow = ((xd[3] + 2 * pad - wd[3]) / st + 1) as usize;
            let out_shape = if self.nhwc {
                Shape::from((xd[0] as usize, oh, ow, wd[0] as usize))
            } else {
                Shape::from((xd[0] as usize, wd[0] as usize, oh, ow))
            };
            let z = match &self.z {
                Some(z) => {
                    if z.shape() != &out_shape {
                        candle_core::bail!("cuDNN conv: z {:?}, output {out_shape:?}", z.shape());
                    }
                    Some(z.storage_and_layout())
                }
                None => None,
            };
            let z = match &z {
                Some((s, l)) => match &**s {
                    candle_core::Storage::Cuda(c) => Some((c, off(l)?)),
                    _ => candle_core::bail!("cuDNN conv: z is not on the GPU"),
                },
                None => None,
            };
            let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
            let st = &mut *guard;
            let handle = match st.handles.get(&dev.id()) {
                Some(h) => *h,
                None => {
                    let mut h = std::ptr::null_mut();
                    // Safety: writes a new handle.
                    check(lib, "create handle", unsafe { (lib.cudnnCreate)(&mut h) })?;
                    st.handles.insert(dev.id(), h);
                    h
                }
            };
            // Safety: the handle is only used under the lock, on candle's stream.
            check(lib, "set stream", unsafe {
                (lib.cudnnSetStream)(handle, stream.cu_stream() as *mut c_void)
            })?;
            let one = 1f32;
            let zero = 0f32;
            macro_rules! run {
                ($t:ty) => {{
                    let xs = x.as_cuda_slice::<$t>()?.slice(xo.0..xo.1);
                    let ws = w.as_cuda_slice::<$t>()?.slice(wo.0..wo.1);
                    let bs = b.as_cuda_slice::<$t>()?.slice(bo.0..bo.1);
                    let zs = match z {
                        Some((zc, zo)) => Some(zc.as_cuda_slice::<$t>()?.slice(zo.0..zo.1)),
                        None => None,
                    };
                    // Safety: cuDNN writes every output element (beta = 0).
                    let mut y = unsafe { dev.alloc::<$t>(out_shape.elem_count()) }?;
                    {
                        let (xp, _gx) = xs.device_ptr(&stream);
                        let (wp, _gw) = ws.device_ptr(&stream);
                        let (bp, _gb) = bs.device_ptr(&stream);
                        let zp = zs.as_ref().map(|z| z.device_ptr(&stream));
                        let (yp, _gy) = y.device_ptr_mut(&stream);
                        if !st.plans.contains_key(&key) {
                            let p = if find() {
                                let mut probe_ws = unsafe { dev.alloc::<u8>(WORKSPACE_LIMIT) }?;
                                let (pp, _gp) = probe_ws.device_ptr_mut(&stream);
                                let probe = Probe {
                                    x: xp as *const c_void,
                                    w: wp as *const c_void,
                                    y: yp as *mut c_void,
                                    work: pp as *mut c_void,
                                    work_size: WORKSPACE_LIMIT,
                                };
                                plan(lib, handle, &key, Some(&probe))?
                            } else {
                                plan(lib, handle, &key, None)?
                            };
                            st.plans.insert(key, p);
                        }
                        let p = st.plans.get_mut(&key).expect("inserted above");
                        let mut work = unsafe { dev.alloc::<u8>(p.workspace.max(1)) }?;
                        let (kp, _gk) = work.device_ptr_mut(&stream);
                        let ptr = |v: &f32| v as *const f32 as *const c_void;
                        // Safety: the descriptors describe these buffers (shapes checked above);
                        // alpha/beta are f32, as cuDNN wants for f32, bf16 and f16 data. Without
                        // `z`, the fused call reads y as z with alpha2 = 0 (as TensorFlow does).
                        unsafe {
                            let (z_ptr, alpha2) = match &zp {
                                Some((zp, _)) => (*zp as *const c_void, &one),
                                None => (yp as *const c_void, &zero),
                            };
                            let fused = p.fuse.then(|| {
                                (lib.cudnnConvolutionBiasActivationForward)(
                                    handle,
                                    ptr(&one),
                                    p.x,
                                    xp as *const c_void,
                                    p.w,
                                    wp as *const c_void,
                                    p.conv,
                                    p.algo,
                                    kp as *mut c_void,
                                    p.workspace,
                                    ptr(alpha2),
                                    p.y,
                                    z_ptr,
                                    p.bias,
                                    bp as *const c_void,
                                    p.act,
                                    p.y,
                                    yp as *mut c_void,
                                )
                            });
                            if let Some(s) = fused.filter(|&s| s != 0) {
                                p.fuse = false;
                                let msg = CStr::from_ptr((lib.cudnnGetErrorString)(s));
                                tracing::warn!(
                                    "cuDNN refused the fused bias for conv x {:?} w {:?} ({}); \
                                     adding it separately",
                                    key.x,
                                    key.w,
                                    msg.to_string_lossy()
                                );
                            }
                            if fused != Some(0) {
                                let s = (lib.cudnnConvolutionForward)(
                                    handle,
                                    ptr(&one),
                                    p.x,
                                    xp as *const c_void,
                                    p.w,
                                    wp as *const c_void,
                                    p.conv,
                                    p.algo,
                                    kp as *mut c_void,
                                    p.workspace,
                                    ptr(&zero),
                                    p.y,
                                    yp as *mut c_void,
                                );
                                check(lib, "convolution", s)?;
                                let s = (lib.cudnnAddTensor)(
                                    handle,
                                    ptr(&one),
                                    p.bias,
                                    bp as *const c_void,
                                    ptr(&one),
                                    p.y,
                                    yp as *mut c_void,
                                );
                                check(lib, "bias", s)?;
                                if let Some((zp, _)) = &zp {
                                    let s = (lib.cudnnAddTensor)(
                                        handle,
                                        ptr(&one),
                                        p.y,
                                        *zp as *const c_void,
                                        ptr(&one),
                                        p.y,
                                        yp as *mut c_void,
                                    );
                                    check(lib, "residual", s)?;
                                }
                            }
                        }
                    }
                    CudaStorage::wrap_cuda_slice(y, dev.clone())
                }};
            }
            let out = match x.dtype() {
                DType::F32 => run!(f32),
                DType::BF16 => run!(half::bf16),
                DType::F16 => run!(half::f16),
                _ => unreachable!("dtype checked above"),
            };
            Ok((out, out_shape))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::order_timed;

    fn order(timed: &[(i32, f32)], fused: Option<i32>) -> Vec<i32> {
        let mut t = timed.to_vec();
        order_timed(&mut t, |p| *p, fused);
        t.iter().map(|p| p.0).collect()
    }

    #[test]
    fn near_ties_go_to_the_lowest_algorithm_and_the_fused_one_wins_within_its_slack() {
        // 7 is fastest; 0 within 15% of it; 1 within 1.5x; 6 beyond.
        let timed = [(7, 1.0), (0, 1.1), (1, 1.4), (6, 1.6)];
        assert_eq!(order(&timed, None), [0, 7, 1, 6]);
        assert_eq!(order(&timed, Some(1)), [1, 0, 7, 6]);
        // Too slow to be worth its saved bias pass.
        let slow = [(7, 1.0), (0, 1.1), (1, 1.7)];
        assert_eq!(order(&slow, Some(1)), [0, 7, 1]);
        assert_eq!(order(&[], Some(1)), Vec::<i32>::new());
    }
}
