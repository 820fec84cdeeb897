"""Local representation alignment (lra): backprop-free-transformers §6, after Ororbia & Mali 2019
(LRA-E, the error-driven variant).

Layers a_l = W_l h_{l-1} + b_l, h_l = act_l(a_l), l = 1..L (the output layer's act is log-softmax).
Each step:
  1. forward, keeping every a_l and h_l;
  2. error units from the top: e_L = softmax(a_L) - onehot(y) (the output error, dL/da_L per sample);
     for l = L..2: target for the layer below from its pre-activation,
        t_{l-1} = act_{l-1}(a_{l-1} - beta * e_l E_l)     (E_l: error weights, stored in W_l's shape)
        e_{l-1} = h_{l-1} - t_{l-1}                       (the error unit of layer l-1)
  3. local losses (inputs detached): the task loss for the output layer; 0.5 ||h_l - t_l||² below
     (derivative=True, gradient e_l ⊙ act'(a_l) h_{l-1}ᵀ), or LRA-E's own update e_l h_{l-1}ᵀ without
     the activation derivative (derivative=False, AnkurMali/LRA-E mnist.py: dW = eᵀh).
     Error weights follow their layer's update transposed (LRA-E: ΔE_l = -γ ΔW_lᵀ, γ = 1 as the
     authors' code): E_l.grad = W_l.grad. E_l ~ N(0, error_std²) (the authors: 1.0, ten times W's 0.1)
     or, with error_std null, W_l's own std.
No weight transport (targets use E, never W) and the backward neurons compute what forward ones do
(a linear map followed by the layer's own activation): the asymmetry problem of §3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.registry import RULES
from bpfree.rules.feedback import random_like_layer
from bpfree.rules.target_prop import LayerwiseRule


@RULES.register("lra")
class LRA(LayerwiseRule):
    def __init__(self, model, loss_fn, *, beta: float, error_std: float | None, derivative: bool):
        # defaults: conf/method/lra.yaml
        super().__init__(model, loss_fn, "lra")
        if error_std is not None and error_std <= 0:
            raise ValueError(f"lra: method.error_std must be > 0 or null (= each W's own std), got {error_std}")
        self.beta, self.derivative = beta, derivative
        # E_l for l = 2..L (E_1 would make a target for the input); same shape as W_l: (d_l, d_{l-1}).
        # error_std: N(0, error_std²) as LRA-E's code (E ~ N(0, 1) against W ~ N(0, 0.1)); null: W's std.
        def draw(w):
            return torch.randn_like(w) * error_std if error_std is not None else random_like_layer(w)
        self.error_weights = nn.ParameterDict({
            self.names[i]: nn.Parameter(draw(lin.weight.detach()))
            for i, (lin, _) in enumerate(self.pairs) if i > 0})

    def local_losses(self, x, y):
        pre, h = self.forward_all(x)
        L = len(self.pairs)
        # Error units in float64: e_{l-1} = h_{l-1} - t_{l-1} is a difference of near-equal numbers, of
        # size beta^(L-l) relative to h, which float32 loses below the top few layers.
        with torch.no_grad():
            e = (F.softmax(pre[-1], dim=1) - F.one_hot(y, pre[-1].shape[1])).double()  # (N, classes)
            errors = {}
            for l in range(L, 1, -1):  # 1-based layer l sends a target to layer l-1
                E = self.error_weights[self.names[l - 1]].double()  # (d_l, d_{l-1})
                _, act_below = self.pairs[l - 2]
                t = act_below(pre[l - 2].double() - self.beta * e @ E)
                e = h[l - 1].double() - t
                errors[l - 1] = e.to(h[l - 1].dtype)
        lin_L, act_L = self.pairs[-1]
        task = self.loss_fn(act_L(lin_L(h[L - 1])), y)
        total, layer_loss = task, 0.0
        for l in range(1, L):
            lin, act = self.pairs[l - 1]
            # 0.5 ||act(lin(h_{l-1})) - t_l||² has gradient e_l * d act(lin(h_{l-1})) at the current
            # weights (where act(lin(h_{l-1})) = h_l); this surrogate gives exactly that gradient
            # without forming h_l - t_l in float32 again.
            # derivative=False: LRA-E's own update ΔW_l = e_l h_{l-1}ᵀ (mnist.py: dW = e^T h), which
            # skips act'(a_l); the surrogate lin(h_{l-1}) · e_l has exactly that gradient.
            out_l = act(lin(h[l - 1])) if self.derivative else lin(h[l - 1])
            total = total + (out_l * errors[l]).sum(1).mean()
            layer_loss = layer_loss + 0.5 * errors[l].pow(2).sum(1).mean()
        return total, {"loss": task.detach(), "layer_loss": torch.as_tensor(layer_loss)}

    def compute_grads(self, x, y):
        out = super().compute_grads(x, y)
        for i, (lin, _) in enumerate(self.pairs):
            if i > 0:
                self.error_weights[self.names[i]].grad = lin.weight.grad.clone()
        return out
