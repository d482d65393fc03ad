#!/usr/bin/env bash
# The hand-written training step on one H200, against candle's autograd and the reference
# PyTorch step in the same command: parity (gradients on ARPG-L-shaped layers, f32 and bf16),
# ARPG-L step time and peak memory at batch 64 (and 128) both ways, the reference's eager
# (and, with COMPILE=1, torch.compile) step, then a per-kernel ncu window of one hand step.
# With .bin/rtt holding a trace of crates/arpg/examples/reference_train_trace.rs, also the
# reference's training step on it against both of our steps (CPU, f32).
#   device run, carry [".bin/arpg.xz", ".bin/ref", ".bin/rtt"]:
#     BATCHES="64 128" COMPILE=1 MODELS="ARPG-XL ARPG-XXL" bash scripts/gpu-train-step.sh [ncu]
# (autograd is timed at batch 64 only unless AUTOGRAD_ALL=1)
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
# An NCCL build (scripts/build-cuda.sh --nccl) finds libnccl.so.2 in PyTorch's wheel.
NCCL_LIB=$(python3 -c 'import nvidia.nccl as n; print(n.__path__[0])' 2>/dev/null) &&
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$NCCL_LIB/lib
export CUDA_CACHE_MAXSIZE=4294967296
OUT=${OUT:-/tmp/train-step}; mkdir -p "$OUT"
A=/tmp/arpg; [ -x $A ] || { xz -dc .bin/arpg.xz > $A && chmod +x $A; }
t0=$(date +%s); el() { echo "   [elapsed $(( $(date +%s) - t0 ))s]"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for d in f32 bf16; do
  echo "== check-parity $d"
  $A check-parity --device cuda:0 --dtype $d > "/tmp/parity-$d.json" 2> "/tmp/parity-$d.err"
  echo "rc $?"; grep -o '"hand_step":{[^}]*}' "/tmp/parity-$d.json" | cut -c1-700
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("fused_train_ops", j.get("fused_train_ops_rel_diff")); print("nccl_buckets_max_diff", j.get("nccl_buckets_max_diff"))' "/tmp/parity-$d.json"
  grep -o '"fused_decode_ops_rel_diff":[^]]*]*' "/tmp/parity-$d.json" | cut -c1-300
  grep -o '"greedy_equal[^]]*]' "/tmp/parity-$d.json"; tail -2 "/tmp/parity-$d.err"
done; el
B="$A bench --model ARPG-L --init random --device cuda:0 --dtype bf16 --json --train --train-only --warmup 1"
for bs in ${BATCHES:-64}; do
  kinds="hand autograd"; [ "$bs" = 64 ] || [ "${AUTOGRAD_ALL:-0}" = 1 ] || kinds=hand
  for k in $kinds; do
    echo "== ARPG-L training step, batch $bs, $k"
    $B --batch-size $bs --repeats 3 --train-step $k | tee -a "$OUT/bench.jsonl" | grep -o '"train.*'
  done
  echo "== ARPG-L training step, batch $bs, hand, phases"
  ARPG_PROFILE_STEPS=1 $B --batch-size $bs --repeats 2 --train-step hand | grep -o '"train_phases.*'
  echo "== reference, batch $bs"
  c=""; [ "${COMPILE:-0}" = 1 ] && [ "$bs" = 64 ] && c="--compile"
  timeout 400 python3 scripts/bench_reference.py --ref .bin/ref --model ARPG-L --batch-size $bs \
    --no-sample --train $c | tee -a "$OUT/bench.jsonl"
  el
done
for m in ${MODELS:-}; do
  echo "== $m training step, batch 64, hand"
  $A bench --model $m --init random --device cuda:0 --dtype bf16 --json --train --train-only \
    --warmup 1 --batch-size 64 --repeats 3 --train-step hand | tee -a "$OUT/bench.jsonl" | grep -o '"train.*'
done; el
if [ -d .bin/rtt ]; then
  echo "== 200 digits steps: the reference's training step on our trace (autograd and hand-written)"
  timeout 300 python3 scripts/reference_train_compare.py --ref .bin/ref --trace .bin/rtt \
    --plot "$OUT/train-vs-reference.png"; cp .bin/rtt/reference.jsonl "$OUT/" 2>/dev/null; el
fi
if [ "${1:-}" = ncu ]; then
  # Two windows of one warm hand step: its first 1,500 kernels, then the next 3,000.
  windows=${NCU_WINDOWS:-0:1500,1500:3000}
  for w in ${windows//,/ }; do
    skip=${w%:*}; count=${w#*:}
    echo "== ncu: kernels $skip.. ($count) of one warm hand step"
    timeout 200 ncu --profile-from-start off --clock-control none --csv --print-units base \
      --launch-skip $skip --launch-count $count \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      $B --batch-size 64 --repeats 1 --train-step hand > "/tmp/ncu-$skip.csv" 2> "/tmp/ncu-$skip.err"
    python3 scripts/ncu_summary.py "/tmp/ncu-$skip.csv" > "$OUT/ncu-$skip.txt"; head -30 "$OUT/ncu-$skip.txt"; el
  done
fi
