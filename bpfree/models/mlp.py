"""Fully connected networks (conf/model/mlp.yaml holds the seed MLP of abstracted-gradients §4.1)."""
from __future__ import annotations

import math

from torch import nn

from bpfree.models.init import apply_init
from bpfree.registry import MODELS

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


@MODELS.register("mlp")
class MLP(nn.Module):
    """x (B, *input_shape) -> flatten -> l1..lN -> log-probabilities (B, num_classes).

    Block l_k is Linear + activation; the last block is Linear + LogSoftmax (the paper's NLL setup).
    """

    def __init__(self, input_shape, num_classes: int, *, hidden, activation: str, init: str):
        super().__init__()
        self.input_shape = tuple(input_shape)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
        widths = [math.prod(input_shape), *hidden, num_classes]
        self.blocks = nn.ModuleDict()
        for k, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            last = k == len(widths) - 1
            act = nn.LogSoftmax(dim=1) if last else ACTIVATIONS[activation]()
            self.blocks[f"l{k}"] = nn.Sequential(nn.Linear(w_in, w_out), act)
        apply_init(self, init)

    def forward(self, x):
        h = x.flatten(1)  # (B, C*H*W)
        for block in self.blocks.values():
            h = block(h)
        return h  # (B, num_classes) log-probabilities


@MODELS.register("mlp_depth")
def mlp_depth(input_shape, num_classes: int, *, depth: int, width: int, activation: str, init: str) -> MLP:
    """`depth` hidden layers of `width` units: the accuracy-vs-depth sweeps (model.depth=1..6)."""
    if depth < 1:
        raise ValueError(f"mlp_depth needs depth >= 1 hidden layers, got {depth}")
    return MLP(input_shape, num_classes, hidden=[width] * depth, activation=activation, init=init)
