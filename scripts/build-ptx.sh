#!/usr/bin/env bash
# Rebuild crates/arpg/src/model/kernels/fused.ptx from fused.cu with the pinned CUDA 13.0 nvcc
# of scripts/build-cuda.sh (the GPU machine's driver refuses PTX from a newer toolkit).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-cuda.sh --setup-only > /dev/null
NVCC="$(ls .cuda/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)"
K=crates/arpg/src/model/kernels
"$NVCC" -ptx -O3 -arch=compute_90 "$K/fused.cu" -o "$K/fused.ptx"
echo "wrote $K/fused.ptx"
