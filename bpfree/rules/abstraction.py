"""Abstracted gradients (abstracted-gradients §3.2-3.4): the backward pass skips regions of blocks.

For a region of consecutive blocks [first..last] with input stream h_in and output h_out:
  - the region's own parameters learn by backprop from G_i = dL/dh_out, as usual;
  - the blocks before the region receive G_j = G_i M instead of the true gradient through the
    region (eq. 1), so the two backward paths are independent (the depth-wise parallelism of §5.1).

Mechanics (generic over any model exposing `model.blocks`): a forward-pre-hook on `first` remembers
h_in and feeds the region a detached copy (no true gradient can reach the earlier blocks); a
forward-hook on `last` wraps h_out in `_Skip`, an autograd Function that is the identity forward and,
backward, sends G_i on into the region and G_i M to h_in. Streams may carry leading dimensions
(B, d) or (B, T, d); M acts on the last (feature) dimension and, for the derived M, all leading
positions are rows of the least-squares system.

The three ways to form M, one method name each:
  abstraction_identity        M = I (region input and output widths must be equal), §3.4
  abstraction_block_identity  M = I_block = [I 0]: zero-pad / truncate between widths, §4.1
  abstraction_derived         least-squares M from the batch's own activations, eq. 3-5, with the
                              bias handled by augmenting h_in with a constant 1 (§3.3 note),
                              recomputed on every training batch (in backward, from saved activations)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bpfree.alignment import grad_alignment
from bpfree.models import surgery
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, UnsupportedModel

MODES = ("identity", "block_identity", "derived")


RIDGE = 1e-12  # relative to the Gram matrix's mean diagonal: keeps the Cholesky factorisation defined
               # when the batch is rank-deficient (dead ReLUs, repeated rows); float64 throughout


def _gram_solve(k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """K^-1 B for a symmetric PSD K: Cholesky of K + eps I plus one step of iterative refinement,
    which removes the ridge's first-order bias (about 5x cheaper than an eigh pseudo-inverse at
    64 x 64). As eps -> 0 this is the minimum-norm least-squares solution."""
    eps = RIDGE * k.diagonal().mean().clamp_min(1e-30)
    chol, info = torch.linalg.cholesky_ex(k + eps * torch.eye(len(k), dtype=k.dtype, device=k.device))
    if int(info) != 0:  # numerically indefinite: fall back to the SVD route
        return torch.linalg.pinv(k, hermitian=True) @ b
    z = torch.cholesky_solve(b, chol)
    return z + torch.cholesky_solve(b - k @ z, chol)


def derived_map(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Least-squares A (d_in+1, d_out) with [h_in, 1] A ≈ h_out (eq. 4-5; A = M^T in row convention).
    h_in (N, d_in), h_out (N, d_out). Minimum-norm solution through the smaller Gram matrix, in
    float64, so N < d_in (batch 64 vs width 392) is safe."""
    x = torch.cat([h_in, torch.ones_like(h_in[:, :1])], dim=1).double()  # (N, d_in+1)
    y = h_out.double()
    n, d = x.shape
    if n <= d:  # A = X^T (X X^T)^-1 Y   (N x N system)
        a = x.T @ _gram_solve(x @ x.T, y)
    else:  # A = (X^T X)^-1 X^T Y         (d_in+1 square system)
        a = _gram_solve(x.T @ x, x.T @ y)
    return a.to(h_in.dtype)


def map_gradient(mode: str, g_out: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor,
                 where: str) -> torch.Tensor:
    """G_j from G_i for one region. g_out, h_out (..., d_out); h_in (..., d_in) -> (..., d_in)."""
    d_in, d_out = h_in.shape[-1], h_out.shape[-1]
    if mode == "identity":
        if h_in.shape != h_out.shape:  # known only once a batch flows: refused on the first step
            raise UnsupportedModel(
                f"abstraction_identity needs equal widths at region {where}: its input is "
                f"{tuple(h_in.shape)} but its output {tuple(h_out.shape)}; use method=abstraction_block_identity "
                "or method=abstraction_derived, or choose a region with equal widths")
        return g_out
    if mode == "block_identity":  # [I 0]: keep the first min(d_in, d_out) features, zero the rest
        return F.pad(g_out, (0, d_in - d_out)) if d_in >= d_out else g_out[..., :d_in]
    a = derived_map(h_in.reshape(-1, d_in), h_out.reshape(-1, d_out))[:d_in]  # bias row carries no gradient
    return g_out @ a.T


class _Skip(torch.autograd.Function):
    """Forward: h_out unchanged. Backward: G_i into the region, G_i M to the region's input."""

    @staticmethod
    def forward(ctx, h_in, h_out, mode, where):
        ctx.save_for_backward(h_in.detach(), h_out.detach())
        ctx.mode, ctx.where = mode, where
        return h_out.view_as(h_out)

    @staticmethod
    def backward(ctx, g_out):
        h_in, h_out = ctx.saved_tensors
        g_in = map_gradient(ctx.mode, g_out, h_in, h_out, ctx.where) if ctx.needs_input_grad[0] else None
        return g_in, g_out, None, None


class Abstraction(LearningRule):
    """Keeps the default train step; the skip is wired into the model's blocks with hooks."""

    def __init__(self, model, loss_fn, mode: str, *, regions):
        super().__init__(model, loss_fn)
        if mode not in MODES:
            raise ValueError(f"unknown abstraction mode {mode!r}; valid: {MODES}")
        self.mode = mode
        self.regions = surgery.regions(model, regions)  # [(first, last)], disjoint, names checked
        self._inputs: dict[str, torch.Tensor] = {}   # region key -> h_in of the current forward
        self._probe: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # set by diagnostics
        surgery.region_hooks(model, self.regions, self._enter, self._leave)

    def _enter(self, key):
        def hook(module, args):
            if not torch.is_grad_enabled():
                return None
            h_in = args[0]
            self._inputs[key] = h_in
            if self._probe is not None:  # diagnostics: plain backprop, just record the tensors
                return None
            return (h_in.detach(), *args[1:])
        return hook

    def _leave(self, key):
        def hook(module, args, h_out):
            if not torch.is_grad_enabled():
                return None
            h_in = self._inputs.pop(key)
            if self._probe is not None:
                self._probe[key] = (h_in, h_out)
                return None
            return _Skip.apply(h_in, h_out, self.mode, key)
        return hook

    def diagnostics(self, x, y) -> dict[str, float]:
        """Per region, on the probe batch (treated as one training batch):
        - abs_cos_*, abs_norm_ratio_*: cosine similarity and norm ratio between the abstracted
          gradient G_i M and the true backprop gradient at the region's input, both from the true G_i;
        - abs_fit_residual_*: relative residual ||[h_in,1]A - h_out|| / ||h_out|| of the least-squares
          map fitted on the first half of the probe, on that half (0 whenever rows <= d_in + 1: the
          system is underdetermined and M interpolates the batch, as at batch 64 / width 392);
        - abs_heldout_residual_*: the same map's residual on the other half (does M generalise?)."""
        was_training = self.training
        self.eval()  # no dropout, frozen batch-norm statistics
        self._probe = {}
        try:
            with torch.enable_grad():
                loss = self.loss_fn(self.model(x), y)
                keys = list(self._probe)
                tensors = [t for k in keys for t in self._probe[k]]
                # a region that starts at the first block has the model input as h_in, which needs no
                # gradient: autograd.grad refuses such tensors, so ask only for those that have one
                wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
                got = torch.autograd.grad(loss, [tensors[i] for i in wanted], allow_unused=True)
                grads = [None] * len(tensors)
                for i, g in zip(wanted, got):
                    grads[i] = g
        finally:
            probe, self._probe = self._probe, None
            self.train(was_training)
        out = {}
        for i, key in enumerate(keys):
            h_in, h_out = (t.detach() for t in probe[key])
            g_true, g_i = grads[2 * i], grads[2 * i + 1]
            if g_true is None or g_i is None:  # region starts at the model input: nothing to compare
                continue
            g_abs = map_gradient(self.mode, g_i, h_in, h_out, key)
            out |= grad_alignment({key: g_abs}, {key: g_true}, {"abs_cos_": "cos", "abs_norm_ratio_": "norm_ratio"})
            d_in, d_out = h_in.shape[-1], h_out.shape[-1]
            hi, ho = h_in.reshape(-1, d_in), h_out.reshape(-1, d_out)
            half = len(hi) // 2
            a = derived_map(hi[:half], ho[:half])
            for name, rows in (("fit_residual", slice(None, half)), ("heldout_residual", slice(half, None))):
                fit = torch.cat([hi[rows], torch.ones_like(hi[rows, :1])], 1) @ a
                out[f"abs_{name}_{key}"] = float((fit - ho[rows]).norm() / ho[rows].norm().clamp_min(1e-30))
        return out


@RULES.register("abstraction_identity")
def abstraction_identity(model, loss_fn, *, regions):
    return Abstraction(model, loss_fn, "identity", regions=regions)


@RULES.register("abstraction_block_identity")
def abstraction_block_identity(model, loss_fn, *, regions):
    return Abstraction(model, loss_fn, "block_identity", regions=regions)


@RULES.register("abstraction_derived")
def abstraction_derived(model, loss_fn, *, regions):
    return Abstraction(model, loss_fn, "derived", regions=regions)
