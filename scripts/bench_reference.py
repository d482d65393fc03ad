"""Time the paper's PyTorch sampler (models/arpg.py of hp-l33/ARPG, fetched into .ref/ and
never committed) on random weights, as docs/benchmarks.md reports it.

usage: python3 scripts/bench_reference.py --ref .ref --model ARPG-L --steps 64 32 --batch-size 64
"""
import argparse, json, sys, time, types

import torch

p = argparse.ArgumentParser()
p.add_argument("--ref", default=".ref")
p.add_argument("--model", default="ARPG-L")
p.add_argument("--steps", type=int, nargs="+", default=[64, 32])
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--cfg", type=float, default=4.0)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--train", action="store_true", help="also time a training step (bf16 autocast, fused AdamW)")
p.add_argument("--compile", action="store_true", help="with --train: also the step under torch.compile")
p.add_argument("--no-sample", action="store_true", help="skip the sampling timings")
a = p.parse_args()

sys.path.insert(0, a.ref)
try:
    import transformers.configuration_utils  # noqa: F401
except Exception:  # the reference only subclasses PretrainedConfig as a plain holder
    m = types.ModuleType("transformers.configuration_utils")
    m.PretrainedConfig = object
    sys.modules["transformers"] = types.ModuleType("transformers")
    sys.modules["transformers.configuration_utils"] = m
import arpg as ref  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
model = ref.ARPG_models[a.model]().to(dev)
torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero-init head would make sampling trivial
model = model.to(torch.bfloat16).eval()
out = {"impl": "reference-pytorch", "model": a.model, "batch_size": a.batch_size, "torch": torch.__version__}
for steps in ([] if a.no_sample else a.steps):
    cls = torch.randint(0, 1000, (a.batch_size,), device=dev)
    model.generate(cls, guidance_scale=a.cfg, num_iter=steps)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        model.generate(cls, guidance_scale=a.cfg, num_iter=steps)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    s = sorted(times)[len(times) // 2]
    out[f"images_per_sec_{steps}"] = a.batch_size / s
    out[f"peak_gib_{steps}"] = torch.cuda.max_memory_allocated() / 2**30
def time_train(m, label):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    x = torch.randint(0, 16384, (a.batch_size, 256), device=dev)
    c = torch.randint(0, 1000, (a.batch_size,), device=dev)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(x, c, targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):  # torch.compile compiles in the first
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    out[f"{label}_step_seconds"] = (time.perf_counter() - t) / 5
    out[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
if a.train:
    torch.manual_seed(0)
    time_train(ref.ARPG_models[a.model]().to(dev).train(), "train")
    if a.compile:
        torch.manual_seed(0)
        time_train(torch.compile(ref.ARPG_models[a.model]().to(dev).train()), "train_compiled")
print(json.dumps(out))
