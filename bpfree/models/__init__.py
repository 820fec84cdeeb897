"""Model families and the layer-addressing contract every learning rule relies on.

Contract: a model exposes `model.blocks`, an `nn.ModuleDict` of its layers/blocks in forward order
(MLP: l1..l5; transformer: E1..E6, D1..D6), and its forward pass calls each block, passing the
stream it transforms as the block's first positional argument and receiving the new stream back.
Rules address "layers 2-4" by these names and may hook the blocks; they never reach into a model's
internals otherwise.
"""
from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager

from torch import nn

from bpfree.registry import MODELS


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """`kwargs` override conf/model/<name>.yaml, which holds every default (bpfree/defaults.py)."""
    from bpfree.defaults import yaml_defaults

    ctor = MODELS.get(name)
    return ctor(input_shape=tuple(input_shape), num_classes=num_classes, **{**yaml_defaults("model", name), **kwargs})


def blocks(model: nn.Module) -> nn.ModuleDict:
    b = getattr(model, "blocks", None)
    if not isinstance(b, nn.ModuleDict):
        raise TypeError(
            f"{type(model).__name__} does not expose `blocks` (an nn.ModuleDict of named layers in "
            "forward order), which learning rules use to address layers"
        )
    return b


def span(model: nn.Module, first: str, last: str) -> list[str]:
    """Names of the consecutive blocks from `first` to `last` inclusive, e.g. span(mlp, 'l2', 'l4')."""
    names = list(blocks(model).keys())
    for n in (first, last):
        if n not in names:
            raise ValueError(f"no layer named {n!r} in {type(model).__name__}; its layers are {names}")
    i, j = names.index(first), names.index(last)
    if i > j:
        raise ValueError(f"layer span [{first}, {last}] is reversed; layers run in the order {names}")
    return names[i : j + 1]


def _passthrough(stream, *args, **kwargs):
    return stream


@contextmanager
def ablated(model: nn.Module, regions):
    """Temporarily remove the layers of each [first, last] region: those blocks return their input
    stream unchanged (abstracted-gradients §4.3 'removing those layers'), then are restored."""
    names = [n for first, last in regions for n in span(model, first, last)]
    b = blocks(model)
    try:
        for n in names:
            b[n].forward = _passthrough  # instance attribute shadows the class's forward
        yield names
    finally:
        for n in names:
            b[n].__dict__.pop("forward", None)


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
