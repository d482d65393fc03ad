"""How close the reference PyTorch itself gets to its own float32 logits in bfloat16, on the
parity fixture's weights (tests/fixtures/parity-a), with the same metric as `arpg check-parity`
(max |bf16 - f32| / max |f32| over all teacher-forced logits).

    pip install torch einops safetensors
    python3 scripts/bf16_floor_reference.py .ref/arpg.py    # the paper's models/arpg.py (fetched)
"""
import importlib.util, json, sys, types
import torch
from safetensors.torch import load_file

# The reference only subclasses transformers' PretrainedConfig; a stand-in avoids the package.
tf_mod = types.ModuleType("transformers")
cu = types.ModuleType("transformers.configuration_utils")
cu.PretrainedConfig = type("PretrainedConfig", (), {"__init__": lambda self, **kw: None})
tf_mod.configuration_utils = cu
sys.modules.update({"transformers": tf_mod, "transformers.configuration_utils": cu})
spec = importlib.util.spec_from_file_location("ref_arpg", sys.argv[1])
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)

fx = "tests/fixtures/parity-a/"
A = json.load(open(fx + "a.json"))
c = A["arpg_config"]
args = R.ModelArgs(**{k: c[k] for k in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size")})
args.class_dropout_prob = 0.0
m = R.Transformer(args)
m.load_state_dict(load_file(fx + "a_arpg.safetensors"), strict=False)
m.eval()
t = A["teacher_forcing"]
ids, cls = torch.tensor(t["input_ids"]), torch.tensor(t["classes"])
orders = torch.tensor(t["orders"])
shuffle = R.batch_seq_shuffle
R.batch_seq_shuffle = lambda x, o=None: shuffle(x, orders if o is None else o)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


with torch.no_grad():
    f32, _ = m(ids, cls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = m(ids, cls)
    half, _ = m.to(torch.bfloat16)(ids, cls)
print(json.dumps({"autocast_bf16_vs_f32": rel(auto, f32), "bf16_weights_vs_f32": rel(half, f32)}))
