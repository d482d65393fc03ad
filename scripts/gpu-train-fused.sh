#!/usr/bin/env bash
# The fused training kernels (attention softmax, RoPE, with their backward) against the generic
# tensor ops, on one H200: kernel self-checks, then the same ARPG-L-body training run on the
# digits twice (fused, then ARPG_NO_FUSED=1), loss curves side by side, then the ARPG-L
# training-step benchmark both ways.
#   device run, carry [".bin/arpg.xz"]:  bash scripts/gpu-train-fused.sh [steps]
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
export CUDA_CACHE_MAXSIZE=4294967296
OUT=${OUT:-/tmp/train-fused}; mkdir -p "$OUT"
A=/tmp/arpg; xz -dc .bin/arpg.xz > $A && chmod +x $A
STEPS=${1:-40}
for d in f32 bf16; do $A check-parity --device cuda:0 --dtype $d | grep -o '"vq_decode.*'; done
$A pack --digits data/digits/digits.csv.gz --vocab-size 17 --out /tmp/dtrain.pack > /dev/null
printf '{"dim":1024,"n_layer":24,"n_head":16,"vocab_size":17,"num_classes":10,"block_size":64}\n' > /tmp/l-digits.json
common=(--data /tmp/dtrain.pack --config /tmp/l-digits.json --steps "$STEPS" --batch-size 64
        --lr 3e-4 --lr-absolute --min-lr 3e-5 --warmup-steps 20 --dtype bf16 --seed 1 --dropout 0
        --log-every 10 --ckpt-every 100000 --device cuda:0)
$A train "${common[@]}" --out "$OUT/fused" 2>&1 | grep -v '^{' | tail -2
ARPG_NO_FUSED=1 $A train "${common[@]}" --out "$OUT/generic" 2>&1 | grep -v '^{' | tail -2
python3 - "$OUT" <<'PY'
import json, sys, os
o = sys.argv[1]
r = {k: [json.loads(l) for l in open(os.path.join(o, k, "train.jsonl"))] for k in ("fused", "generic")}
print(f"{'step':>5} {'loss fused':>11} {'loss generic':>13} {'diff':>8} {'img/s fused':>12} {'img/s generic':>14}")
for a, b in zip(r["fused"], r["generic"]):
    print(f"{a['step']:>5} {a['loss']:>11.4f} {b['loss']:>13.4f} {a['loss']-b['loss']:>8.4f} {a['images_per_sec']:>12.1f} {b['images_per_sec']:>14.1f}")
PY
B="$A bench --model ARPG-L --init random --batch-size 64 --steps 8 --device cuda:0 --dtype bf16 --json --train --warmup 1 --repeats 3"
echo "== ARPG-L training step, fused"; $B | grep -o '"train.*'
echo "== ARPG-L training step, generic"; ARPG_NO_FUSED=1 $B | grep -o '"train.*'
echo "== ARPG-L training step, fused, profiled"; ARPG_PROFILE=1 ARPG_PROFILE_STEPS=1 $B --no-cuda-graph 2>/dev/null | grep -o '"train.*'
