#!/usr/bin/env bash
# Issue #15 on the GPU: `arpg serve` on CUDA gives the images `arpg sample` gives for the same
# seed, also when requests are batched together (device draws, per-sequence seeds).
# Two servers: the shipped digits model (f32, seeds 7 and 8 at once), and ARPG-L with random
# weights (bf16; the server's random weights are seed 0 and `arpg sample --init random` seeds
# its weights from --seed, so only the seed-0 request is compared; a seed-1 request is
# batched beside it). Two concurrent requests of 20 images (two chunks each), 16 steps.
#   bash scripts/gpu-serve-same.sh     # env: ARPG (binary, default .bin/arpg), OUT
set -euo pipefail
ARPG=${ARPG:-.bin/arpg}
OUT=${OUT:-out}/serve-same
DEV=${DEV:-cuda:0}
rm -rf "$OUT"; mkdir -p "$OUT"
serve_and_compare() { # name, seeds to post (space-separated), seeds to compare, model flags...
  local name=$1 post=$2 cmp=$3; shift 3
  local d="$OUT/$name"; mkdir -p "$d"
  "$ARPG" serve "$@" --device $DEV --port 0 --max-batch 64 --batch-window-ms 300 \
    >"$d/serve.stdout" 2>"$d/serve.log" &
  local server=$!
  for _ in $(seq 600); do
    grep -q '^listening on ' "$d/serve.stdout" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { cat "$d/serve.log"; return 1; }
    sleep 0.5
  done
  local url; url=$(sed -n 's/^listening on //p' "$d/serve.stdout" | head -1)
  python3 - "$url" "$d" $post <<'PY'
import base64, json, sys, threading, urllib.request
url, out, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
def post(seed):
    body = json.dumps({"classes": [3, 5], "per_class": 10, "steps": 16, "seed": seed, "cfg": 4.0, "temperature": 1.0}).encode()
    req = urllib.request.Request(url + "/v1/generate", body, {"Content-Type": "application/json"})
    v = json.load(urllib.request.urlopen(req, timeout=300))
    for i, im in enumerate(v["images"]):
        open(f"{out}/server-{seed}-{i:06}_class{im['class']}.png", "wb").write(base64.b64decode(im["png"]))
ts = [threading.Thread(target=post, args=(s,)) for s in seeds]
[t.start() for t in ts]; [t.join() for t in ts]
PY
  echo "$name batches: $(curl -s "$url/metrics" | grep -E '^arpg_batch_images_(sum|count)' | tr '\n' ' ')"
  kill -TERM $server; wait $server || true
  for seed in $cmp; do
    "$ARPG" sample "$@" --device $DEV --classes 3,5 --per-class 10 --steps 16 --cfg 4.0 --temperature 1.0 --seed $seed \
      --out "$d/cli-$seed" 2>&1 | grep -E "rror" || true
  done
  python3 - "$d" "$name" $cmp <<'PY'
import os, sys
d, name, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
same = diff = 0
for seed in seeds:
    for i in range(20):
        n = f"{i:06}_class{3 if i < 10 else 5}.png"
        p, q = f"{d}/server-{seed}-{n}", f"{d}/cli-{seed}/{n}"
        ok = os.path.exists(p) and os.path.exists(q) and open(p, "rb").read() == open(q, "rb").read()
        same += ok; diff += not ok
print(f"{name}: serve == sample on CUDA: {same} images byte-equal, {diff} differ")
PY
}
serve_and_compare digits "7 8" "7 8" --model digits --dtype f32
serve_and_compare arpg-l "0 1" "0" --model ARPG-L --init random --dtype bf16
