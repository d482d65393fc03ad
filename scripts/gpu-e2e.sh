#!/usr/bin/env bash
# Images out, end to end (issue #12), on the H200: ours and the paper's sampling loop
# (scripts/bench_reference_e2e.py: generate bf16 -> vq_model.decode_code f32 with cuDNN, TF32
# allowed as sample_c2i_ddp.py sets -> uint8 on the host) on random weights, in one command.
#   device run, carry [".bin/arpg.xz", ".bin/ref"]:
#     bash scripts/gpu-e2e.sh core    # parity, VQ decode variants, bench --e2e, ARPG-L sample-fid
#                                     # (PNGs off/on, overlapped/sequential) + the reference
#     bash scripts/gpu-e2e.sh sizes   # ARPG-XL and ARPG-XXL, ours and the reference
#     bash scripts/gpu-e2e.sh final   # the short version of both (what docs/benchmarks.md shows),
#                                     # then the `arpg serve` load test (scripts/gpu-serve-load.sh)
#     bash scripts/gpu-e2e.sh nhwc    # parity (NHWC VQ), VQ decode per dtype and layout, ARPG-L
#                                     # sample-fid with bf16 and TF32 VQs + the reference
#     bash scripts/gpu-e2e.sh nhwc2   # PNGs on, ARPG-XL and ARPG-XXL, ours and the reference
#     bash scripts/gpu-e2e.sh gap     # where the pipeline's time goes: stage times, the memory
#                                     # pool kept vs released (ARPG_POOL_RELEASE=1), ncu per kernel
#                                     # of the bf16 VQ decode, training with the pool kept/released
#     bash scripts/gpu-e2e.sh vq2     # the fused conv epilogue and the faster NHWC GroupNorm: parity,
#                                     # VQ decode fused / not (ARPG_CUDNN_FUSE=0), e2e, ncu per kernel
#     bash scripts/gpu-e2e.sh sizes2  # bf16 VQ: ARPG-XL and ARPG-XXL, PNGs on, ours and the reference
#     bash scripts/gpu-e2e.sh restructure  # token generation of this build against .bin/arpg-before.xz
#                                     # (the last commit before issue #11's restructure), alternated
#     bash scripts/gpu-e2e.sh decode  # the fused decoding step: bf16 parity, ARPG-L tokens fused /
#                                     # generic, XL and XXL, the reference's tokens, ARPG-L
#                                     # sample-fid (PNGs off / on) and the reference's loop
#     bash scripts/gpu-e2e.sh decode-ncu  # ncu per kernel of two fused decoding steps (two windows)
#     bash scripts/gpu-e2e.sh control # parity, control models on CUDA (graph replay = eager,
#                                     # GPU f32 = CPU greedy tokens), ARPG-L sample-fid + reference,
#                                     # the serve load test: one short device command
# .bin/ref holds the paper's models/arpg.py and models/vq_model.py (fetched, never committed).
# cuDNN comes from the machine's PyTorch wheels (nvidia-cudnn-cu13): our binary dlopens it.
set -uo pipefail
CUDNN_LIB="$(python3 -c 'import nvidia.cudnn as c; print(list(c.__path__)[0])')/lib"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:$CUDNN_LIB
export CUDA_CACHE_MAXSIZE=4294967296
OUT=${OUT:-/tmp/gpu-e2e}; mkdir -p "$OUT"
A=/tmp/arpg; [ -x $A ] || { xz -dc .bin/arpg.xz > $A && chmod +x $A; }
MODE=${1:-core}
N=${N:-1280}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
el() { echo "   [elapsed $(( $(date +%s) - t0 ))s]"; }
bench() { # label, then VAR=VALUE... and bench flags
  local l=$1; shift; local envs=(); while [[ "${1:-}" == *=* ]]; do envs+=("$1"); shift; done
  echo "== bench $l"
  env "${envs[@]}" timeout 300 $A bench --init random --batch-size 64 --warmup 1 --device cuda:0 \
    --json "$@" | tee -a "$OUT/bench.jsonl"
}
fid() { # model steps png|nopng [flags]
  local d=/tmp/fid-$1-$2-$3; rm -rf $d
  local png="--no-png"; [ "$3" = png ] && png=""
  echo "== ours sample-fid $1 steps $2 $3 ${4:-}"
  timeout 400 $A sample-fid ${4:-} --model $1 --init random --num-samples $N --per-class 1 \
    --batch-size 64 --shard-size $N --steps $2 --cfg 4.0 --device cuda:0 --dtype bf16 $png \
    --out $d 2>&1 | grep -E "images/s|rror"; el
}
ref() { # model, then bench_reference_e2e.py flags
  local m=$1; shift
  echo "== reference $m $*"
  timeout 500 python3 scripts/bench_reference_e2e.py --ref .bin/ref --model $m --images $N "$@" \
    | tee -a "$OUT/ref.jsonl"; el
}
if [ "$MODE" = core ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -3; el
  echo "== parity bf16"; $A check-parity --device cuda:0 --dtype bf16 2>&1 | tail -3; el
  for s in 64 32; do
    bench "ARPG-L tokens + e2e, $s steps" --model ARPG-L --steps $s --repeats 3 --e2e 10
  done
  bench "VQ tf32 (default)" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16
  bench "VQ bf16" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype bf16
  bench "VQ f32 exact" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype f32
  bench "VQ bf16 without cuDNN (candle im2col, split batch)" ARPG_NO_CUDNN=1 --model ARPG-L --steps 8 --repeats 2 --vq --dtype bf16 --vq-dtype bf16
  bench "VQ tf32 per part (synchronises per op)" ARPG_PROFILE=1 --model ARPG-L --steps 2 --repeats 1 --vq --dtype bf16 --no-cuda-graph
  el
  for s in 64 32; do fid ARPG-L $s nopng; done
  for s in 64 32; do fid ARPG-L $s nopng --no-overlap; done
  fid ARPG-L 64 png
  ref ARPG-L --steps 64 32
  ref ARPG-L --steps 64 --png /tmp/refpng
elif [ "$MODE" = final ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -2; el
  for s in 64 32; do
    bench "ARPG-L tokens + e2e, $s steps" --model ARPG-L --steps $s --repeats 3 --e2e 10
  done
  bench "VQ tf32 (default)" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16
  bench "VQ bf16" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype bf16
  el
  for s in 64 32; do fid ARPG-L $s nopng; done
  N=640 fid ARPG-L 64 png
  ref ARPG-L --steps 64 32
  N=640 ref ARPG-L --steps 64 --png /tmp/refpng
  for m in ARPG-XL ARPG-XXL; do
    for s in 64 32; do N=640 fid $m $s nopng; done
    N=640 ref $m --steps 64 32
  done
  echo "== serve load test"; ARPG=$A REQUESTS=128 timeout 120 bash scripts/gpu-serve-load.sh 2>&1 | tail -12; el
elif [ "$MODE" = control ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -2; el
  C=/tmp/ctrl; rm -rf $C; mkdir -p $C
  python3 - "$C" <<'PY'
import json, sys
d = sys.argv[1]
j = json.load(open("tests/fixtures/parity-a/a.json"))
json.dump(j["vq_config"], open(f"{d}/vq.json", "w"))
small = dict(j["arpg_config"], control={"channels": 1, "patch": 2, "layers": 1, "dropout": 0.1})
json.dump(small, open(f"{d}/small.json", "w"))
large = {"dim": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 16384, "num_classes": 1000,
         "block_size": 256, "control": {"channels": 1, "patch": 16, "layers": 2, "dropout": 0.1}}
json.dump(large, open(f"{d}/large.json", "w"))
PY
  echo "== control, ARPG-L size, bf16: CUDA-graph replays vs eager (tokens of 4 batches of 16)"
  for g in graph eager; do
    flag=""; [ $g = eager ] && flag=--no-cuda-graph
    timeout 200 $A sample --config $C/large.json --init random --condition data/photos/china.jpg \
      --canny --classes 1,2,3,4 --per-class 16 --batch-size 16 --steps 64 --device cuda:0 \
      --dtype bf16 $flag --tokens-out $C/large-$g.json --out $C/o-$g 2>&1 | grep -E "images/s|rror"
  done
  cmp $C/large-graph.json $C/large-eager.json && echo "control graph replay == eager: yes"; el
  echo "== control, fixture size, f32 greedy: GPU tokens vs CPU tokens"
  for dev in cuda:0 cpu; do
    timeout 100 $A sample --config $C/small.json --init random --vq-config $C/vq.json \
      --condition data/photos/flower.jpg --canny --classes 1,2 --per-class 4 --steps 8 \
      --temperature 0 --device $dev --tokens-out $C/small-${dev%%:*}.json --out $C/s 2>&1 | grep -E "rror" || true
  done
  cmp $C/small-cuda.json $C/small-cpu.json && echo "control f32 GPU == CPU greedy: yes"; el
  for s in 64 32; do fid ARPG-L $s nopng; done
  ref ARPG-L --steps 64 32
  echo "== serve load test"; OUT=$OUT/serve ARPG=$A REQUESTS=128 timeout 150 bash scripts/gpu-serve-load.sh 2>&1 | tail -14; el
elif [ "$MODE" = nhwc ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -2; el
  echo "== parity bf16"; $A check-parity --device cuda:0 --dtype bf16 2>&1 | tail -2; el
  bench "VQ bf16 NHWC" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype bf16
  bench "VQ tf32 NHWC" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype tf32
  bench "VQ f32 exact NHWC" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype f32
  bench "VQ tf32 NCHW (before)" ARPG_VQ_LAYOUT=nchw --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype tf32
  bench "VQ bf16 NHWC per part (synchronises per op)" ARPG_PROFILE=1 --model ARPG-L --steps 2 --repeats 1 --vq --dtype bf16 --vq-dtype bf16 --no-cuda-graph
  el
  for s in 64 32; do
    bench "ARPG-L tokens + e2e bf16 VQ, $s steps" --model ARPG-L --steps $s --repeats 3 --e2e 10 --dtype bf16 --vq-dtype bf16
  done
  for s in 64 32; do fid ARPG-L $s nopng "--vq-dtype bf16"; done
  ref ARPG-L --steps 64 32
elif [ "$MODE" = nhwc3 ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -2; el
  echo "== parity bf16"; $A check-parity --device cuda:0 --dtype bf16 2>&1 | tail -2; el
  bench "VQ bf16 NHWC" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype bf16
  bench "VQ tf32 NHWC" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype tf32
  bench "VQ bf16 NHWC per part (synchronises per op)" ARPG_PROFILE=1 --model ARPG-L --steps 2 --repeats 1 --vq --dtype bf16 --vq-dtype bf16 --no-cuda-graph
  el
  for s in 64 32; do fid ARPG-L $s nopng "--vq-dtype bf16"; done
  ref ARPG-L --steps 64 32
  echo "== serve on CUDA == sample on CUDA (issue #15)"
  ARPG=$A timeout 200 bash scripts/gpu-serve-same.sh 2>&1 | tail -8; el
  N=640 fid ARPG-XL 64 nopng "--vq-dtype bf16"
  N=640 ref ARPG-XL --steps 64
  N=640 fid ARPG-L 64 png "--vq-dtype bf16"
elif [ "$MODE" = nhwc2 ]; then
  for s in 64 32; do fid ARPG-L $s nopng "--vq-dtype tf32"; done
  fid ARPG-L 64 nopng "--vq-dtype bf16 --no-overlap"
  N=640 fid ARPG-L 64 png "--vq-dtype bf16"
  N=640 ref ARPG-L --steps 64 --png /tmp/refpng
  for s in 64 32; do N=640 fid ARPG-XL $s nopng "--vq-dtype bf16"; done
  N=640 ref ARPG-XL --steps 64 32
  N=640 fid ARPG-XXL 64 nopng "--vq-dtype bf16"
  N=640 ref ARPG-XXL --steps 64
  echo "== serve on CUDA == sample on CUDA (issue #15)"
  ARPG=$A timeout 200 bash scripts/gpu-serve-same.sh 2>&1 | tail -8; el
elif [ "$MODE" = gap ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -2; el
  for s in 64 32; do
    bench "ARPG-L tokens + e2e bf16 VQ, $s steps" --model ARPG-L --steps $s --repeats 3 --e2e 10 --dtype bf16 --vq-dtype bf16
  done
  bench "ARPG-L tokens + e2e bf16 VQ, 32 steps, pool released" ARPG_POOL_RELEASE=1 --model ARPG-L --steps 32 --repeats 3 --e2e 10 --dtype bf16 --vq-dtype bf16
  for s in 64 32; do fid ARPG-L $s nopng "--vq-dtype bf16"; done
  fid ARPG-L 32 nopng "--vq-dtype bf16 --no-overlap"
  ARPG_POOL_RELEASE=1 fid ARPG-L 32 nopng "--vq-dtype bf16"
  ref ARPG-L --steps 64 32
  bench "train, pool kept" --model ARPG-L --steps 8 --repeats 3 --dtype bf16 --train
  bench "train, pool released" ARPG_POOL_RELEASE=1 --model ARPG-L --steps 8 --repeats 3 --dtype bf16 --train
  echo "== reference train"; timeout 200 python3 scripts/bench_reference.py --ref .bin/ref --model ARPG-L --steps 8 --train | tee -a "$OUT/ref.jsonl"; el
  echo "== ncu: kernels of two bf16 VQ decodes (64 images)"
  timeout 300 ncu --profile-from-start off --clock-control none --csv --print-units base \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    $A bench --init random --batch-size 64 --warmup 1 --repeats 1 --device cuda:0 --model ARPG-L \
    --steps 1 --vq --dtype bf16 --vq-dtype bf16 --no-cuda-graph --json > "$OUT/ncu-vq.csv" 2> "$OUT/ncu-vq.err"
  python3 scripts/ncu_summary.py "$OUT/ncu-vq.csv" 2 | tee "$OUT/ncu-vq-summary.txt"; tail -3 "$OUT/ncu-vq.err"; el
elif [ "$MODE" = vq2 ]; then
  echo "== parity f32 (also the driver's JIT warm-up)"; $A check-parity --device cuda:0 --dtype f32 2>&1 | tail -2; el
  echo "== parity bf16"; $A check-parity --device cuda:0 --dtype bf16 2>&1 | tail -2; el
  bench "VQ bf16 NHWC, fused epilogue" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype bf16
  bench "VQ bf16 NHWC, separate bias/residual" ARPG_CUDNN_FUSE=0 --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype bf16
  bench "VQ tf32 NHWC, fused epilogue" --model ARPG-L --steps 8 --repeats 3 --vq --dtype bf16 --vq-dtype tf32
  el
  for s in 64 32; do
    bench "ARPG-L tokens + e2e bf16 VQ, $s steps" --model ARPG-L --steps $s --repeats 3 --e2e 10 --dtype bf16 --vq-dtype bf16
  done
  for s in 64 32; do fid ARPG-L $s nopng "--vq-dtype bf16"; done
  fid ARPG-L 64 nopng "--vq-dtype tf32"
  ref ARPG-L --steps 64 32
  echo "== ncu: kernels of two bf16 VQ decodes (64 images)"
  timeout 200 ncu --profile-from-start off --clock-control none --csv --print-units base \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    $A bench --init random --batch-size 64 --warmup 1 --repeats 1 --device cuda:0 --model ARPG-L \
    --steps 1 --vq --dtype bf16 --vq-dtype bf16 --no-cuda-graph --json > "$OUT/ncu-vq.csv" 2> "$OUT/ncu-vq.err"
  python3 scripts/ncu_summary.py "$OUT/ncu-vq.csv" 2 | tee "$OUT/ncu-vq-summary.txt"; tail -3 "$OUT/ncu-vq.err"; el
elif [ "$MODE" = sizes2 ]; then
  N=640
  for s in 64 32; do fid ARPG-XL $s nopng "--vq-dtype bf16"; done
  ref ARPG-XL --steps 64 32
  fid ARPG-XXL 64 nopng "--vq-dtype bf16"
  ref ARPG-XXL --steps 64
  fid ARPG-L 64 png "--vq-dtype bf16"
  ref ARPG-L --steps 64 --png /tmp/refpng
elif [ "$MODE" = restructure ]; then
  B=/tmp/arpg-before; [ -x $B ] || { xz -dc .bin/arpg-before.xz > $B && chmod +x $B; }
  for round in 1 2; do
    for bin in $A $B; do
      for s in 64 32; do
        echo "== round $round, $bin, ARPG-L tokens, $s steps"
        timeout 120 $bin bench --init random --batch-size 64 --warmup 1 --device cuda:0 --json \
          --model ARPG-L --steps $s --repeats 3 --dtype bf16 | tee -a "$OUT/bench.jsonl"
      done
    done
  done; el
elif [ "$MODE" = decode ]; then
  # The fused decoding step: bf16 parity (its ops and a model's step logits against the generic
  # path), ARPG-L tokens fused / generic (ARPG_NO_FUSED_DECODE=1) in the same command, XL and
  # XXL, the reference's tokens, then images out: sample-fid and the reference's loop.
  echo "== parity bf16 (also the driver's JIT warm-up)"
  $A check-parity --device cuda:0 --dtype bf16 2>&1 | grep -oE '"(fused_decode_ops_rel_diff|fused_step_logits_rel_diff)":.*|parity.*'; el
  for s in 64 32; do
    bench "fused ARPG-L $s" --model ARPG-L --steps $s --repeats 5 --dtype bf16
    bench "generic ARPG-L $s" ARPG_NO_FUSED_DECODE=1 --model ARPG-L --steps $s --repeats 5 --dtype bf16
  done; el
  for m in ARPG-XL ARPG-XXL; do for s in 64 32; do
    bench "fused $m $s" --model $m --steps $s --repeats 3 --dtype bf16
  done; done; el
  echo "== reference tokens ARPG-L"
  timeout 300 python3 scripts/bench_reference.py --ref .bin/ref --model ARPG-L --steps 64 32 | tee -a "$OUT/ref.jsonl"; el
  fid ARPG-L 64 nopng "--vq-dtype bf16"
  fid ARPG-L 32 nopng "--vq-dtype bf16"
  fid ARPG-L 64 png "--vq-dtype bf16"
  ref ARPG-L --steps 64 32
elif [ "$MODE" = decode-ncu ]; then
  # Per kernel of one decoding step, from two windows of an eager fused decode (64 steps): 440
  # kernels (two steps) after 3000 (near step 14) and after 9000 (near step 41). A whole decode
  # is ~14,000 kernels: too many for ncu in one call.
  for skip in 3000 9000; do
    echo "== ncu: two fused bf16 ARPG-L decoding steps after kernel $skip"
    timeout 150 ncu --profile-from-start off --clock-control none --csv --print-units base \
      --launch-skip $skip --launch-count 440 \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      $A bench --init random --batch-size 64 --warmup 0 --repeats 1 --device cuda:0 --model ARPG-L \
      --steps 64 --dtype bf16 --no-cuda-graph --json > "$OUT/ncu-$skip.csv" 2> "$OUT/ncu-$skip.err"
    python3 scripts/ncu_summary.py "$OUT/ncu-$skip.csv" 2 > "$OUT/ncu-$skip.txt"; head -14 "$OUT/ncu-$skip.txt"
  done; el
elif [ "$MODE" = extra ]; then
  fid ARPG-L 64 png
  N=640 fid ARPG-XL 64 nopng
  N=640 ref ARPG-XL --steps 64
else
  N=${N_SIZES:-640}
  for m in ARPG-XL ARPG-XXL; do
    for s in 64 32; do fid $m $s nopng; done
    ref $m --steps 64 32
  done
fi
