"""Why DFA (and DTP) fail with SGD lr 0.01 + momentum 0.9 on the seed MLP while Adam trains them: the
size of each rule's weight update relative to backprop's, per layer, at initialisation (SGD steps are
proportional to it; Adam normalises it away). Mean over 5 batches of 64 MNIST training images.

    PYTHONPATH=. python experiments/backprop-free-transformers/sgd_scale_probe.py
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bpfree.data import load_dataset
from bpfree.models import build_model
from bpfree.rules import build_rule

if __name__ == "__main__":
    torch.set_num_threads(1)
    d = load_dataset("mnist", os.environ.get("BPFREE_DATA", "../shared/data"),
                     os.environ.get("BPFREE_CACHE", ".cache/bpfree"), subset=320)
    norms = {}
    for method in ("bp", "fa", "dfa", "dtp", "tp"):
        torch.manual_seed(0)
        rule = build_rule(method, build_model("mlp", (1, 28, 28), 10), F.nll_loss)
        acc = {}
        for b in range(5):
            x, y = d.train.x[64 * b:64 * (b + 1)], d.train.y[64 * b:64 * (b + 1)]
            rule.zero_grad(set_to_none=True)
            if hasattr(rule, "compute_grads"):
                rule.compute_grads(x, y)
            else:
                F.nll_loss(rule.model(x), y).backward()
            for name, blk in rule.model.blocks.items():
                w = next(p for n, p in blk.named_parameters() if n.endswith("weight"))
                acc[name] = acc.get(name, 0.0) + float(w.grad.norm()) / 5
        norms[method] = acc
    for method, acc in norms.items():
        print(f"{method:4s} " + "  ".join(f"{n}: {v / norms['bp'][n]:7.2f}x" for n, v in acc.items()))
