#!/usr/bin/env bash
# Build the CUDA `arpg` binary on a machine without a GPU or a CUDA toolkit
# (see shared/docs/gpu.md). Idempotent: a second run only rebuilds what changed.
#
#   scripts/build-cuda.sh            # cargo build --release -p arpg-cli --features cuda
#   scripts/build-cuda.sh --nccl     # same with --features nccl (+ the NCCL wheel)
#   scripts/build-cuda.sh -j 1       # cargo jobs (default 2); also caps parallel nvcc
#   scripts/build-cuda.sh --setup-only   # install the toolchain + lib dir, no cargo build
#   scripts/build-cuda.sh --probe    # build .bin/cuda-probe instead: a tiny crate outside the
#                                    # workspace (candle only: curand, cuBLAS, kernels, bf16
#                                    # matmul TFLOP/s) to check the toolchain and the link
#                                    # even while the workspace does not compile
#
# Result: .bin/arpg (stripped). Everything else lives in git-ignored folders:
#   .cuda/venv   Python venv with the pinned CUDA 13.0 wheels (nvcc, cudart, cublas, ...)
#   .cuda/lib    libX.so symlinks + a stub libcuda.so.1 (link time only; the GPU
#                machine's real driver is used at run time)
#   target-cuda  cargo target dir (kept apart from target/ so CPU builds stay warm)
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

ORIG_ARGS=("$@")
NCCL=0
JOBS=2
SETUP_ONLY=0
PROBE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nccl) NCCL=1 ;;
    -j) JOBS="$2"; shift ;;
    -j*) JOBS="${1#-j}" ;;
    --setup-only) SETUP_ONLY=1 ;;
    --probe) PROBE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CUDA_DIR="$ROOT/.cuda"
VENV="$CUDA_DIR/venv"
LIB="$CUDA_DIR/lib"
TARGET_DIR="$ROOT/target-cuda"
T0=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# Pinned to CUDA 13.0: the GPU machine's driver (580 / CUDA 13.0) refuses PTX from a
# newer nvcc, and candle's build panics on 13.5 (shared/docs/gpu.md).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
# 2.28.9 is the newest nvidia-nccl-cu13 compiled with CUDA 13.0 (2.29.7 says 13.2,
# 2.30.7 says 13.3). It lands in site-packages/nvidia/nccl/lib, not nvidia/cu13.
NCCL_WHEEL=nvidia-nccl-cu13==2.28.9
[ "$NCCL" = 1 ] && WHEELS+=("$NCCL_WHEEL")

# ---------------------------------------------------------------- 1. toolchain
step "Python venv + pinned CUDA wheels in .cuda/venv"
grep -qx '/.cuda/' .gitignore || echo "warning: .gitignore has no '/.cuda/' line" >&2
mkdir -p "$CUDA_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$CUDA_DIR/wheels.installed"
WANT="$(printf '%s\n' "${WHEELS[@]}")"
# Skip pip when every wanted pin is already recorded as installed.
if [ -f "$STAMP" ] && [ -z "$(comm -23 <(sort <<<"$WANT") <(sort "$STAMP"))" ]; then
  echo "wheels already installed (delete $STAMP to force pip)"
else
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${WHEELS[@]}"
  sort -u <(printf '%s\n' "$WANT") <([ -f "$STAMP" ] && cat "$STAMP" || true) > "$STAMP.tmp"
  mv "$STAMP.tmp" "$STAMP"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU13="$SITE/nvidia/cu13"
NCCL_LIBDIR="$SITE/nvidia/nccl/lib"
for f in bin/nvcc bin/ptxas bin/fatbinary nvvm/bin/cicc include/cuda.h include/cccl lib/libcudart.so.13; do
  [ -e "$CU13/$f" ] || { echo "missing $CU13/$f: the wheels' layout changed" >&2; exit 1; }
done
# nvcc finds cicc/libdevice (nvvm/) and crt/ through bin/nvcc.profile relative to itself.
NVCC_VERSION="$("$CU13/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*')"
echo "nvcc: $NVCC_VERSION  ($CU13/bin/nvcc)"
case "$NVCC_VERSION" in
  "release 13.0,"*) ;;
  *) echo "nvcc must be CUDA 13.0 for the GPU machine's driver" >&2; exit 1 ;;
esac

# ---------------------------------------------------------------- 2. link dir
step "link dir .cuda/lib (libX.so symlinks + stub libcuda.so.1)"
mkdir -p "$LIB"
LIBDIRS=("$CU13/lib")
[ "$NCCL" = 1 ] && LIBDIRS+=("$NCCL_LIBDIR")
for d in "${LIBDIRS[@]}"; do
  for f in "$d"/lib*.so.*; do
    [ -e "$f" ] || continue
    name="$(basename "$f")"
    ln -sfn "$f" "$LIB/$name"            # libcublas.so.13 (for DT_NEEDED lookups)
    ln -sfn "$f" "$LIB/${name%%.so.*}.so" # libcublas.so    (for -lcublas)
  done
done

# The stub driver library. candle-core 0.11.1 enables cudarc's `dynamic-linking`, so
# every cu* function that the final binary calls is an undefined symbol resolved
# against libcuda.so at link time. Define all the driver functions of cudarc's
# bindings (plus any listed in .cuda/stub-extra-symbols). The bodies return
# CUDA_ERROR_STUB_LIBRARY (34) so that using the stub by mistake fails cleanly.
CUDARC_VER="$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)"
[ -n "$CUDARC_VER" ] || { echo "cudarc not found in Cargo.lock" >&2; exit 1; }
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
find_cudarc() { ls -d "$CARGO_HOME"/registry/src/*/cudarc-"$CUDARC_VER" 2>/dev/null | head -1; }
CUDARC_SRC="$(find_cudarc)"
if [ -z "$CUDARC_SRC" ]; then
  cargo fetch -q
  CUDARC_SRC="$(find_cudarc)"
fi
DRIVER_SYS="$CUDARC_SRC/src/driver/sys/mod.rs"
[ -f "$DRIVER_SYS" ] || { echo "cannot find cudarc $CUDARC_VER driver bindings" >&2; exit 1; }
EXTRA_SYMS="$CUDA_DIR/stub-extra-symbols"
touch "$EXTRA_SYMS"
SYMS="$( { grep -oE '\bfn cu[A-Z][A-Za-z0-9_]* *\(' "$DRIVER_SYS" | sed -E 's/^fn //; s/ *\($//'; \
           grep -oE '^cu[A-Z][A-Za-z0-9_]*$' "$EXTRA_SYMS" || true; } \
         | grep -vxE 'cuGetErrorString|cuGetErrorName' | sort -u)"
{
  echo "/* Generated by scripts/build-cuda.sh from cudarc $CUDARC_VER: link-time stub only. */"
  echo 'static const char stub_msg[] = "stub libcuda.so.1 (no CUDA driver)";'
  echo 'int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = stub_msg; return 0; }'
  echo 'int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
  while read -r s; do echo "int $s(void) { return 34; }"; done <<<"$SYMS"
} > "$LIB/cuda_stub.c.new"
if ! cmp -s "$LIB/cuda_stub.c.new" "$LIB/cuda_stub.c" || [ ! -f "$LIB/libcuda.so.1" ]; then
  mv "$LIB/cuda_stub.c.new" "$LIB/cuda_stub.c"
  gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$LIB/libcuda.so.1" "$LIB/cuda_stub.c"
  echo "built stub libcuda.so.1 with $(( $(wc -l <<<"$SYMS") + 2 )) cu* symbols"
else
  rm -f "$LIB/cuda_stub.c.new"
  echo "stub libcuda.so.1 up to date ($(( $(wc -l <<<"$SYMS") + 2 )) cu* symbols)"
fi
ln -sfn libcuda.so.1 "$LIB/libcuda.so"

# ---------------------------------------------------------------- 3. build
export PATH="$CU13/bin:$PATH"
export CUDA_HOME="$CU13"
export CUDA_COMPUTE_CAP=90                 # H200; no nvidia-smi here
export LIBRARY_PATH="$LIB${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDAFORGE_THREADS="$JOBS"           # parallel nvcc in candle-kernels' build script
export CARGO_TARGET_DIR="$TARGET_DIR"
FEATURE=cuda
[ "$NCCL" = 1 ] && FEATURE=nccl

if [ "$SETUP_ONLY" = 1 ]; then
  step "setup done; to build by hand:"
  echo "  PATH=$CU13/bin:\$PATH CUDA_HOME=$CU13 CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$LIB CARGO_TARGET_DIR=$TARGET_DIR \\"
  echo "    cargo build --release -p arpg-cli --bin arpg --features $FEATURE"
  exit 0
fi

BIN=arpg
CARGO_ARGS=(build --release -p arpg-cli --bin arpg --features "$FEATURE" -j "$JOBS")
if [ "$PROBE" = 1 ]; then
  # Same candle versions as the workspace (copied Cargo.lock) and the same target dir,
  # so the probe reuses the workspace's compiled candle/cudarc/kernels.
  BIN=cuda-probe
  P="$CUDA_DIR/probe"
  mkdir -p "$P/src"
  cat > "$P/Cargo.toml.new" <<'TOML'
[package]
name = "cuda-probe"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[features]
cuda = []
nccl = ["candle-core/nccl"]

[dependencies]
candle-core = { version = "0.11.1", features = ["cuda"] }
candle-nn = { version = "0.11.1", features = ["cuda"] }

[profile.release]
debug = false
codegen-units = 16
TOML
  cat > "$P/src/main.rs.new" <<'RUST'
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::new_cuda(0)?;
    let a = Tensor::randn(0f32, 1., (1024, 1024), &dev)?; // cuRAND
    let b = a.matmul(&a.t()?)?; // cuBLAS
    let s = candle_nn::ops::softmax_last_dim(&b)?; // candle kernels (PTX)
    let total = s.sum_all()?.to_scalar::<f32>()?;
    println!("softmax rows sum to {total} (expect 1024)");
    #[cfg(feature = "nccl")]
    {
        let id = candle_core::cuda_backend::cudarc::nccl::safe::Id::new()
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        println!("nccl unique id ok: {:?}", &id.internal()[..8]);
    }
    let n = 8192usize;
    let x = Tensor::randn(0f32, 1., (n, n), &dev)?.to_dtype(DType::BF16)?;
    x.matmul(&x)?;
    dev.synchronize()?;
    let iters = 20;
    let t = Instant::now();
    for _ in 0..iters {
        x.matmul(&x)?;
    }
    dev.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let tflops = 2.0 * (n as f64).powi(3) * iters as f64 / secs / 1e12;
    println!("bf16 {n}x{n}x{n} matmul: {tflops:.0} TFLOP/s");
    Ok(())
}
RUST
  for f in Cargo.toml src/main.rs; do
    cmp -s "$P/$f.new" "$P/$f" && rm -f "$P/$f.new" || mv "$P/$f.new" "$P/$f"
  done
  cmp -s Cargo.lock "$P/Cargo.lock" || cp Cargo.lock "$P/Cargo.lock"
  CARGO_ARGS=(build --release --manifest-path "$P/Cargo.toml" --features "$FEATURE" -j "$JOBS")
fi

LOG="$CUDA_DIR/cargo-build.log"
build() {
  step "cargo ${CARGO_ARGS[*]} (CARGO_TARGET_DIR=target-cuda)"
  local rc=0
  cargo "${CARGO_ARGS[@]}" 2>&1 | tee "$LOG" || rc=$?
  return "$rc"
}
if ! build; then
  # A driver function missing from cudarc's list (or the NCCL library): add the
  # undefined cu* symbols to the stub once and retry.
  MISSING="$(grep -oE "undefined (reference to|symbol:?) \`?cu[A-Za-z0-9_]+" "$LOG" \
             | grep -oE 'cu[A-Za-z0-9_]+$' | sort -u || true)"
  if [ -n "$MISSING" ] && [ -z "${ARPG_STUB_RETRY:-}" ]; then
    echo "adding undefined driver symbols to the stub: $MISSING"
    printf '%s\n' $MISSING >> "$EXTRA_SYMS"
    ARPG_STUB_RETRY=1 exec "$0" "${ORIG_ARGS[@]}"
  fi
  echo "cargo build failed (log: $LOG)" >&2
  exit 1
fi

# ---------------------------------------------------------------- 4. result
OUT="$ROOT/.bin/$BIN"
step "copy + strip to .bin/$BIN"
mkdir -p "$ROOT/.bin"
cp -f "$TARGET_DIR/release/$BIN" "$OUT"
echo "unstripped: $(du -h "$OUT" | cut -f1)"
strip "$OUT"
echo "stripped:   $(du -h "$OUT" | cut -f1)  ($(stat -c %s "$OUT") bytes)"
echo
echo "NEEDED:"
readelf -d "$OUT" | awk '/NEEDED/ {print "  " $NF}' | tr -d '[]'
echo "ldd (here, against .cuda/lib; on the GPU machine the same names come from"
echo "     /usr/local/cuda/lib64 and the real driver from /usr/local/nvidia/lib64):"
LD_LIBRARY_PATH="$LIB" ldd "$OUT" | sed 's/^/  /'

step "done"
cat <<EOF
Run on the GPU machine (device tool, carry [".bin"]):
  LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64 .bin/$BIN ...
EOF
if [ "$NCCL" = 1 ]; then
  cat <<EOF
With --nccl the binary also needs libnccl.so.2 there (PyTorch's wheel), e.g.:
  LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:\$(python3 -c 'import nvidia.nccl as n; print(n.__path__[0])')/lib .bin/$BIN ...
EOF
fi
