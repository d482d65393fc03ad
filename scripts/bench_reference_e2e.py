"""Time the paper's sampling loop end to end: the body of `sample_c2i_ddp.py` of hp-l33/ARPG
(`generate` in bf16 -> `vq_model.decode_code` in float32 with cuDNN (TF32 allowed, as that
script sets) -> uint8 on the host), on random weights, one GPU. Also the VQ-16 decode alone
(f32 and bf16 autocast) with its peak memory. The reference's models/arpg.py and
models/vq_model.py are fetched into --ref and never committed.

usage: python3 scripts/bench_reference_e2e.py --ref .bin/ref --model ARPG-L --steps 64 32 \
           --batch-size 64 --images 1280 [--png DIR]
"""
import argparse, json, os, sys, time, types

import torch

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.set_grad_enabled(False)

p = argparse.ArgumentParser()
p.add_argument("--ref", default=".bin/ref")
p.add_argument("--model", default="ARPG-L")
p.add_argument("--steps", type=int, nargs="+", default=[64, 32])
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--images", type=int, default=1280)
p.add_argument("--cfg", type=float, default=4.0)
p.add_argument("--png", default=None, help="also write PNGs here, as the reference does")
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
import vq_model as refvq  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
gpt = ref.ARPG_models[a.model]().to(dev)
torch.nn.init.normal_(gpt.head.weight, std=0.02)  # the zero-init head would make sampling trivial
gpt = gpt.to(torch.bfloat16).eval()
vq = refvq.VQ_models["VQ-16"]().to(dev).eval()
out = {"impl": "reference-pytorch", "model": a.model, "batch_size": a.batch_size,
       "images": a.images, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}

# The VQ decode alone, f32 (the script's) and bf16 autocast.
codes = torch.randint(0, 16384, (a.batch_size, 256), device=dev)
shape = (a.batch_size, 8, 16, 16)
for name, ctx in [("f32", None), ("bf16_autocast", torch.bfloat16)]:
    def dec():
        if ctx is None:
            return vq.decode_code(codes, shape=shape)
        with torch.autocast("cuda", dtype=ctx):
            return vq.decode_code(codes, shape=shape)
    dec(); torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(3):
        t = time.perf_counter(); dec(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    out[f"vq_decode_seconds_{name}"] = sorted(ts)[1]
    out[f"vq_decode_peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2**30

for steps in a.steps:
    def batch(i):
        c = torch.arange(i * a.batch_size, (i + 1) * a.batch_size, device=dev) % 1000
        idx = gpt.generate(c, guidance_scale=a.cfg, num_iter=steps)
        s = vq.decode_code(idx.clone(), shape=(idx.shape[0], 8, 16, 16))
        s = torch.clamp(127.5 * s + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
        if a.png:
            from PIL import Image
            os.makedirs(a.png, exist_ok=True)
            for j, im in enumerate(s):
                Image.fromarray(im).save(f"{a.png}/{i * a.batch_size + j:06d}.png")
        return s
    # The first batch (cuDNN's and the allocator's warm-up) is timed apart, then left out.
    t = time.perf_counter(); batch(0); torch.cuda.synchronize()
    out[f"first_batch_seconds_{steps}"] = time.perf_counter() - t
    n = a.images // a.batch_size
    t = time.perf_counter()
    for i in range(n):
        batch(i)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    out[f"e2e_images_per_sec_{steps}"] = n * a.batch_size / secs
print(json.dumps(out), flush=True)
