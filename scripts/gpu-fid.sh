#!/usr/bin/env bash
# End-to-end FID pipeline on GPUs: `arpg sample-fid` on one GPU and on two (the images must be
# identical: shards are seeded by index), a resume after a deleted shard, then `arpg eval` on
# the GPU against a second sample set. Needs the CUDA binary (scripts/build-cuda.sh; NCCL is
# not needed: the ranks do not talk to each other).
#   device run --kind nvidia-h200-x2, carry [".bin/arpg.xz"]:  bash scripts/gpu-fid.sh [N]
# The model is ARPG-L with random weights (and a random VQ-16): 256x256 images through the whole
# pipeline without network access. INCEPTION=path uses real Inception weights (the default,
# `random`, is the deterministic synthetic network: meaningless scores, same code path).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
A=/tmp/arpg; xz -dc .bin/arpg.xz > $A && chmod +x $A
N=${1:-100}
INCEPTION=${INCEPTION:-random}
OUT=${OUT:-/tmp/fid}; rm -rf "$OUT"; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
common=(--model ARPG-L --init random --num-samples "$N" --per-class 10 --shard-size 25
        --batch-size 32 --steps 64 --device cuda --dtype bf16)
for g in 1 2; do
  echo "== sample-fid on $g GPU(s)"
  t0=$(date +%s.%N)
  $A sample-fid "${common[@]}" --gpus $g --out "$OUT/gpus$g" 2>&1 | tail -5
  echo "wall $(python3 -c "import time; print(round(time.time()-$t0,1))") s"
done
cmp "$OUT/gpus1/samples.npz" "$OUT/gpus2/samples.npz" && echo "1 GPU and 2 GPUs: identical samples.npz"
echo "== resume: delete one shard and rerun on 2 GPUs"
rm "$OUT/gpus2/shards/shard_00001.npy"
$A sample-fid "${common[@]}" --gpus 2 --out "$OUT/gpus2" 2>&1 | tail -4
cmp "$OUT/gpus1/samples.npz" "$OUT/gpus2/samples.npz" && echo "after resume: identical samples.npz"
ls "$OUT/gpus1/images" | wc -l
echo "== reference: another seed"
$A sample-fid "${common[@]}" --gpus 2 --seed 1 --no-png --out "$OUT/ref" 2>&1 | tail -2
echo "== eval on cuda:0 (inception: $INCEPTION)"
t0=$(date +%s.%N)
$A eval --samples "$OUT/gpus1/samples.npz" --ref "$OUT/ref/samples.npz" --inception "$INCEPTION" \
    --device cuda:0 --batch-size 100 --is-splits 2 --json "$OUT/scores.json" 2>&1 | tail -8
echo "wall $(python3 -c "import time; print(round(time.time()-$t0,1))") s"
echo "== eval of the samples against themselves (FID must be ~0)"
$A eval --samples "$OUT/gpus1/samples.npz" --ref "$OUT/gpus2/samples.npz" --inception "$INCEPTION" \
    --device cuda:0 --batch-size 100 2>&1 | grep -E "FID|Precision|Recall"
