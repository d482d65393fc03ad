#!/usr/bin/env python3
"""The paper's training step on our run's trace (crates/arpg/examples/reference_train_trace.rs),
against both of our steps (candle autograd: ours.jsonl; the hand-written one: hand.jsonl).

Loads the reference model (models/arpg.py of hp-l33/ARPG, fetched, never committed) from
--ref, our initial weights, and for every step our batch (class tokens after class dropout,
the random order, the targets) and learning rate; trains it as train_c2i.py does (AdamW with
betas (0.9, 0.95), weight decay 0.05 on tensors of 2+ dimensions, gradient-norm clip 1.0,
dropout 0), in float32 on the CPU, and compares its losses with ours.

    python3 scripts/reference_train_compare.py --ref .bin/ref --trace OUT [--plot fig.png]
"""
import argparse
import json
import math
import sys

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="folder with the reference's arpg.py")
    ap.add_argument("--trace", required=True)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--plot", help="write a PNG of both loss curves (needs matplotlib)")
    a = ap.parse_args()
    sys.path.insert(0, a.ref)
    import arpg as ref

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = json.load(open(f"{a.trace}/config.json"))
    args = ref.ModelArgs(
        dim=cfg["dim"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        vocab_size=cfg["vocab_size"], num_classes=cfg["num_classes"],
        block_size=cfg["block_size"], multiple_of=cfg["multiple_of"],
        ffn_dim_multiplier=cfg["ffn_dim_multiplier"], norm_eps=cfg["norm_eps"],
        rope_base=cfg["rope_base"], cls_token_num=cfg["cls_token_num"],
        class_dropout_prob=0.0, token_dropout_p=0.0, attn_dropout_p=0.0,
        resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0,
    )
    model = ref.Transformer(args)
    missing, unexpected = model.load_state_dict(load_file(f"{a.trace}/init.safetensors"), strict=False)
    missing = [m for m in missing if "freqs_cis" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": nodecay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95),
    )
    trace = load_file(f"{a.trace}/batches.safetensors")
    ours = [json.loads(l) for l in open(f"{a.trace}/ours.jsonl")]
    hand = [json.loads(l) for l in open(f"{a.trace}/hand.jsonl")]
    V, C, L = cfg["vocab_size"], cfg["num_classes"], cfg["block_size"]
    # Our batches fix the orders: the reference's shuffle takes them instead of drawing.
    state = {}
    orig_shuffle = ref.batch_seq_shuffle

    def fixed_shuffle(x, orders=None):
        return orig_shuffle(x, state["orders"] if orders is None else orders)

    ref.batch_seq_shuffle = fixed_shuffle
    theirs = []
    for k, o in enumerate(ours):
        tokens = trace[f"tokens.{k}"].long()
        queries = trace[f"queries.{k}"].long()
        targets = trace[f"targets.{k}"].long().view(tokens.shape[0], L)
        orders = queries - 1
        # Raster tokens from the targets (the tokens in generation order).
        raster = torch.empty_like(targets)
        raster.scatter_(1, orders, targets)
        # Class tokens (or the null class) back to the label the reference shifts: the null
        # class token is vocab + num_classes + 1, i.e. "label" num_classes.
        condition = tokens[:, 0] - (V + 1)
        assert ((condition >= 0) & (condition <= C)).all()
        state["orders"] = orders
        for g in opt.param_groups:
            g["lr"] = float(trace[f"lr.{k}"].item())
        _, loss = model(raster, condition, targets=raster)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        theirs.append({"step": k + 1, "loss": loss.item(), "grad_norm": norm.item()})
    diffs = [abs(o["loss"] - t["loss"]) for o, t in zip(ours, theirs)]
    worst = max(range(len(diffs)), key=lambda i: diffs[i])
    hdiffs = [abs(h["loss"] - t["loss"]) for h, t in zip(hand, theirs)]
    hworst = max(range(len(hdiffs)), key=lambda i: hdiffs[i])
    hadiffs = [abs(h["loss"] - o["loss"]) for h, o in zip(hand, ours)]
    summary = {
        "steps": len(diffs),
        "max_abs_loss_diff": diffs[worst],
        "at_step": worst + 1,
        "first_loss": [ours[0]["loss"], theirs[0]["loss"]],
        "last_loss": [ours[-1]["loss"], theirs[-1]["loss"]],
        "max_grad_norm_rel_diff": max(
            abs(o["grad_norm"] - t["grad_norm"]) / max(t["grad_norm"], 1e-12)
            for o, t in zip(ours, theirs)
        ),
        "hand_max_abs_loss_diff": hdiffs[hworst],
        "hand_at_step": hworst + 1,
        "hand_vs_autograd_max_abs_loss_diff": max(hadiffs),
        "within_tolerance": max(diffs[worst], hdiffs[hworst]) <= a.tolerance
        and len(hand) == len(theirs),
    }
    with open(f"{a.trace}/reference.jsonl", "w") as f:
        for t in theirs:
            f.write(json.dumps(t) + "\n")
    print(json.dumps(summary))
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot([o["step"] for o in ours], [o["loss"] for o in ours], label="arpg (Rust, candle autograd)")
        ax[0].plot([h["step"] for h in hand], [h["loss"] for h in hand], ":", label="arpg, hand-written step")
        ax[0].plot([t["step"] for t in theirs], [t["loss"] for t in theirs], "--", label="reference (PyTorch)")
        ax[0].set_xlabel("step"); ax[0].set_ylabel("training loss"); ax[0].legend()
        ax[1].semilogy([o["step"] for o in ours], [max(d, 1e-9) for d in diffs], label="autograd vs reference")
        ax[1].semilogy([h["step"] for h in hand], [max(d, 1e-9) for d in hdiffs], ":", label="hand vs reference")
        ax[1].legend()
        ax[1].set_xlabel("step"); ax[1].set_ylabel("|loss difference|")
        fig.suptitle("Same weights, batches, orders and class drops; dropout 0; f32 on the CPU")
        fig.tight_layout(); fig.savefig(a.plot, dpi=110)
    return 0 if summary["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
