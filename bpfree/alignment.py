"""Alignment diagnostics shared by every learning rule that approximates backprop.

Two angles, both in degrees (0 = same direction, 90 = orthogonal, 180 = opposite):
- `angle(B, W)`: how far a layer's feedback matrix is from the transpose of its forward weights.
  Feedback matrices are stored in W's own shape (out, in[, kh, kw]), so "B vs Wᵀ" is `angle(B, W)`.
- `gradient_angles(rule_grads, true_grads)`: how far a rule's weight update is from the true
  backprop gradient, layer by layer, on the same batch. Learning happens while this stays below 90°
  (Lillicrap et al. 2016, Fig. 2); it is what diagnoses a low accuracy.

Only plain tensors and modules go in; rules decide which parameters they report.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors of the same shape, flattened, in degrees. A zero tensor has no
    direction: the angle with it is reported as 90° (no alignment), never NaN."""
    if a.shape != b.shape:
        raise ValueError(f"angle needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 90.0
    cos = float((a @ b) / (na * nb))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def true_gradients(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d param for each named parameter, by autograd, without touching .grad."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, grads)}


def gradient_angles(rule_grads: dict[str, torch.Tensor], true_grads: dict[str, torch.Tensor],
                    prefix: str = "angle_grad/") -> dict[str, float]:
    """Per-layer angle between a rule's update direction and the true gradient (same keys)."""
    missing = set(true_grads) - set(rule_grads)
    if missing:
        raise KeyError(f"no rule gradient for {sorted(missing)}")
    return {f"{prefix}{n}": angle(rule_grads[n], true_grads[n]) for n in true_grads}


@contextmanager
def saved_grads(params: Iterable[torch.Tensor]):
    """Run a gradient computation for measurement only: .grad of every parameter is put back as it
    was afterwards (the loop's contract for `diagnostics`)."""
    params = list(params)
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def layer_names(model: nn.Module, kinds=(nn.Linear, nn.Conv2d)) -> dict[str, nn.Module]:
    """Short, stable names for a model's weight layers, in module order: 'blocks.' is dropped, and a
    block holding a single such layer is named by the block alone (MLP l1..l5, CNN c1..out, ResNet
    stem, s1b1.conv1, ..., head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    short = [n[len("blocks."):] if n.startswith("blocks.") else n for n, _ in found]
    heads = [s.split(".")[0] for s in short]
    out = {}
    for s, h, (_, m) in zip(short, heads, found):
        out[h if heads.count(h) == 1 else s] = m
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two same-shape tensors, flattened (a whole batch of gradients as one vector);
    0.0 when either is zero."""
    if a.shape != b.shape:
        raise ValueError(f"cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float((a @ b) / (na * nb))


def sample_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the leading (batch) dimension of the per-sample cosine; a zero sample counts as 0."""
    a, b = a.detach().flatten(1).double(), b.detach().flatten(1).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30).mean())


def norm_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a|| / ||b|| (flattened); inf when b is zero and a is not, 1.0 when both are zero."""
    na, nb = float(a.detach().double().norm()), float(b.detach().double().norm())
    if nb == 0:
        return 1.0 if na == 0 else math.inf
    return na / nb
