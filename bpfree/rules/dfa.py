"""Direct feedback alignment (Nøkland 2016; BioTorch 'dfa'): the output error e = dL/d(logits)
reaches every layer through that layer's own fixed random matrix, not through the layers above.

Same converter as feedback.py (any model's nn.Linear / nn.Conv2d, swapped in place). The last weight
layer in module order is the output layer (its output is the pre-softmax logits; true for every bpfree
classifier). In the backward pass, which reaches the output layer first, it records e (N, classes);
every layer then sends `e @ B_l` to its input instead of `dy Wᵀ`, where B_l: (classes, numel of one
input sample). So the error entering layer l-1's activation is B_l e, multiplied by that activation's
derivative on the way down, exactly Nøkland's δa_{l-1} = (B e) ⊙ f'(a_{l-1}). Weight gradients use
the error a layer receives, as in backprop. Residual shortcuts still add the signals of later layers.

B_l is drawn on first use (a conv's input size is only known then) from a generator seeded by a
per-layer seed drawn at construction, so it is the same after a resume and needs no checkpoint entry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.registry import RULES
from bpfree.rules.feedback import CONV_ARGS, FeedbackRule, _check_conv, conv_grads, linear_param_grads


class _ErrorHub:
    """The output error of the current backward pass, shared by one model's DFA layers."""

    def __init__(self):
        self.e: torch.Tensor | None = None


class DFALayer(nn.Module):
    def __init__(self, base: nn.Module, hub: _ErrorHub):
        super().__init__()
        self.base_kind = type(base)
        self.weight, self.bias = base.weight, base.bias
        if isinstance(base, nn.Conv2d):
            _check_conv(base)
            self.spec = {k: getattr(base, k) for k in CONV_ARGS}
        self.hub, self.is_output, self.exact = hub, False, False
        self.seed = int(torch.randint(0, 2**62, (1,)))
        self._B: torch.Tensor | None = None  # (classes, numel of one input sample), made on first use

    def projection(self, classes: int, in_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        numel = in_shape.numel()
        if self._B is None or self._B.shape != (classes, numel):
            g = torch.Generator().manual_seed(self.seed)
            # std 1/sqrt(classes): B e then has per-unit variance |e|², the scale of the error itself
            self._B = (torch.randn(classes, numel, generator=g) / classes**0.5).to(like.device, like.dtype)
        return self._B

    def direct_input_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.is_output:
            self.hub.e = g.reshape(g.shape[0], -1)  # (N, classes): dL/d logits
        e = self.hub.e
        if e is None or e.shape[0] != x.shape[0]:
            raise RuntimeError(
                "dfa: no output error for this batch; the model's last Linear/Conv2d must produce the "
                "logits and run in the same forward pass as the other layers")
        B = self.projection(e.shape[1], x.shape[1:], e)
        return (e @ B).view_as(x)  # (N, classes) @ (classes, numel) -> input shape

    def forward(self, x):
        if self.base_kind is nn.Linear:
            if self.exact:
                return F.linear(x, self.weight, self.bias)
            if x.dim() != 2:
                raise RuntimeError(f"dfa handles Linear layers on (N, features) inputs, got {tuple(x.shape)}")
            return _LinearDFA.apply(x, self.weight, self.bias, self)
        if self.exact:
            return F.conv2d(x, self.weight, self.bias, **self.spec)
        return _ConvDFA.apply(x, self.weight, self.bias, self)


class _LinearDFA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        nx, nw, nb, _ = ctx.needs_input_grad
        gw, gb = linear_param_grads(g, x, nw, nb and ctx.layer.bias is not None)
        gx = ctx.layer.direct_input_grad(g, x) if (nx or ctx.layer.is_output) else None
        return (gx if nx else None), gw, gb, None


class _ConvDFA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x)
        ctx.layer = layer
        return F.conv2d(x, weight, bias, **layer.spec)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        nx, nw, nb, _ = ctx.needs_input_grad
        L = ctx.layer
        has_bias = L.bias is not None
        _, gw, gb = conv_grads(g, x, L.weight, L.spec, has_bias, [False, nw, nb and has_bias])
        gx = L.direct_input_grad(g, x) if (nx or L.is_output) else None
        return (gx if nx else None), gw, gb, None


@RULES.register("dfa")
class DirectFeedbackAlignment(FeedbackRule):
    reports_B = False  # B_l maps the output error, not this layer's output: no "B vs Wᵀ"

    def __init__(self, model, loss_fn):
        self.hub = _ErrorHub()
        super().__init__(model, loss_fn)
        list(self.layers.values())[-1].is_output = True

    def make_layer(self, base):
        return DFALayer(base, self.hub)
