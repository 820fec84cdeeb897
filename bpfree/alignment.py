"""Alignment diagnostics shared by every learning rule that approximates backprop.

Two angles, both in degrees (0 = same direction, 90 = orthogonal, 180 = opposite):
- `angle(B, W)`: how far a layer's feedback matrix is from the transpose of its forward weights.
  Feedback matrices are stored in W's own shape (out, in[, kh, kw]), so "B vs Wᵀ" is `angle(B, W)`.
- `grad_alignment(mine, true)`: how far a rule's update (or synthetic gradient) is from the true
  backprop one, entry by entry (layer weights, split streams), on the same batch: the angle by default,
  also cosines and norm ratios. Learning happens while the angle stays below 90° (Lillicrap et al.
  2016, Fig. 2); it is what diagnoses a low accuracy. `rule_and_true_grads(rule, x, y, weights)`
  measures the two weight gradients of a rule that fills .grad in `compute_grads`.

Every rule that reports an alignment with the true gradient goes through `grad_alignment`; rules decide
which tensors they compare and under which key prefix.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable

import torch
from torch import nn

from bpfree.models.surgery import layer_names  # noqa: F401 - short layer names, re-exported


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


# metric name -> f(mine, true) for one pair of same-shape tensors
METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "angle": angle, "cos": cosine, "cos_sample": sample_cosine, "norm_ratio": norm_ratio}


def grad_alignment(mine: dict[str, torch.Tensor], true: dict[str, torch.Tensor],
                   keys: dict[str, str] | None = None) -> dict[str, float]:
    """Compare a rule's gradients with the true ones, entry by entry (same names in both).
    keys: record-key prefix -> metric (METRICS), default {"angle_grad/": "angle"}; each entry n gives
    `prefix + n` per metric, e.g. {"sg_cos/": "cos", "sg_norm_ratio/": "norm_ratio"}."""
    keys = {"angle_grad/": "angle"} if keys is None else keys
    missing = set(true) - set(mine)
    if missing:
        raise KeyError(f"no rule gradient for {sorted(missing)}")
    for metric in keys.values():
        if metric not in METRICS:
            raise ValueError(f"unknown alignment metric {metric!r}; valid: {', '.join(METRICS)}")
    return {f"{prefix}{n}": METRICS[metric](mine[n], true[n]) for prefix, metric in keys.items() for n in true}


@torch.enable_grad()
def rule_and_true_grads(rule: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: dict[str, torch.Tensor],
                        exact=None, step: Callable[[], object] | None = None):
    """(the rule's update direction, the true gradient of the task loss) for each named weight on
    (x, y), leaving every .grad as it was. The rule's comes from `step()` (default:
    rule.compute_grads(x, y)), read from .grad (zero where it leaves none); the true one from
    autograd of rule.loss_fn(rule.model(x), y), inside the context `exact` when the rule rewires the
    model's backward (feedback rules' exact_backward)."""
    with saved_grads(rule.parameters()):
        (step or (lambda: rule.compute_grads(x, y)))()
        mine = {n: torch.zeros_like(w) if w.grad is None else w.grad.clone() for n, w in weights.items()}
    with exact if exact is not None else nullcontext():
        true = true_gradients(rule.loss_fn(rule.model(x), y), weights)
    return mine, true
