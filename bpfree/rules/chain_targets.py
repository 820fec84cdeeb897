"""dtp and lra on a transformer "as if it were a simple MLP" (backprop-free-transformers §7): the
model is a chain of sub-layers z_0 -> z_1 -> ... -> z_K (`model.stages(x)`, e.g. the encoder's
emb, L1.attn, L1.wn, L1.wi, L1.wo, L2.attn, ...; bpfree/models/encoder.py), each stage
a_k = pre_k(z_k, side_k), z_{k+1} = act_k(a_k), where side_k is the residual input of a post-LN
sub-layer (z_{k-1}); it is a fixed input of that stage, not a link of the chain. The last block
(`head`: pooling + Linear + log-softmax) is trained by the task loss on its detached input.

`method=dtp model=encoder` and `method=lra model=encoder` select these (conf/method_model/
{dtp,lra}_encoder*.yaml); the MLP rules are bpfree/rules/target_prop.py and lra.py, whose equations
these follow stage for stage:

dtp_chain (Lee et al. 2015): top target t_K = z_K - target_lr * dL/dz_K (per sample); inverses
  g_k: z_{k+1} -> z_k for k >= 1, one position-wise nn.Linear each; t_k = z_k + g_k(t_{k+1}) -
  g_k(z_{k+1}); stage loss 0.5||act_k(pre_k(z_k)) - t_{k+1}||², inverse loss
  0.5||g_k(act_k(pre_k(z_k + eps))) - (z_k + eps)||², eps ~ N(0, noise²).
lra_chain (Ororbia & Mali 2019, LRA-E): e = softmax(logits) - onehot; at the top the displacement
  e E_head (N, d) is spread over the positions the head pooled (the pooling's transpose, which has no
  weights: first token for [CLS], 1/T_real each for mean); then t_k = act_{k-1}(a_{k-1} - beta *
  err_{k+1} E_k) and err_k = z_k - t_k, with E_k in the stage weight's shape (out, in) following that
  weight's update (E.grad = W.grad). The attention stage's pre-activation is the attention mixture
  itself (act = identity) and its weight is W_V; LayerNorm stages use the LayerNorm as act.
Losses are summed over positions and units and averaged over the batch; padding positions count 0.

What the chain cannot carry (measured per stage by the diagnostics `target_shift/<stage>`, the mean
norm of t_k - z_k per sequence): every inverse and error matrix is position-wise, so a target that
differs from the forward value only at the pooled position ([CLS]) stays at that position all the
way down; the other tokens get targets only through the attention stage's own local loss.
LRA's error shrinks by ~beta |E| per stage, and the encoder has 4 stages per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.models.surgery import blocks as model_blocks, layer_names
from bpfree.registry import RULES
from bpfree.rules.base import UnsupportedModel
from bpfree.models.encoder import Stage
from bpfree.rules.feedback import random_like_layer
from bpfree.rules.target_prop import LocalLossRule, mlp_layers


def _sq(a, b, real, n):
    """0.5 ||a - b||² summed over units and real positions, mean over the n samples."""
    d = (a - b).pow(2).sum(-1)  # (N, T) or (N,)
    if real is not None and d.dim() == 2:
        d = d * real.to(d.dtype)
    return 0.5 * d.sum() / n


def _dot(a, err, real, n):
    """sum(a * err) over units and real positions / n: its gradient at the current weights is that of
    0.5||a - t||² with err = a - t, without forming a - t again in float32 (as lra.py)."""
    p = (a * err).sum(-1)
    if real is not None and p.dim() == 2:
        p = p * real.to(p.dtype)
    return p.sum() / n


class _MLPChain:
    """An MLP (bpfree.models.mlp, blocks of Linear + activation) seen as a chain: every block but the
    last is a stage, the last is the head (no pooling). For a plain MLP method=dtp / lra are the
    rules of target_prop.py / lra.py; this only lets the chain rules run on one too."""

    def __init__(self, model, rule):
        pairs = mlp_layers(model, rule)  # refuses anything else, naming what it needs
        names = list(model.blocks)
        self.stages_ = [Stage(n, (lambda z, _, lin=lin: lin(z.flatten(1))), act, False, lin.weight)
                        for n, (lin, act) in zip(names, pairs[:-1])]
        self.head_linear, act = pairs[-1]
        self.head = lambda z, real: act(self.head_linear(z))

    def stages(self, x):
        return None, self.stages_

    @staticmethod
    def pool(z, real):
        return z


class ChainRule(LocalLossRule):
    def __init__(self, model, loss_fn, rule: str):
        super().__init__(model, loss_fn)
        self.shifts: dict[str, float] = {}  # target_shift per stage of the latest local_losses
        if callable(getattr(model, "stages", None)):
            head = list(model_blocks(model).values())[-1]
            self.head, self.pool, self._stages = head, head.pool, model.stages
            self.head_linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        else:
            chain = _MLPChain(model, rule)
            self.head, self.pool, self._stages, self.head_linear = chain.head, chain.pool, chain.stages, chain.head_linear
        _, st = self._stages(None)
        if len(st) < 2:
            raise UnsupportedModel(f"{rule} over a chain needs at least two stages below the head; "
                                   f"{type(model).__name__} has {len(st)}")
        self.names = [s.name for s in st]
        # width of each stage's output z_{k+1}: from its weight (out, in); emb's is the next stage's input
        self.widths = [s.weight.shape[0] if s.weight is not None else st[k + 1].weight.shape[1]
                       for k, s in enumerate(st)]

    def forward_all(self, x):
        """real, stages, z_0..z_K (z_0 = x), pre-activations a_0..a_{K-1} and side inputs, no graph."""
        real, st = self._stages(x)
        z, pre, side = [x], [], []
        with torch.no_grad():
            for k, s in enumerate(st):
                sd = z[k - 1] if s.residual else None
                side.append(sd)
                pre.append(s.pre(z[k], sd))
                z.append(s.act(pre[-1]))
        return real, st, z, pre, side

    def aligned_weights(self):
        return {n: m.weight for n, m in layer_names(self.model).items()}

    def diagnostics(self, x, y) -> dict[str, float]:
        out = super().diagnostics(x, y)  # its step (local_losses) leaves the targets' shifts in self.shifts
        out.update({f"target_shift/{k}": v for k, v in self.shifts.items()})
        return out


def _shift(t, z, real, n) -> float:
    """Mean over samples of ||t - z|| over a sequence's real positions."""
    d = (t.double() - z.double()).pow(2).sum(-1)
    if real is not None and d.dim() == 2:
        d = d * real.to(d.dtype)
    return float(d.reshape(n, -1).sum(1).sqrt().mean())


@RULES.register("dtp_chain")
class ChainDTP(ChainRule):
    def __init__(self, model, loss_fn, *, target_lr: float, noise: float, inverse_lr: float | None):
        if inverse_lr is not None:  # dtp.yaml's key; here the inverses share the optimizer's lr
            raise ValueError(f"dtp over a chain: method.inverse_lr={inverse_lr} is not supported (the "
                             "inverses train at optim.lr); set method.inverse_lr=null")
        super().__init__(model, loss_fn, "dtp")
        self.target_lr, self.noise = target_lr, noise
        # g_k for k = 1..K-1 maps stage k's output back to its input (position-wise); no g_0 (no target for x)
        self.inverses = nn.ModuleDict({
            self.names[k].replace(".", "_"): nn.Linear(self.widths[k], self.widths[k - 1])
            for k in range(1, len(self.names))})

    def inverse(self, k):
        return self.inverses[self.names[k].replace(".", "_")]

    def local_losses(self, x, y):
        real, st, z, _, side = self.forward_all(x)
        K, n = len(st), len(y)
        z_top = z[K].clone().requires_grad_(True)
        task = self.loss_fn(self.head(z_top, real), y)
        (g_top,) = torch.autograd.grad(task * n, z_top)  # per-sample gradient at the top stream
        t = {K: (z[K] - self.target_lr * g_top).detach()}
        with torch.no_grad():
            for k in range(K - 1, 0, -1):  # target for z_k through g_k (the difference correction)
                g = self.inverse(k)
                t[k] = z[k] + g(t[k + 1]) - g(z[k + 1])
        self.shifts = {st[k - 1].name: _shift(t[k], z[k], real, n) for k in range(1, K + 1)}
        total = self.loss_fn(self.head(z[K], real), y)  # the head: task loss on the detached z_K
        layer_loss, inv_loss = 0.0, 0.0
        for k, s in enumerate(st):
            loss_k = _sq(s.act(s.pre(z[k], side[k])), t[k + 1], real, n)
            total, layer_loss = total + loss_k, layer_loss + loss_k.detach()
        for k in range(1, K):
            s, g = st[k], self.inverse(k)
            noisy = z[k] + self.noise * torch.randn_like(z[k])
            with torch.no_grad():
                up = s.act(s.pre(noisy, side[k]))
            loss_inv = _sq(g(up), noisy, real, n)
            total, inv_loss = total + loss_inv, inv_loss + loss_inv.detach()
        return total, {"loss": task.detach(), "layer_loss": torch.as_tensor(layer_loss),
                       "inverse_loss": torch.as_tensor(inv_loss)}

    @torch.no_grad()
    def reconstruction_error(self, x) -> dict[str, float]:
        """0.5 ||g_k(z_{k+1}) - z_k||² per inverse (per sequence), on clean inputs: how well each
        sub-layer can be inverted position-wise (attention mixes positions; LayerNorm drops a scale)."""
        real, st, z, _, _ = self.forward_all(x)
        return {st[k].name: float(_sq(self.inverse(k)(z[k + 1]), z[k], real, len(x))) for k in range(1, len(st))}

    def diagnostics(self, x, y):
        out = super().diagnostics(x, y)
        out.update({f"inverse_error/{k}": v for k, v in self.reconstruction_error(x).items()})
        return out


@RULES.register("lra_chain")
class ChainLRA(ChainRule):
    def __init__(self, model, loss_fn, *, beta: float, error_std: float | None, derivative: bool):
        if not derivative:  # lra.yaml's key: LRA-E's dW = e h^T is not implemented over a chain
            raise ValueError("lra over a chain implements the derivative form only (e_l * act'(a_l)); "
                             "set method.derivative=true")
        super().__init__(model, loss_fn, "lra")
        self.beta = beta

        def init(w):  # error weights: W's std (error_std=null) or the given std, as lra.yaml says
            return random_like_layer(w) if error_std is None else torch.randn_like(w) * error_std

        _, st = self._stages(None)
        # E_k for stages k = 1..K-1 (in the stage weight's shape) and for the head's Linear
        self.error_weights = nn.ParameterDict({
            self.names[k].replace(".", "_"): nn.Parameter(init(st[k].weight)) for k in range(1, len(st))})
        self.error_weights["head"] = nn.Parameter(init(self.head_linear.weight))
        self._weights = {self.names[k].replace(".", "_"): st[k].weight for k in range(1, len(st))}
        self._weights["head"] = self.head_linear.weight

    def local_losses(self, x, y):
        real, st, z, pre, side = self.forward_all(x)
        K, n = len(st), len(y)
        with torch.no_grad():
            z_top = z[K]
            logits = self.head_linear(self.pool(z_top, real))
            e = (F.softmax(logits, -1) - F.one_hot(y, logits.shape[-1])).double()  # (N, classes)
            disp = e @ self.error_weights["head"].double()  # (N, d)
        # spread the pooled displacement over the positions the pooling read (its transpose; no weights)
        with torch.enable_grad():
            zz = z_top.double().requires_grad_(True)
            (spread,) = torch.autograd.grad(self.pool(zz, real), zz, disp)
        with torch.no_grad():
            err = {K: z_top.double() - st[K - 1].act(pre[K - 1].double() - self.beta * spread)}
            for k in range(K - 1, 0, -1):  # stage k's error weights send err_{k+1} to a_{k-1}
                E = self.error_weights[self.names[k].replace(".", "_")].double()  # (out_k, in_k)
                err[k] = z[k].double() - st[k - 1].act(pre[k - 1].double() - self.beta * err[k + 1] @ E)
        self.shifts = {st[k - 1].name: _shift(err[k], torch.zeros_like(err[k]), real, n) for k in range(1, K + 1)}
        task = self.loss_fn(self.head(z[K], real), y)
        total, layer_loss = task, 0.0
        for k, s in enumerate(st):
            e_k = err[k + 1].to(z[k + 1].dtype)
            total = total + _dot(s.act(s.pre(z[k], side[k])), e_k, real, n)
            layer_loss = layer_loss + float(_sq(err[k + 1], 0 * err[k + 1], real, n))
        return total, {"loss": task.detach(), "layer_loss": torch.as_tensor(layer_loss)}

    def compute_grads(self, x, y):
        out = super().compute_grads(x, y)
        for k, w in self._weights.items():  # LRA-E: E follows its weight's update
            self.error_weights[k].grad = None if w.grad is None else w.grad.clone()
        return out
