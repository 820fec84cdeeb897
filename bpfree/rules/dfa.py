"""Direct feedback alignment (Nøkland 2016; BioTorch 'dfa'): the output error e = dL/d(logits)
reaches every layer through that layer's own fixed random matrix, not through the layers above.

Same converter as feedback.py (any model's nn.Linear / nn.Conv2d, swapped in place). The last weight
layer in module order is the output layer (its output is the pre-softmax logits; true for every bpfree
classifier). In the backward pass, which reaches the output layer first, it records e: (N, classes),
or (N, T, classes) for per-token outputs (seq2seq). Where the error is delivered is `placement`:

  layer  (Nøkland 2016): every layer sends `e B_l` to its input instead of `dy Wᵀ`. The error
         entering layer l-1's activation is B_l e, multiplied by that activation's derivative on the
         way down, exactly Nøkland's δa_{l-1} = (B e) ⊙ f'(a_{l-1}). Residual shortcuts still add the
         signals of later layers.
  block  (Launay et al. 2020's "macro" DFA for transformers, their `dfa='simple'`: one feedback
         point at the output of each encoder layer, backprop inside it): the gradient at the output
         of every model block but the last (`model.blocks`: emb, L1..Ln; head keeps its true
         gradient) is replaced by e B_block; within a block ordinary backprop runs. For an MLP the two
         placements are the same update (each block is one Linear + activation).

Shapes. A signal for a (N, F) tensor or a conv's (N, C, H, W) input is e (N, classes) @ B, B:
(classes, numel of one sample). For a sequence stream (N, T, d) B is (classes, d), shared by the
positions: with one error per sequence (a classifier) every token position receives the same e B
(Launay et al. deliver the error to every position; here the classifier has one error per sequence),
masked to the real tokens when the model has `padding_mask(x)` -> (N, T) bool; with per-token errors
of the same length (N, T, classes), position t receives e_t B.

Weight gradients use the error a layer receives, as in backprop. B is drawn on first use from a
generator seeded by a per-layer seed drawn at construction, so it is the same after a resume and
needs no checkpoint entry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.models import surgery
from bpfree.models.surgery import block_names
from bpfree.registry import RULES
from bpfree.rules.feedback import FeedbackLayer, FeedbackRule, conv_grads, linear_param_grads

PLACEMENTS = ("layer", "block")


class _ErrorHub:
    """The output error of the current backward pass (and which tokens are real), shared by one
    model's DFA layers and block hooks."""

    def __init__(self):
        self.e: torch.Tensor | None = None
        self.real: torch.Tensor | None = None  # (N, T) bool from model.padding_mask, or None
        self.output: "DFALayer | None" = None


class _Projection:
    """A fixed random B (classes, width), drawn on first use from its own seed."""

    def __init__(self):
        self.seed = int(torch.randint(0, 2**62, (1,)))
        self._B: torch.Tensor | None = None

    def matrix(self, classes: int, width: int, like: torch.Tensor) -> torch.Tensor:
        if self._B is None or self._B.shape != (classes, width):
            g = torch.Generator().manual_seed(self.seed)
            # std 1/sqrt(classes): B e then has per-unit variance |e|², the scale of the error itself
            self._B = torch.randn(classes, width, generator=g) / classes**0.5
        return self._B.to(like.device, like.dtype)


def direct_signal(hub: _ErrorHub, proj: _Projection, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """e B for a tensor of `shape` (see the module docstring for the shapes)."""
    e = hub.e
    if e is None or e.shape[0] != shape[0]:
        raise RuntimeError(
            "dfa: no output error for this batch; the model's last Linear/Conv2d must produce the "
            "logits and run in the same forward pass as the other layers")
    classes = e.shape[-1]
    if len(shape) == 3:  # a sequence stream (N, T, d)
        B = proj.matrix(classes, shape[-1], like)
        if e.dim() == 3 and e.shape[1] == shape[1]:
            return e @ B                                   # per-token errors: (N, T, C) @ (C, d)
        per_seq = e if e.dim() == 2 else e.sum(1)           # (N, C); other lengths: the sequence's summed error
        s = (per_seq @ B)[:, None, :].expand(shape)         # the same signal at every position
        real = hub.real
        if real is not None and tuple(real.shape) == tuple(shape[:2]):
            return s * real[..., None].to(s.dtype)          # padding positions receive nothing
        return s.contiguous()
    e2 = e.reshape(shape[0], -1)
    B = proj.matrix(e2.shape[1], shape[1:].numel(), like)
    return (e2 @ B).view(shape)                             # (N, C) @ (C, numel) -> shape


class DFALayer(FeedbackLayer):
    """A feedback layer (weight/bias, shapes, `exact`, plain forward: FeedbackLayer) whose input
    receives the direct signal e B instead of B's product with its own output gradient."""

    def __init__(self, base: nn.Module, hub: _ErrorHub):
        super().__init__(base)
        self.hub, self.is_output = hub, False
        self.direct = True  # False under block placement: plain autograd (the output layer still records e)
        self.proj = _Projection()

    def projection(self, classes: int, in_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """B for an input of per-sample shape `in_shape` (2-D / conv inputs: classes x numel)."""
        return self.proj.matrix(classes, in_shape.numel(), like)

    def record(self, g: torch.Tensor) -> None:
        self.hub.e = g  # dL/d logits: (N, classes) or (N, T, classes)

    def direct_input_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.is_output:
            self.record(g)
        return direct_signal(self.hub, self.proj, x.shape, g)

    def feedback_forward(self, x):
        if not self.direct:
            y = self.plain(x)
            if self.is_output and y.requires_grad:
                y.register_hook(lambda g: self.record(g))  # runs before any block output's hook
            return y
        if self.is_conv:
            return _ConvDFA.apply(x, self.weight, self.bias, self)
        return _LinearDFA.apply(x, self.weight, self.bias, self)

    def describe(self) -> str:
        return f"direct={self.direct}, output={self.is_output}"


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

    def __init__(self, model, loss_fn, *, placement: str):  # default: conf/method/dfa.yaml
        if placement not in PLACEMENTS:
            raise ValueError(f"dfa placement={placement!r}; valid: {', '.join(PLACEMENTS)} "
                             "(layer: Nøkland 2016, every layer's input; block: Launay et al. 2020 macro)")
        self.hub, self.placement = _ErrorHub(), placement
        super().__init__(model, loss_fn)
        self.hub.output = list(self.layers.values())[-1]
        self.hub.output.is_output = True
        if hasattr(model, "padding_mask"):
            model.register_forward_pre_hook(self._note_padding)
        self.block_proj: dict[str, _Projection] = {}
        if placement == "block":
            for m in self.layers.values():
                m.direct = False
            names = block_names(model)[:-1]  # the last block (head) keeps its true gradient
            self.block_proj = {name: _Projection() for name in names}
            surgery.output_hooks(model, names, self._block_hook)

    def _note_padding(self, model, args):
        self.hub.real = model.padding_mask(args[0])

    def _block_hook(self, name: str):
        proj = self.block_proj[name]

        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad and not self.hub.output.exact:
                out.register_hook(lambda g: direct_signal(self.hub, proj, g.shape, g))
            return out

        return hook

    def make_layer(self, base):
        return DFALayer(base, self.hub)
