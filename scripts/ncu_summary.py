"""Sum an `ncu --csv --print-units base` metrics dump per kernel name: time, DRAM bytes and
the bandwidth they imply, largest first.

usage: python3 scripts/ncu_summary.py ncu.csv [DIVIDE_BY]   (e.g. 2 for two decodes)
"""
import csv, sys
from collections import defaultdict

path = sys.argv[1]
div = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
rows = [l for l in open(path) if l.startswith('"')]
by = defaultdict(lambda: defaultdict(float))
count = defaultdict(set)
for r in csv.DictReader(rows):
    name = r["Kernel Name"][:90]
    v = float(r["Metric Value"].replace(",", "") or 0)
    by[name][r["Metric Name"]] += v
    count[name].add(r["ID"])
tot = sum(m["gpu__time_duration.sum"] for m in by.values()) / div
print(f"total {tot / 1e6:.2f} ms per run, {sum(len(c) for c in count.values()) / div:.0f} kernels")
print(f"{'ms':>8} {'share':>6} {'calls':>6} {'GB':>8} {'GB/s':>7}  kernel")
for name, m in sorted(by.items(), key=lambda kv: -kv[1]["gpu__time_duration.sum"]):
    t = m["gpu__time_duration.sum"] / div
    gb = (m["dram__bytes_read.sum"] + m["dram__bytes_write.sum"]) / div / 1e9
    print(f"{t / 1e6:8.3f} {100 * t / tot:5.1f}% {len(count[name]) / div:6.0f} {gb:8.3f} "
          f"{gb / (t / 1e9) if t else 0:7.0f}  {name}")
