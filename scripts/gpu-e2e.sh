#!/usr/bin/env bash
# One device call on the H200: images out, end to end (issue #12). Ours and the paper's
# sampling loop (scripts/bench_reference_e2e.py) on random weights in the same command:
#   - GPU parity in f32 (VQ decode through cuDNN included), the VQ-16 decode of 64 images with
#     and without cuDNN (bf16 and f32, with the bf16-vs-f32 error and peak memory),
#   - `arpg sample-fid` images/s at 64 and 32 steps, PNGs off and on,
#   - the reference loop (generate bf16 -> decode_code f32/cuDNN -> uint8 host), PNGs off and on.
#   device run, carry [".bin/arpg.xz", ".bin/ref"]:  bash scripts/gpu-e2e.sh [MODELS...]
# .bin/ref holds the paper's models/arpg.py and models/vq_model.py (fetched, never committed).
set -uo pipefail
CUDNN_LIB="$(python3 -c 'import nvidia.cudnn as c; print(list(c.__path__)[0])')/lib"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:$CUDNN_LIB
export CUDA_CACHE_MAXSIZE=4294967296
OUT=${OUT:-/tmp/gpu-e2e}; mkdir -p "$OUT"
A=/tmp/arpg; xz -dc .bin/arpg.xz > $A && chmod +x $A
MODELS=("$@"); [ ${#MODELS[@]} -eq 0 ] && MODELS=(ARPG-L)
N=${N:-1280}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
el() { echo "   [elapsed $(( $(date +%s) - t0 ))s]"; }
echo "== parity f32 (warm-up: driver JIT)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -25; el
vqb() { # label, then VAR=VALUE... and bench flags: the VQ-16 decode of 64 images
  local l=$1; shift; local envs=(); while [[ "${1:-}" == *=* ]]; do envs+=("$1"); shift; done
  echo "== VQ decode $l"
  env "${envs[@]}" timeout 300 $A bench --model ARPG-L --init random --batch-size 64 --steps 8 \
    --warmup 1 --repeats 3 --device cuda:0 --vq --json "$@" | tee -a "$OUT/vq.jsonl"
}
vqb "bf16 cuDNN heuristics" ARPG_NO_CUDNN=0 --dtype bf16
vqb "bf16 cuDNN timed (FIND)" ARPG_CUDNN_FIND=1 --dtype bf16
vqb "bf16 candle im2col" ARPG_NO_CUDNN=1 --dtype bf16
vqb "f32 cuDNN exact" ARPG_NO_CUDNN=0 --dtype f32
vqb "f32 cuDNN TF32 timed" ARPG_CUDNN_FIND=1 ARPG_CUDNN_TF32=1 --dtype f32
vqb "bf16 cuDNN timed, per part (synchronises per op)" ARPG_CUDNN_FIND=1 ARPG_PROFILE=1 --dtype bf16 --no-cuda-graph --repeats 1
el
fid() { # model steps png? [flags]
  local d=/tmp/fid-$1-$2-$3; rm -rf $d
  local png="--no-png"; [ "$3" = png ] && png=""
  echo "== ours sample-fid $1 steps $2 $3 ${4:-} (ARPG_CUDNN_FIND=${ARPG_CUDNN_FIND:-0})"
  timeout 400 $A sample-fid ${4:-} --model $1 --init random --num-samples $N --per-class 1 --batch-size 64 \
    --shard-size $N --steps $2 --cfg 4.0 --device cuda:0 --dtype bf16 $png --out $d 2>&1 | grep -E "images/s|error|Error" ; el
}
for m in "${MODELS[@]}"; do
  for s in 64 32; do fid $m $s nopng; done
  [ $m = ARPG-L ] && for s in 64 32; do fid $m $s nopng --no-overlap; done
  [ $m = ARPG-L ] && for s in 64 32; do ARPG_CUDNN_FIND=1 fid $m $s nopng; done
  fid $m 64 png
  echo "== reference $m"
  timeout 500 python3 scripts/bench_reference_e2e.py --ref .bin/ref --model $m --steps 64 32 --images $N | tee -a "$OUT/ref.jsonl"; el
  if [ $m = ARPG-L ]; then
    echo "== reference $m with PNGs"
    timeout 300 python3 scripts/bench_reference_e2e.py --ref .bin/ref --model $m --steps 64 --images $N --png /tmp/refpng | tee -a "$OUT/ref.jsonl"; el
  fi
done
