#!/usr/bin/env bash
# Issue #15 on the GPU: `arpg serve` on CUDA gives the images `arpg sample` gives for the same
# seed, also when requests are batched together (device draws, per-sequence seeds). ARPG-L with
# random weights, bf16, 16 steps, two concurrent requests of 20 images (two chunks each).
#   bash scripts/gpu-serve-same.sh     # env: ARPG (binary, default .bin/arpg), OUT
set -euo pipefail
ARPG=${ARPG:-.bin/arpg}
OUT=${OUT:-out}/serve-same
rm -rf "$OUT"; mkdir -p "$OUT"
COMMON=(--model ARPG-L --init random --device cuda:0 --dtype bf16)
"$ARPG" serve "${COMMON[@]}" --port 0 --max-batch 64 --batch-window-ms 200 \
  >"$OUT/serve.stdout" 2>"$OUT/serve.log" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q '^listening on ' "$OUT/serve.stdout" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.5
done
URL=$(sed -n 's/^listening on //p' "$OUT/serve.stdout" | head -1)
python3 - "$URL" "$OUT" <<'PY'
import base64, json, sys, threading, urllib.request
url, out = sys.argv[1], sys.argv[2]
def post(seed):
    body = json.dumps({"classes": [3, 5], "per_class": 10, "steps": 16, "seed": seed}).encode()
    req = urllib.request.Request(url + "/v1/generate", body, {"Content-Type": "application/json"})
    v = json.load(urllib.request.urlopen(req, timeout=300))
    for i, im in enumerate(v["images"]):
        open(f"{out}/server-{seed}-{i:06}_class{im['class']}.png", "wb").write(base64.b64decode(im["png"]))
ts = [threading.Thread(target=post, args=(s,)) for s in (7, 8)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
grep -o 'arpg_batch_size_sum [0-9.]*\|arpg_batch_size_count [0-9.]*' <(curl -s "$URL/metrics") || true
kill -TERM $SERVER; wait $SERVER || true; trap - EXIT
for seed in 7 8; do
  "$ARPG" sample "${COMMON[@]}" --classes 3,5 --per-class 10 --steps 16 --seed $seed \
    --out "$OUT/cli-$seed" 2>&1 | grep -E "rror" || true
done
python3 - "$OUT" <<'PY'
import glob, os, sys
out = sys.argv[1]
same = diff = 0
for p in sorted(glob.glob(f"{out}/server-*.png")):
    seed, name = os.path.basename(p)[len("server-"):].split("-", 1)
    q = f"{out}/cli-{seed}/{name}"
    ok = os.path.exists(q) and open(p, "rb").read() == open(q, "rb").read()
    same += ok; diff += not ok
    if not ok:
        try:
            from PIL import Image
            import numpy as np
            a, b = (np.asarray(Image.open(x).convert("RGB"), dtype=int) for x in (p, q))
            print(f"{name} seed {seed}: max pixel diff {abs(a - b).max()}, mean {abs(a - b).mean():.3f}")
        except Exception as e:
            print(f"{name} seed {seed}: differs ({e})")
print(f"serve == sample on CUDA: {same} images equal, {diff} differ")
PY
