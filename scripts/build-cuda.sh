#!/usr/bin/env bash
# Build the CUDA `arpg` binary on a machine without a GPU or a CUDA toolkit
# (see shared/docs/gpu.md). Idempotent: a second run only rebuilds what changed.
#
#   scripts/build-cuda.sh            # cargo build --release -p arpg-cli --features cuda
#   scripts/build-cuda.sh --nccl     # same with --features nccl (+ the NCCL wheel)
#   scripts/build-cuda.sh -j 1       # cargo jobs (default 2); also caps parallel nvcc
#   scripts/build-cuda.sh --setup-only   # install the toolchain + lib dir, no cargo build
#   scripts/build-cuda.sh --probe    # also link .bin/cuda-probe: a tiny candle program
#                                    # (cuRAND, cuBLAS, PTX kernels, bf16 matmul TFLOP/s),
#                                    # linked by rustc against target-cuda's candle rlibs,
#                                    # so it works even while the workspace doesn't compile
#
# Result: .bin/arpg (stripped, ~63 MB) and .bin/arpg.xz (~14 MB): the raw binary is too
# close to the 64 MiB that may travel to the GPU machine, so carry the .xz and unpack it
# there (the script prints the command). Everything else lives in git-ignored folders:
#   .cuda/venv   Python venv with the pinned CUDA 13.0 wheels (nvcc, cudart, cublas, ...)
#   .cuda/lib    libX.so symlinks + a stub libcuda.so.1 (link time only; the GPU
#                machine's real driver is used at run time)
#   .cuda/cargo-build.log   the last cargo output
#   target-cuda  cargo target dir (kept apart from target/ so CPU builds stay warm)
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

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
STAMP="$CUDA_DIR/wheels.installed"
if [ ! -x "$VENV/bin/python" ]; then
  rm -f "$STAMP"
  python3 -m venv "$VENV"
fi
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
# cudarc is a CUDA-only dependency: on a fresh machine it is not yet in cargo's registry,
# and under pipefail a failing `ls` would stop the script here (exit 2).
find_cudarc() { { ls -d "$CARGO_HOME"/registry/src/*/cudarc-"$CUDARC_VER" 2>/dev/null || true; } | head -1; }
CUDARC_SRC="$(find_cudarc)"
if [ -z "$CUDARC_SRC" ]; then
  echo "cudarc $CUDARC_VER not in cargo's registry yet: cargo fetch"
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
  echo "  PATH=$CU13/bin:\$PATH CUDA_HOME=$CU13 CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$LIB CUDAFORGE_THREADS=$JOBS CARGO_TARGET_DIR=$TARGET_DIR \\"
  echo "    cargo build --release -p arpg-cli --bin arpg --features $FEATURE"
  exit 0
fi

LOG="$CUDA_DIR/cargo-build.log"    # cargo's messages and rendered diagnostics
JSON="$CUDA_DIR/cargo-build.json"  # cargo's JSON messages (artifacts, build-script link paths)
build() {
  step "cargo build --release -p arpg-cli --bin arpg --features $FEATURE -j $JOBS (CARGO_TARGET_DIR=target-cuda)"
  local rc=0
  { cargo build --release -p arpg-cli --bin arpg --features "$FEATURE" -j "$JOBS" \
      --message-format=json-render-diagnostics 2>&1 1>"$JSON" | tee "$LOG"; } || rc=$?
  return "$rc"
}

# The probe: a small program linked by rustc against the candle rlibs that the workspace
# build just produced (same features, nothing recompiled), with the build scripts' link
# paths (libmoe.a of candle-kernels, the CUDA lib dir). It needs only the dependencies
# to have compiled, not the workspace's own crates.
build_probe() {
  step "link .cuda/probe/main.rs against target-cuda's candle"
  local P="$CUDA_DIR/probe"
  mkdir -p "$P"
  cat > "$P/main.rs" <<'RUST'
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
  local args=()
  mapfile -t args < <(python3 - "$JSON" <<'PY'
import json, sys
rlibs, paths = {}, []
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in ("candle_core", "candle_nn"):
        rlibs[m["target"]["name"]] = next(f for f in m["filenames"] if f.endswith(".rlib"))
    elif m.get("reason") == "build-script-executed":
        paths += [p for p in m["linked_paths"] if p not in paths]
if len(rlibs) != 2:
    sys.exit("candle_core/candle_nn were not built: see the cargo log")
for name, rlib in sorted(rlibs.items()):
    print("--extern"); print(f"{name}={rlib}")
for p in paths:
    print("-L"); print(p)
PY
  )
  [ "${#args[@]}" -gt 0 ] || return 1
  [ "$NCCL" = 1 ] && args+=(--cfg 'feature="nccl"')
  local rc=0
  rustc --edition 2021 -C opt-level=3 -C codegen-units=16 --crate-type bin --crate-name cuda_probe \
    -o "$TARGET_DIR/release/cuda-probe" "$P/main.rs" -L "dependency=$TARGET_DIR/release/deps" \
    "${args[@]}" 2>&1 | tee -a "$LOG" || rc=$?
  return "$rc"
}

BUILD_OK=1
build || BUILD_OK=0
PROBE_OK=1
if [ "$PROBE" = 1 ]; then build_probe || PROBE_OK=0; fi
if [ "$BUILD_OK" = 0 ] || [ "$PROBE_OK" = 0 ]; then
  # A driver function missing from cudarc's list: add the undefined cu* symbols to the
  # stub once and retry.
  MISSING="$(grep -oE "undefined (reference to|symbol:?) \`?cu[A-Z][A-Za-z0-9_]+" "$LOG" \
             | grep -oE 'cu[A-Z][A-Za-z0-9_]+$' | sort -u || true)"
  if [ -n "$MISSING" ] && [ -z "${ARPG_STUB_RETRY:-}" ]; then
    echo "adding undefined driver symbols to the stub: $MISSING"
    printf '%s\n' $MISSING >> "$EXTRA_SYMS"
    ARPG_STUB_RETRY=1 exec "$0" "${ORIG_ARGS[@]}"
  fi
fi
if [ "$BUILD_OK" = 0 ]; then
  if grep -qE '^error.*could not compile `arpg(-cli)?`' "$LOG" \
     && ! grep -qE '^error.*could not compile `(candle|cudarc)' "$LOG"; then
    echo "cargo build failed in the workspace's own crates (log: $LOG); the CUDA" >&2
    echo "dependencies are built in target-cuda (try --probe to check the toolchain)." >&2
  else
    echo "cargo build failed (log: $LOG)" >&2
  fi
  [ "$PROBE" = 1 ] && [ "$PROBE_OK" = 1 ] || exit 1
fi
[ "$PROBE_OK" = 1 ] || { echo "probe link failed (log: $LOG)" >&2; exit 1; }

# ---------------------------------------------------------------- 4. result
# The stripped binary is ~63 MB, mostly candle-kernels' GGUF/MoE fatbins (libmoe.a,
# registered by static constructors, so the linker keeps them): too close to the
# 64 MiB that may travel to the GPU machine. xz makes it ~14 MB: carry the .xz.
TRAVEL_LIMIT=$((64 * 1024 * 1024))
WORKTREE_BYTES="$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)"
publish() {
  local bin="$1" src="$TARGET_DIR/release/$1" out="$ROOT/.bin/$1"
  step "copy + strip + xz to .bin/$bin"
  mkdir -p "$ROOT/.bin"
  if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
    cp -f "$src" "$out"
    echo "unstripped: $(du -h "$out" | cut -f1)"
    strip "$out"
  fi
  if [ ! -f "$out.xz" ] || [ "$out" -nt "$out.xz" ]; then
    # -1: ~15 s for ~14 MB; -6 saves 2 MB for 4x the time.
    xz -1 -T"$JOBS" -c "$out" > "$out.xz.tmp" && mv "$out.xz.tmp" "$out.xz"
  fi
  local raw xzb
  raw=$(stat -c %s "$out"); xzb=$(stat -c %s "$out.xz")
  printf 'stripped:   %s  (%d bytes)\nxz:         %s  (%d bytes)\n' \
    "$(du -h "$out" | cut -f1)" "$raw" "$(du -h "$out.xz" | cut -f1)" "$xzb"
  printf 'travel:     work tree %d MiB + .bin/%s.xz %d MiB = %d MiB (limit 64 MiB)\n' \
    $((WORKTREE_BYTES >> 20)) "$bin" $((xzb >> 20)) $(((WORKTREE_BYTES + xzb) >> 20))
  if [ $((WORKTREE_BYTES + raw)) -ge "$TRAVEL_LIMIT" ]; then
    echo "            (the uncompressed binary would NOT fit: carry .bin/$bin.xz, not .bin)"
  fi
  echo
  echo "NEEDED:"
  readelf -d "$out" | awk '/NEEDED/ {print "  " $NF}' | tr -d '[]'
  echo "ldd (here, against .cuda/lib; on the GPU machine the same names come from"
  echo "     /usr/local/cuda/lib64 and the real driver from /usr/local/nvidia/lib64):"
  LD_LIBRARY_PATH="$LIB" ldd "$out" | sed 's/^/  /'
}
BINS=()
[ "$BUILD_OK" = 1 ] && BINS+=(arpg)
[ "$PROBE" = 1 ] && BINS+=(cuda-probe)
for b in "${BINS[@]}"; do publish "$b"; done

step "done"
LDP=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
[ "$NCCL" = 1 ] && LDP="$LDP:\$(python3 -c 'import nvidia.nccl as n; print(n.__path__[0])')/lib"
CARRY="$(printf '".bin/%s.xz", ' "${BINS[@]}")"
echo "Run on the GPU machine: device tool with carry [${CARRY%, }] and"
for b in "${BINS[@]}"; do
  echo "  xz -dc .bin/$b.xz > .bin/$b && chmod +x .bin/$b"
done
echo "  LD_LIBRARY_PATH=$LDP .bin/${BINS[0]} ..."
[ "$NCCL" = 1 ] && echo "(libnccl.so.2 comes from the GPU machine's PyTorch wheel nvidia-nccl-cu13)"
[ "$BUILD_OK" = 1 ] || exit 1
