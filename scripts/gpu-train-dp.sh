#!/usr/bin/env bash
# Data-parallel training on the two-GPU device kind: the same run (same seed, same global
# batch) on one GPU and on two (`arpg train --gpus 2`, NCCL), then both loss curves and
# throughputs side by side. Needs a build from `scripts/build-cuda.sh --nccl`.
#   device run --kind nvidia-h200-x2, carry [".bin/arpg.xz"]:  bash scripts/gpu-train-dp.sh [STEPS]
# The model is ARPG-L's body (24 layers, dim 1024) on the UCI digits (64 tokens, 17 levels,
# 10 classes): real data with a falling loss, and enough work per step to measure scaling.
set -uo pipefail
export NCCL_NVLS_ENABLE=0                 # the device's rule: no NVLink multicast
export ARPG_PROFILE_STEPS=${ARPG_PROFILE_STEPS:-1}   # phase timings in train.jsonl
DROPOUT=${DROPOUT:-0}   # 0: the runs differ only by reduction order and GEMM shapes
NCCL_LIB="$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(n.__path__[0], "lib"))' 2>/dev/null)"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:$NCCL_LIB
OUT=${OUT:-/tmp/train-dp}; mkdir -p "$OUT"
A=/tmp/arpg; xz -dc .bin/arpg.xz > $A && chmod +x $A
STEPS=${1:-150}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
$A pack --digits data/digits/digits.csv.gz --vocab-size 17 --out /tmp/dtrain.pack
printf '{"dim":1024,"n_layer":24,"n_head":16,"vocab_size":17,"num_classes":10,"block_size":64}\n' > /tmp/l-digits.json
common=(--data /tmp/dtrain.pack --config /tmp/l-digits.json --steps "$STEPS" --batch-size 64
        --lr 3e-4 --lr-absolute --min-lr 3e-5 --warmup-steps 20 --dtype bf16 --seed 1 --dropout "$DROPOUT"
        --log-every 10 --ckpt-every 100000)
for g in 1 2; do
  echo "== $g GPU(s)"
  t0=$(date +%s.%N)
  $A train "${common[@]}" --out "$OUT/gpus$g" --gpus $g --device cuda:0 2>&1 | grep -v '^{' | tail -4
  echo "wall $(python3 -c "import time; print(round(time.time()-$t0,1))") s"
done
python3 - "$OUT" <<'PY'
import json, sys, os
o = sys.argv[1]
runs = {g: [json.loads(l) for l in open(os.path.join(o, f"gpus{g}", "train.jsonl"))] for g in (1, 2)}
print(f"{'step':>5} {'loss 1 GPU':>11} {'loss 2 GPUs':>12} {'diff':>8} {'img/s 1':>8} {'img/s 2':>8}")
for a, b in zip(runs[1], runs[2]):
    print(f"{a['step']:>5} {a['loss']:>11.4f} {b['loss']:>12.4f} {b['loss']-a['loss']:>8.4f} {a['images_per_sec']:>8.1f} {b['images_per_sec']:>8.1f}")
# Steady state: skip the first window (warm-up, kernel JIT, NCCL setup).
for g in (1, 2):
    ips = [r["images_per_sec"] for r in runs[g][1:]]
    print(f"{g} GPU(s): {sum(ips)/len(ips):.1f} images/s (mean over logged windows after the first)")
    ph = [r["phases_ms"] for r in runs[g][1:] if r.get("phases_ms")]
    if ph:
        m = [sum(p[k] for p in ph) / len(ph) for k in range(3)]
        print(f"  per step (rank 0): forward+backward {m[0]:.1f} ms, all-reduce {m[1]:.1f} ms, clip+AdamW {m[2]:.1f} ms")
PY
