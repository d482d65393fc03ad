#!/usr/bin/env bash
# The sweep that chose the digits model's size: several `arpg train` runs side by side on one
# GPU (tiny models leave it mostly idle), each scored by `arpg eval-digits` (sampling and
# lower-half inpainting). One device call, carry [".bin/arpg.xz"]:
#   bash scripts/digits-sweep.sh [STEPS]
# Prints one JSON line per run; the run folders land in $OUT.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
OUT=${OUT:-/tmp/digits-sweep}; mkdir -p "$OUT"
A=/tmp/arpg; xz -dc .bin/arpg.xz > $A && chmod +x $A
STEPS=${1:-4000}
$A pack --digits data/digits/digits.csv.gz --vocab-size 17 --out /tmp/dtrain.pack
# name dim layers heads lr dropout batch
RUNS="${RUNS:-
d96l4   96  4 4 2e-3 0.1 64
d128l6  128 6 4 1.5e-3 0.1 64
d128l6n 128 6 4 1.5e-3 0.0 64
d192l6  192 6 6 1e-3 0.1 64
d192l6h 192 6 6 1e-3 0.2 64
d256l8  256 8 8 7e-4 0.1 64
d128l6b 128 6 4 2e-3 0.1 128
d96l4n  96  4 4 2e-3 0.0 64}"
run() {
  local name=$1 dim=$2 layers=$3 heads=$4 lr=$5 drop=$6 batch=$7 d="$OUT/$1"
  mkdir -p "$d"
  printf '{"dim":%d,"n_layer":%d,"n_head":%d,"vocab_size":17,"num_classes":10,"block_size":64,"multiple_of":32}\n' \
    "$dim" "$layers" "$heads" > "$d/config.json"
  local t0=$(date +%s.%N)
  timeout ${TRAIN_LIMIT:-420} $A train --data /tmp/dtrain.pack --config "$d/config.json" --out "$d" --steps "$STEPS" \
    --warmup-steps 100 --batch-size "$batch" --lr "$lr" --lr-absolute --min-lr "$(python3 -c "print($lr/100)")" \
    --dropout "$drop" --device cuda:0 --log-every 500 --ckpt-every 1000000 > "$d/train.out" 2>&1 || { echo "$name: train failed"; tail -3 "$d/train.out"; return; }
  local secs=$(python3 -c "import time; print(round(time.time()-$t0,1))")
  for task in sample inpaint; do
    for steps in 16 64; do
      $A eval-digits --config "$d/config.json" --weights "$d/model.safetensors" --device cuda:0 \
        --task $task --steps $steps --json-out "$d/eval-$task-$steps.json" > /dev/null 2>&1
    done
  done
  python3 - "$d" "$name" "$secs" <<'PY'
import json, sys, os
d, name, secs = sys.argv[1:]
r = {"run": name, "train_s": float(secs)}
log = [json.loads(l) for l in open(os.path.join(d, "train.jsonl"))]
r["final_loss"] = round(log[-1]["loss"], 4)
for f in sorted(os.listdir(d)):
    if f.startswith("eval-"):
        e = json.load(open(os.path.join(d, f)))
        r[f[5:-5]] = round(e["class_accuracy"], 3)
        if f == "eval-sample-16.json":
            r["copy"] = e["copy_rate"]
print(json.dumps(r))
PY
}
while read -r line; do
  [ -z "$line" ] && continue
  run $line &
done <<<"$RUNS"
wait
