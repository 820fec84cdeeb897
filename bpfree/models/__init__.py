"""Model families and the layer-addressing contract every learning rule relies on.

Contract: a model exposes `model.blocks`, an `nn.ModuleDict` of its layers/blocks in forward order
(MLP: l1..l5; transformer: E1..E6, D1..D6), and its forward pass calls each block, passing the
stream it transforms as the block's first positional argument and receiving the new stream back.
Rules address "layers 2-4" by these names and may hook the blocks; they never reach into a model's
internals otherwise. The helpers that read or change blocks and layers (spans, swaps, ablation,
region hooks) live in bpfree/models/surgery.py.
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from bpfree.models.surgery import ablated, blocks, span  # noqa: F401 - the addressing helpers, re-exported
from bpfree.registry import MODELS


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """`kwargs` override conf/model/<name>.yaml, which holds every default (bpfree/defaults.py)."""
    from bpfree.defaults import yaml_defaults

    ctor = MODELS.get(name)
    return ctor(input_shape=tuple(input_shape), num_classes=num_classes, **{**yaml_defaults("model", name), **kwargs})


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
