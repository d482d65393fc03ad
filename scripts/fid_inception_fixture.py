"""Reference features of pytorch-fid's InceptionV3 on deterministic synthetic weights
(tests/fixtures/fid/inception.npz), for the Rust port in crates/arpg/src/eval/inception.rs.

Every parameter is filled from the formula of `synthetic_value` in inception.rs (an integer
hash of the tensor name and element index, mapped to a multiple of 0.001 and scaled per kind),
so Rust rebuilds the same network without a weights file. pytorch-fid's own network is used
(its load_state_dict_from_url is pointed at these weights). Two preprocessings are recorded:
- "fid": pytorch-fid's (x/255, F.interpolate bilinear align_corners=False, 2x-1);
- "adm": ADM's TF graph (legacy TF bilinear resize src = dst*in/out, here via affine_grid /
  grid_sample as NVlabs emulate it, then (x-128)/128), fed with pytorch-fid's resizing off.
Outputs: pool_3 (2048), Mixed_6d.branch1x1 channels 0..7 channels-last (2023), and
pool_3 @ fc.weight^T (1008). Run: python3 scripts/fid_inception_fixture.py (torch,
torchvision, pytorch-fid, numpy, pillow).
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import pytorch_fid.inception as pfi


def fnv1a(s):
    h = 0x811C9DC5
    for b in s.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def synthetic(name, shape):
    n = int(np.prod(shape))
    j = np.arange(n, dtype=np.uint64)
    h = ((j * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)) ^ np.uint64(fnv1a(name))
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x045D9F3B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    u = (h % np.uint64(2001)).astype(np.float64) / 1000.0 - 1.0
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if name.endswith("conv.weight") or name == "fc.weight":
        v = u * np.sqrt(6.0 / fan_in)
    elif name.endswith("bn.weight"):
        v = 1.0 + 0.2 * u
    elif name.endswith("running_var"):
        v = 1.0 + 0.5 * u
    else:
        v = 0.1 * u
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def synthetic_state_dict():
    ref = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    sd = {}
    for k, v in ref.state_dict().items():
        sd[k] = v if k.endswith("num_batches_tracked") else synthetic(k, tuple(v.shape))
    return sd


def images():
    """Three 64x64 RGB images: crops of the two photos and a fixed noise image."""
    out = []
    for name, box in [("china", (100, 50, 356, 306)), ("flower", (150, 100, 406, 356))]:
        im = Image.open(f"data/photos/{name}.jpg").convert("RGB").crop(box)
        out.append(np.asarray(im.resize((64, 64), Image.BICUBIC)))
    out.append(np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    return np.stack(out)


def tf_legacy_resize(x, size=299):
    # TF1 ResizeBilinear (align_corners=False, no half-pixel centres): src = dst * in / out.
    n, _, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def main():
    torch.set_grad_enabled(False)
    sd = synthetic_state_dict()
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    fid_net = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    raw_net = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    fc = sd["fc.weight"]
    imgs = images()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()

    def run(net, inp):
        spatial = {}
        mixed_6d = net.blocks[2][6]  # Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
        assert type(net.blocks[2][3]).__name__ == "InceptionB" and type(mixed_6d).__name__ == "FIDInceptionC"
        hook = mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
        pool = net(inp)[0].reshape(inp.shape[0], 2048)
        hook.remove()
        sp = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(inp.shape[0], -1)
        return pool.numpy(), sp.numpy(), (pool @ fc.T).numpy()

    p1, s1, l1 = run(fid_net, x / 255.0)
    p2, s2, l2 = run(raw_net, (tf_legacy_resize(x) - 128.0) / 128.0)
    np.savez(
        "tests/fixtures/fid/inception.npz",
        arr_0=imgs,
        pool_fid=p1, spatial_fid=s1, logits_fid=l1,
        pool_adm=p2, spatial_adm=s2, logits_adm=l2,
    )
    # A tiny state dict in PyTorch's legacy (pre-1.6) format, as pytorch-fid's .pth is, and
    # in the zip format, for the loader tests.
    small = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0]),
             "bn.num_batches_tracked": torch.tensor(3)}
    torch.save(small, "tests/fixtures/fid/legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(small, "tests/fixtures/fid/zip.pth")
    for k, v in [("pool", p1), ("spatial", s1), ("logits", l1)]:
        print(k, v.shape, float(np.abs(v).mean()), float(v.std()))


if __name__ == "__main__":
    main()
