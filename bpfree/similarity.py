"""Similarity of two networks' representations and parameters (tensors in, floats out)."""
from __future__ import annotations

import torch


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centered kernel alignment (Kornblith et al. 2019, eq. 5) between a (n, p) and b (n, q),
    the same n examples as rows: ||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F) after centring each column.
    1 = the same representation up to an orthogonal transform and isotropic scale (so invariant to
    permuting units), 0 = unrelated. Computed in float64 in feature space (cost O(n (p + q)^2)).
    A representation with no variance (every unit constant, e.g. all ReLUs dead) has no defined CKA;
    0.0 is returned for it."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"linear_cka needs the same examples in both: {a.shape[0]} vs {b.shape[0]} rows")
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    denom = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if denom == 0:
        return 0.0
    return float((b.T @ a).pow(2).sum() / denom)


def relative_distance(theta: list[torch.Tensor], ref: list[torch.Tensor], origin: list[torch.Tensor]) -> float:
    """||theta - ref|| / ||ref - origin|| over the concatenation of the tensors (e.g. one layer's weight
    and bias): how far theta ends from ref, in units of how far ref travelled from origin."""
    num = sum(float((t - r).double().pow(2).sum()) for t, r in zip(theta, ref)) ** 0.5
    den = sum(float((r - o).double().pow(2).sum()) for r, o in zip(ref, origin)) ** 0.5
    return num / den if den > 0 else float("inf") if num > 0 else 0.0
