"""Module surgery: the one place where learning rules change or address a model's modules.

- `blocks`, `block_names`, `span`, `regions`: the named blocks of the layer-addressing contract
  (bpfree/models/__init__.py: `model.blocks`, an nn.ModuleDict in forward order: MLP l1..l5,
  transformer E1..E6 / D1..D6) and spans [first, last] of them, as abstraction regions, AL folds,
  synthetic-gradient splits and the translation task's ablation name them. Bad names raise with the
  valid block names.
- `named_layers` / `layer_names`: short, stable names for the modules a predicate selects.
- `swap`: replace every module a predicate selects by `make(module)`, in place; returns the new
  modules by short name, in module order (feedback rules' layer conversion, AL's activations).
- `run_blocks`, `entry`: run a list of blocks on a stream; the input a model's first block expects.
- `ablated`: blocks of a span temporarily return their input (the "ablated" scores).
- `region_hooks`, `output_hooks`: a forward-pre-hook on a region's first block and a forward hook on
  its last; forward hooks on named blocks.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

Predicate = Callable[[nn.Module], bool]


# ------------------------------------------------------------------------------------------- blocks
def blocks(model: nn.Module) -> nn.ModuleDict:
    b = getattr(model, "blocks", None)
    if not isinstance(b, nn.ModuleDict):
        raise TypeError(
            f"{type(model).__name__} does not expose `blocks` (an nn.ModuleDict of named layers in "
            "forward order), which learning rules use to address layers"
        )
    return b


def block_names(model: nn.Module) -> list[str]:
    return list(blocks(model).keys())


def span(model: nn.Module, first: str, last: str) -> list[str]:
    """Names of the consecutive blocks from `first` to `last` inclusive, e.g. span(mlp, 'l2', 'l4')."""
    names = block_names(model)
    for n in (first, last):
        if n not in names:
            raise ValueError(f"no layer named {n!r} in {type(model).__name__}; its layers are {names}")
    i, j = names.index(first), names.index(last)
    if i > j:
        raise ValueError(f"layer span [{first}, {last}] is reversed; layers run in the order {names}")
    return names[i : j + 1]


def regions(model: nn.Module, spec: Iterable) -> list[tuple[str, str]]:
    """Parse a list of [first, last] block-name pairs into disjoint spans (abstraction regions, the
    ablated layers); raises naming the bad entry and the model's blocks."""
    out: list[tuple[str, str]] = []
    taken: dict[str, str] = {}
    for region in spec:
        if isinstance(region, str) or len(region) != 2:
            raise ValueError(f"a region is [first, last] layer names, got {region!r}; "
                             f"layers of {type(model).__name__}: {block_names(model)}")
        first, last = str(region[0]), str(region[1])
        for n in span(model, first, last):
            if n in taken:
                raise ValueError(f"regions overlap: {n} is in both {taken[n]} and {first}-{last}")
            taken[n] = f"{first}-{last}"
        out.append((first, last))
    return out


def match(names: Iterable[str], patterns: str | Iterable[str]) -> list[str]:
    """The block names matching any fnmatch pattern (e.g. 's1b*'), in the order of `names`."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def run_blocks(model: nn.Module, names: Iterable[str], z: torch.Tensor) -> torch.Tensor:
    """The stream z through the named blocks, in the order given."""
    b = blocks(model)
    for n in names:
        z = b[n](z)
    return z


def entry(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's first block: models whose first block starts with a Linear (the MLP)
    flatten the image in forward(), outside their blocks; others take x as it is."""
    first = next(iter(blocks(model).values()))
    lead = next((m for m in first.modules() if not isinstance(m, nn.Sequential)), None)
    return x.flatten(1) if isinstance(lead, nn.Linear) and x.dim() > 2 else x


def _passthrough(stream, *args, **kwargs):
    return stream


@contextmanager
def ablated(model: nn.Module, spec):
    """Temporarily remove the layers of each [first, last] region: those blocks return their input
    stream unchanged (abstracted-gradients §4.3 'removing those layers'), then are restored."""
    names = [n for first, last in spec for n in span(model, first, last)]
    b = blocks(model)
    try:
        for n in names:
            b[n].forward = _passthrough  # instance attribute shadows the class's forward
        yield names
    finally:
        for n in names:
            b[n].__dict__.pop("forward", None)


def output_hooks(model: nn.Module, names: Iterable[str], make: Callable[[str], Callable]) -> list:
    """`make(name)` as a forward hook (module, args, output) of each named block. Returns the handles."""
    b = blocks(model)
    return [b[n].register_forward_hook(make(n)) for n in names]


def region_hooks(model: nn.Module, spans: Iterable[tuple[str, str]], enter: Callable[[str], Callable],
                 leave: Callable[[str], Callable]) -> list:
    """For each (first, last): `enter(key)` as a forward-pre-hook of block `first` and `leave(key)` as
    a forward hook of block `last`, key = 'first-last'. Returns the hook handles."""
    b, handles = blocks(model), []
    for first, last in spans:
        key = f"{first}-{last}"
        handles.append(b[first].register_forward_pre_hook(enter(key)))
        handles += output_hooks(model, [last], lambda _, key=key: leave(key))
    return handles


# ------------------------------------------------------------------------------------------- layers
def named_layers(model: nn.Module, predicate: Predicate) -> dict[str, nn.Module]:
    """Short, stable names for the modules `predicate` selects, in module order: 'blocks.' is dropped,
    and a block holding a single such module is named by the block alone (MLP l1..l5, CNN c1..out,
    ResNet stem, s1b1.conv1, ..., head)."""
    return _shorten({n: m for n, m in model.named_modules() if n and predicate(m)})


def _shorten(found: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Full module paths -> short names (named_layers), order kept."""
    short = [n[len("blocks."):] if n.startswith("blocks.") else n for n in found]
    heads = [s.split(".")[0] for s in short]
    return {(h if heads.count(h) == 1 else s): m for s, h, m in zip(short, heads, found.values())}


def layer_names(model: nn.Module, kinds=(nn.Linear, nn.Conv2d)) -> dict[str, nn.Module]:
    """named_layers of the weight layers (nn.Linear, nn.Conv2d and their subclasses)."""
    return named_layers(model, lambda m: isinstance(m, kinds))


def swap(model: nn.Module, predicate: Predicate, make: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace every submodule that `predicate` selects by `make(module)`, in place (at any depth; a
    selected module's own children are not visited). Returns the new modules by short name
    (named_layers), in module order."""
    names: dict[str, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            if predicate(child):
                new = make(child)
                setattr(parent, child_name, new)
                names[prefix + child_name] = new
            else:
                visit(child, f"{prefix}{child_name}.")

    visit(model, "")
    return _shorten(names)
