"""Target propagation (tp) and difference target propagation (dtp): backprop-free-transformers §5,
after Lee et al. 2015 (DTP) and Bengio 2014 (TP).

Layers: h_0 = x (flattened), h_l = f_l(h_{l-1}) = act_l(W_l h_{l-1} + b_l), l = 1..L; f_L ends in the
log-softmax. Each step:
  1. forward, keeping every h_l;
  2. top target (Lee et al. §3.1): t_{L-1} = h_{L-1} - target_lr * dL/dh_{L-1} (per-sample gradient of
     the task loss through the output layer only);
  3. targets downward through learned inverses g_l: h_l -> h_{l-1}, g_l(h) = act_{l-1}(V_l h + c_l):
        tp:  t_{l-1} = g_l(t_l)
        dtp: t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)   (the difference correction: a perfect target
             for an imperfect inverse, since t_l = h_l gives t_{l-1} = h_{l-1})
  4. losses, each reaching only its own parameters (inputs detached):
        output layer: the task loss of f_L(h_{L-1});
        layer l < L:  0.5 ||f_l(h_{l-1}) - t_l||² (summed over units, mean over the batch);
        inverse l >= 2: 0.5 ||g_l(f_l(h_{l-1} + eps)) - (h_{l-1} + eps)||², eps ~ N(0, noise²)
     one backward, one optimizer step (Adam is per-parameter, so this equals separate optimizers).

Needs a model whose blocks are (Linear, activation) pairs applied to the flattened input: bpfree's
`mlp`. Others raise UnsupportedModel. `LayerwiseRule` (shared with lra.py) holds that parsing, the
step and the gradient-alignment diagnostic.
"""
from __future__ import annotations

import torch
from torch import nn

from bpfree.alignment import grad_alignment, rule_and_true_grads
from bpfree.models.mlp import ACTIVATIONS
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, UnsupportedModel

_ACTS = tuple(ACTIVATIONS.values())


def mlp_layers(model: nn.Module, rule: str) -> list[tuple[nn.Linear, nn.Module]]:
    """(Linear, activation) per block, checking the model is a plain MLP (forward = flatten, blocks)."""
    need = (f"{rule} needs an MLP whose blocks are nn.Sequential(nn.Linear, activation) applied to the "
            f"flattened input (model=mlp); ")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleDict) or len(blocks) < 2:
        raise UnsupportedModel(need + f"{type(model).__name__} has no such blocks (at least 2)")
    out = []
    for i, (name, b) in enumerate(blocks.items()):
        last = i == len(blocks) - 1
        ok = (isinstance(b, nn.Sequential) and len(b) == 2 and type(b[0]) is nn.Linear
              and isinstance(b[1], nn.LogSoftmax if last else _ACTS))
        if not ok:
            parts = ", ".join(type(c).__name__ for c in b.children()) if isinstance(b, nn.Module) else "?"
            raise UnsupportedModel(need + f"block {name!r} of {type(model).__name__} is "
                                   f"{type(b).__name__}({parts})")
        out.append((b[0], b[1]))
    return out


class LocalLossRule(LearningRule):
    """A rule whose update is one backward of the sum of its local losses, each reaching only its own
    parameters (tp, dtp, lra here and in lra.py; their chain versions in chain_targets.py). Diagnostics:
    the angle between that update and the true gradient for each weight of `aligned_weights()`."""

    def local_losses(self, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of every local loss, metrics); `loss` in metrics is the task loss."""
        raise NotImplementedError

    def aligned_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_grads(self, x, y):
        total, out = self.local_losses(x, y)
        total.backward()
        return out

    def diagnostics(self, x, y) -> dict[str, float]:
        return grad_alignment(*rule_and_true_grads(self, x, y, self.aligned_weights()))


class LayerwiseRule(LocalLossRule):
    """A rule that trains each layer of an MLP from its own local loss (tp, dtp, lra)."""

    def __init__(self, model, loss_fn, rule: str):
        super().__init__(model, loss_fn)
        self.pairs = mlp_layers(model, rule)
        self.names = list(model.blocks.keys())

    def forward_all(self, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-activations a_1..a_L and activations h_0..h_L, without a graph."""
        h, pre = [x.flatten(1)], []
        with torch.no_grad():
            for lin, act in self.pairs:
                pre.append(lin(h[-1]))
                h.append(act(pre[-1]))
        return pre, h

    def aligned_weights(self):
        return {n: lin.weight for n, (lin, _) in zip(self.names, self.pairs)}


def _sq(a, b):  # 0.5 ||a - b||², summed over units, mean over the batch
    return 0.5 * (a - b).pow(2).sum(1).mean()


class TargetProp(LayerwiseRule):
    difference = False

    def __init__(self, model, loss_fn, *, target_lr: float, noise: float, inverse_lr: float | None):
        # defaults: conf/method/{tp,dtp}.yaml
        super().__init__(model, loss_fn, type(self).__name__)
        if len(self.pairs) < 2:
            raise UnsupportedModel("target propagation needs at least one hidden layer")
        if inverse_lr is not None and inverse_lr <= 0:
            raise ValueError(f"{type(self).__name__}: method.inverse_lr must be > 0 or null (= optim.lr), got {inverse_lr}")
        self.target_lr, self.noise, self.inverse_lr = target_lr, noise, inverse_lr
        # inverse g_l for l = 2..L-1 (maps h_l back to h_{l-1}); g_1 is never needed (no target for x)
        inv = {}
        for l in range(1, len(self.pairs) - 1):  # 0-based index of layer l+1
            lin, _ = self.pairs[l]
            _, act_below = self.pairs[l - 1]
            inv[self.names[l]] = nn.Sequential(nn.Linear(lin.out_features, lin.in_features), type(act_below)())
        self.inverses = nn.ModuleDict(inv)

    def optimizer_groups(self):
        """The inverses g_l at their own learning rate (Lee et al.'s code: lr_b = 0.005 vs lr_f = 0.0149)."""
        if self.inverse_lr is None:
            return self.parameters()
        inv = {id(p) for p in self.inverses.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in inv]},
                {"params": list(self.inverses.parameters()), "lr": self.inverse_lr}]

    def targets(self, h, y):
        """(task loss of the output layer on detached h_{L-1}, {l: t_l} for l = 1..L-1)."""
        L = len(self.pairs)
        # output layer: the task loss on the detached input; its gradient at h_{L-1} gives the top target
        h_top = h[L - 1].clone().requires_grad_(True)
        lin_L, act_L = self.pairs[-1]
        task = self.loss_fn(act_L(lin_L(h_top)), y)
        (g_top,) = torch.autograd.grad(task * len(y), h_top, retain_graph=True)  # per-sample gradient
        targets = {L - 1: (h[L - 1] - self.target_lr * g_top).detach()}
        with torch.no_grad():
            for l in range(L - 1, 1, -1):  # target for h_{l-1} from t_l through g_l
                g = self.inverses[self.names[l - 1]]
                t = g(targets[l])
                targets[l - 1] = h[l - 1] + t - g(h[l]) if self.difference else t
        return task, targets

    def local_losses(self, x, y):
        _, h = self.forward_all(x)
        L = len(self.pairs)
        task, targets = self.targets(h, y)
        total, layer_loss, inv_loss = task, 0.0, 0.0
        for l in range(1, L):
            lin, act = self.pairs[l - 1]
            loss_l = _sq(act(lin(h[l - 1])), targets[l])
            total, layer_loss = total + loss_l, layer_loss + loss_l.detach()
        for l in range(2, L):
            lin, act = self.pairs[l - 1]
            g = self.inverses[self.names[l - 1]]
            noisy = h[l - 1] + self.noise * torch.randn_like(h[l - 1])
            with torch.no_grad():
                up = act(lin(noisy))
            loss_inv = _sq(g(up), noisy)
            total, inv_loss = total + loss_inv, inv_loss + loss_inv.detach()
        return total, {"loss": task.detach(), "layer_loss": torch.as_tensor(layer_loss),
                       "inverse_loss": torch.as_tensor(inv_loss)}

    @torch.no_grad()
    def reconstruction_error(self, x) -> dict[str, float]:
        """Mean 0.5 ||g_l(f_l(h_{l-1})) - h_{l-1}||² per inverse, on clean inputs."""
        _, h = self.forward_all(x)
        out = {}
        for l in range(2, len(self.pairs)):
            name = self.names[l - 1]
            out[name] = float(_sq(self.inverses[name](h[l]), h[l - 1]))
        return out

    def diagnostics(self, x, y):
        out = super().diagnostics(x, y)
        out.update({f"inverse_error/{k}": v for k, v in self.reconstruction_error(x).items()})
        return out


@RULES.register("tp")
class TP(TargetProp):
    """Target propagation: t_{l-1} = g_l(t_l)."""


@RULES.register("dtp")
class DTP(TargetProp):
    """Difference target propagation: t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)."""

    difference = True
