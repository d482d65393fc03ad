#!/usr/bin/env bash
# One device call on the H200: GPU parity, then our sampler and the reference PyTorch sampler
# timed in the same command on random weights, then one table.
#   device run, carry [".bin/arpg.xz", ".bin/ref", ".whl"]:  bash scripts/gpu-bench.sh [quick]
# .bin/arpg.xz comes from scripts/build-cuda.sh; .bin/ref/arpg.py is the paper's models/arpg.py
# (fetched, never committed); .whl holds the einops wheel the reference imports.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
export CUDA_CACHE_MAXSIZE=4294967296   # keep the driver's JIT of candle's PTX between runs
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
A=/tmp/arpg; xz -dc .bin/arpg.xz > $A && chmod +x $A
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
MODE=${1:-full}
peak() { # peak nvidia-smi memory (MiB) while running "$@"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem.txt" & local p=$!
  "$@"; local rc=$?; kill $p; wait $p 2>/dev/null
  echo "peak_mib $(sort -n "$OUT/mem.txt" | tail -1)"; return $rc
}
t0=$(date +%s)
echo "== warm-up (driver JIT of the kernels)"; time $A check-parity --device cuda:0 --dtype f32
echo "== parity"; $A check-parity --device cuda:0 --dtype bf16; $A check-parity --device cuda:0 --dtype f16
if [ "$MODE" = quick ]; then
  peak timeout 300 $A bench --model ARPG-L --init random --batch-size 64 --steps 8 --warmup 1 --repeats 1 --device cuda:0 --dtype bf16 --json
  exit 0
fi
for m in ARPG-L ARPG-XL ARPG-XXL; do
  extra=""; [ $m = ARPG-L ] && extra="--vq --train"
  for s in 64 32; do
    echo "== ours $m $s"; peak timeout 400 $A bench --model $m --init random --batch-size 64 --steps $s --warmup 1 --repeats 3 --device cuda:0 --dtype bf16 --json $extra | tee -a "$OUT/ours.jsonl"; extra=""
  done
  if [ $m = ARPG-L ]; then  # the same without CUDA graphs: what the graphs buy
    echo "== ours $m 64 eager"; peak timeout 400 $A bench --model $m --init random --batch-size 64 --steps 64 --warmup 1 --repeats 3 --device cuda:0 --dtype bf16 --json --no-cuda-graph | tee -a "$OUT/ours.jsonl"
  fi
  echo "== reference $m"; t=""; [ $m = ARPG-L ] && t="--train"
  peak timeout 400 python3 scripts/bench_reference.py --ref .bin/ref --model $m --steps 64 32 $t | tee -a "$OUT/ref.jsonl"
  echo "elapsed $(( $(date +%s) - t0 ))s"
done
