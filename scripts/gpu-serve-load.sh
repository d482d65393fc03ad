#!/usr/bin/env bash
# The H200 row of docs/benchmarks.md ("arpg serve" load test): ARPG-L with random weights,
# bf16, on one GPU, 32 concurrent clients against one-at-a-time, all on 127.0.0.1.
# Run on the device machine from the repository root with the carried CUDA binary .bin/arpg:
#   bash scripts/gpu-serve-load.sh            # results in $OUT (or ./out) as JSON lines
# Env: ARPG (binary, default .bin/arpg), STEPS (64), REQUESTS (256), CLIENTS (32),
#      PER_CLASS (1 image per request), MAX_BATCH (64).
set -euo pipefail
ARPG=${ARPG:-.bin/arpg}
OUT=${OUT:-out}
STEPS=${STEPS:-64}
REQUESTS=${REQUESTS:-256}
CLIENTS=${CLIENTS:-32}
PER_CLASS=${PER_CLASS:-1}
MAX_BATCH=${MAX_BATCH:-64}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
LOG="$OUT/serve.log"
"$ARPG" serve --model ARPG-L --init random --device cuda:0 --dtype bf16 --port 0 \
  --max-batch "$MAX_BATCH" --batch-window-ms 10 --max-queue 1024 --max-images 64 \
  >"$OUT/serve.stdout" 2>"$LOG" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q '^listening on ' "$OUT/serve.stdout" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
URL=$(sed -n 's/^listening on //p' "$OUT/serve.stdout" | head -1)
echo "server at $URL"
BODY="{\"classes\":[{i}],\"per_class\":$PER_CLASS,\"steps\":$STEPS,\"seed\":{i}}"
# Warm-up (kernels, allocator), not counted.
"$ARPG" load-test --url "$URL" --clients 8 --requests 16 --body "$BODY" >/dev/null
echo "one at a time:"
"$ARPG" load-test --url "$URL" --clients 1 --requests $((REQUESTS / 8)) --body "$BODY" \
  | tee "$OUT/serial.json"
echo "$CLIENTS concurrent clients:"
"$ARPG" load-test --url "$URL" --clients "$CLIENTS" --requests "$REQUESTS" --body "$BODY" \
  | tee "$OUT/concurrent.json"
curl -s "$URL/metrics" >"$OUT/metrics.txt" 2>/dev/null || true
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "server stopped cleanly; results in $OUT"
