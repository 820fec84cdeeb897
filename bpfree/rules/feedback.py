"""Weight-transport-free rules: feedback alignment (fa), uniform sign-concordant feedback (usf),
Kolen-Pollack (kp) and weight mirror (wm). backprop-free-transformers §4; Lillicrap et al. 2016;
Akrout et al. 2019; Moskovitz et al. 2018 / BioTorch (Sanfiz & Akrout 2021).

How: `convert(model, ...)` swaps every nn.Linear / nn.Conv2d of ANY model (MLP, CNN, ResNet,
attention projections written as nn.Linear) in place for a `FeedbackLinear` / `FeedbackConv2d` that
shares the original weight and bias Parameters. Their forward is the original layer's; their backward
(an autograd Function) sends the error to the layer's input through a feedback matrix B instead of
Wᵀ. The weight and bias gradients are the usual ones. So each rule keeps the ordinary train step
(zero_grad, loss.backward, optimizer.step) and differs only in how B is made and changed:

    fa   B fixed random, never changed
    usf  B = sign(W) * s, recomputed from the current W at every forward (s fixed per layer)
    kp   B gets W's update and the same decay as W, so W - B shrinks by (1 - decay) per step and
         B -> W (i.e. the backward uses Wᵀ); kept in closed form, see KolenPollack
    wm   after each engaged (FA) step, `mirror_steps` mirror steps: each layer is driven by noise x
         and B <- B + eta * mean(y xᵀ) - lambda * B with y = W x, whose mean is sigma² W

Convention: B is stored in W's shape (out, in[, kh, kw]); the backward uses it where backprop uses
W, so "the angle between B and Wᵀ" is `alignment.angle(B, W)`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.alignment import angle, grad_alignment, rule_and_true_grads
from bpfree.models.surgery import layer_names, swap
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, LossFn, UnsupportedModel


# ---------------------------------------------------------------- gradient arithmetic (shared with dfa)
def linear_param_grads(g: torch.Tensor, x: torch.Tensor, need_w: bool, need_b: bool):
    """Weight/bias gradients of y = x Wᵀ + b for any leading dims. g: (..., out), x: (..., in)."""
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    return (g2.t() @ x2 if need_w else None), (g2.sum(0) if need_b else None)


CONV_ARGS = ("stride", "padding", "dilation", "groups")


def conv_grads(g, x, weight_like, spec: dict, has_bias: bool, mask):
    """(grad_input, grad_weight, grad_bias) of conv2d in one aten call, the call autograd itself makes.
    grad_input is computed with `weight_like` (B for feedback rules, W for backprop); the weight and
    bias gradients do not depend on the weight's values, only its shape. spec: CONV_ARGS."""
    bias_sizes = [weight_like.shape[0]] if has_bias else None
    return torch.ops.aten.convolution_backward(
        g, x, weight_like, bias_sizes, spec["stride"], spec["padding"], spec["dilation"], False, [0, 0],
        spec["groups"], mask)


def _check_conv(conv: nn.Conv2d) -> None:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise UnsupportedModel(
            f"feedback rules handle Conv2d with integer zero padding; got padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}. Write the padding as integers (e.g. padding=1)")


class _LinearFB(torch.autograd.Function):
    """y = x Wᵀ + b; backward: dx = dy B (B in W's shape), dW and db exact."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        nx, nw, nb, _ = ctx.needs_input_grad
        gx = g @ feedback if nx else None  # (..., out) @ (out, in) -> (..., in)
        gw, gb = linear_param_grads(g, x, nw, nb and ctx.has_bias)
        return gx, gw, gb, None


class _ConvFB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, spec):
        ctx.save_for_backward(x, feedback)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return F.conv2d(x, weight, bias, **spec)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        nx, nw, nb, _, _ = ctx.needs_input_grad
        gx, gw, gb = conv_grads(g, x, feedback, ctx.spec, ctx.has_bias, [nx, nw, nb and ctx.has_bias])
        return gx, gw, gb, None, None


class FeedbackLayer(nn.Module):
    """The bookkeeping every layer a feedback rule swaps in shares (FeedbackLinear, FeedbackConv2d and
    dfa's DFALayer): the original weight/bias Parameters (same objects, so optimizers and checkpoints
    see no change), the layer's shape attributes and conv settings, `exact` (ordinary autograd, to
    measure the true gradient) and the plain forward. Subclasses implement `feedback_forward`, the
    forward whose backward is the rule's. With `feedback` given, B is kept as a buffer."""

    def __init__(self, base: nn.Module, feedback: torch.Tensor | None = None, sign_scale: float | None = None):
        super().__init__()
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            _check_conv(base)
            for k in ("in_channels", "out_channels", "kernel_size", *CONV_ARGS):
                setattr(self, k, getattr(base, k))
            self.spec = {k: getattr(base, k) for k in CONV_ARGS}
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        if feedback is not None:
            # a buffer: checkpointed and moved by .to(), never touched by the optimizer (kp and wm change
            # it in place after each step, usf derives B from W at each forward)
            self.register_buffer("feedback", feedback.detach().clone())
        self.sign_scale = sign_scale  # usf: B = sign(W) * sign_scale, refreshed at each forward
        self.exact = False  # True: ordinary autograd (used to measure the true gradient)

    def plain(self, x):  # the original layer's forward: (..., in) -> (..., out) or conv maps
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, **self.spec)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x):
        return self.plain(x) if self.exact else self.feedback_forward(x)

    def feedback_forward(self, x):
        raise NotImplementedError

    def current_feedback(self) -> torch.Tensor:
        """The B the next backward uses: usf makes it fresh from the current W (a new tensor, so a
        graph that saved an older one stays valid); the other rules use the stored one."""
        if self.sign_scale is not None:
            return torch.sign(self.weight.detach()) * self.sign_scale
        return self.feedback

    def describe(self) -> str:  # the rule's part of the repr
        return f"sign_B={self.sign_scale is not None}"

    def extra_repr(self):
        if self.is_conv:
            return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                    f"stride={self.stride}, padding={self.padding}, {self.describe()}")
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"


class FeedbackLinear(FeedbackLayer):
    def feedback_forward(self, x):  # (..., in) -> (..., out)
        return _LinearFB.apply(x, self.weight, self.bias, self.current_feedback())


class FeedbackConv2d(FeedbackLayer):
    def feedback_forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H', W')
        return _ConvFB.apply(x, self.weight, self.bias, self.current_feedback(), self.spec)


# ---------------------------------------------------------------- the converter
def convert(model: nn.Module, make: Callable[[nn.Module], nn.Module], rule: str) -> dict[str, nn.Module]:
    """Swap every nn.Linear / nn.Conv2d in `model` (at any depth) for `make(layer)`, in place
    (surgery.swap). Returns the new layers by short name (surgery.layer_names), in module order."""
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            raise UnsupportedModel(
                f"{rule}: {type(model).__name__}.{n} is an nn.MultiheadAttention, which computes its "
                "projections from its own weight tensors (F.multi_head_attention_forward), so they "
                "cannot be swapped. Write attention with nn.Linear projections (nanoGPT style)")
    names = layer_names(model)
    if not names:
        raise UnsupportedModel(f"{rule} needs nn.Linear or nn.Conv2d layers; {type(model).__name__} has none")
    for s, m in names.items():
        if type(m) not in (nn.Linear, nn.Conv2d):
            raise UnsupportedModel(
                f"{rule}: layer {s} is a {type(m).__name__} (a subclass of "
                "Linear/Conv2d whose forward may differ); use plain nn.Linear / nn.Conv2d")
    return swap(model, lambda m: type(m) in (nn.Linear, nn.Conv2d), make)


def random_like_layer(weight: torch.Tensor) -> torch.Tensor:
    """A fixed random B with the layer's own weight scale (std of W at conversion), so the feedback
    signal has the size backprop's would have at initialisation."""
    return torch.randn_like(weight) * weight.detach().std().clamp_min(1e-8)


@contextmanager
def exact_backward(layers: Iterable[nn.Module]):
    """Inside: the swapped layers run ordinary autograd, giving the true backprop gradient."""
    layers = list(layers)
    for m in layers:
        m.exact = True
    try:
        yield
    finally:
        for m in layers:
            m.exact = False


# ---------------------------------------------------------------- the rules
class FeedbackRule(LearningRule):
    """Base for rules that only change the backward pass. Subclasses say how B starts
    (`initial_feedback`), whether it is sign(W) (`sign_feedback`) and what happens after the
    optimizer step (`after_step`)."""

    sign_feedback = False
    reports_B = True  # whether B has W's shape (angle B vs Wᵀ is defined)

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__(model, loss_fn)
        self.layers = convert(model, self.make_layer, type(self).__name__)  # plain dict: the modules live in model

    def initial_feedback(self, weight: torch.Tensor) -> torch.Tensor:
        return random_like_layer(weight)

    def make_layer(self, base: nn.Module) -> nn.Module:
        scale = float(base.weight.detach().abs().mean()) if self.sign_feedback else None
        cls = FeedbackLinear if isinstance(base, nn.Linear) else FeedbackConv2d
        return cls(base, self.initial_feedback(base.weight), scale)

    def diagnostics(self, x, y) -> dict[str, float]:
        out = {}
        if self.reports_B:
            for n, m in self.layers.items():
                out[f"angle_B/{n}"] = angle(m.current_feedback(), m.weight)
        out.update(self.gradient_angles(x, y))
        return out

    def gradient_angles(self, x, y) -> dict[str, float]:
        """Angle between this rule's weight gradient and backprop's, per layer, on (x, y)."""
        weights = {n: m.weight for n, m in self.layers.items()}
        return grad_alignment(*rule_and_true_grads(self, x, y, weights, exact=exact_backward(self.layers.values())))


@RULES.register("fa")
class FeedbackAlignment(FeedbackRule):
    """Lillicrap et al. 2016: a fixed random B replaces Wᵀ in the backward pass."""


@RULES.register("usf")
class SignSymmetry(FeedbackRule):
    """Uniform sign-concordant feedback (Moskovitz et al. 2018; BioTorch 'usf'): B = sign(W) * s,
    with s the mean |W| of the layer at conversion (the uniform magnitude)."""

    sign_feedback = True


@RULES.register("kp")
class KolenPollack(FeedbackRule):
    """Kolen & Pollack 1994, Akrout et al. 2019 (backprop-free-transformers §4.3): B receives the same
    update as W and the same weight decay, W <- (1-decay) W and B <- (1-decay) B after each step.

    Kept in closed form: equal updates leave B - W unchanged and the decay shrinks it, so after t steps
    B_t = W_t + (1-decay)^t (B_0 - W_0). We store D = B_0 - W_0 and the scalar (1-decay)^t and rebuild
    B from the current W after every step: the same B as running the update on B with a second
    optimizer state, without that state or its cost (per step: one scale of W, one add)."""

    def __init__(self, model, loss_fn, *, decay: float):  # default: conf/method/kp.yaml
        if not 0 <= decay < 1:
            raise ValueError(f"kp decay must be in [0, 1) (a per-step shrink factor), got {decay}")
        self.decay = decay
        super().__init__(model, loss_fn)
        for m in self.layers.values():
            m.register_buffer("kp_offset", m.feedback - m.weight.detach())  # D = B_0 - W_0
        self.register_buffer("kp_shrink", torch.ones((), dtype=torch.float64))  # (1-decay)^t

    @torch.no_grad()
    def after_step(self):
        self.kp_shrink.mul_(1 - self.decay)
        c = float(self.kp_shrink)
        for m in self.layers.values():
            if self.decay:
                m.weight.mul_(1 - self.decay)
            torch.add(m.weight, m.kp_offset, alpha=c, out=m.feedback)


@RULES.register("wm")
class WeightMirror(FeedbackRule):
    """Akrout et al. 2019 (backprop-free-transformers §4.2). Engaged mode = an FA step. Mirror mode,
    `mirror_steps` times after each engaged step: each layer's input is driven by noise
    x ~ N(0, noise²) (a batch of `mirror_batch`; for a conv, patches of its receptive field), its
    output y = W x (no bias: E[x]=0 makes the bias drop out anyway), and
    B <- B + lr * mean(y xᵀ) - decay * B. The mean is noise² W, so B -> (lr noise² / decay) W;
    the defaults make that W itself."""

    def __init__(self, model, loss_fn, *, mirror_steps: int, mirror_lr: float, mirror_decay: float, noise: float,
                 mirror_batch: int):  # defaults: conf/method/wm.yaml
        if mirror_steps < 0 or mirror_batch < 1:
            raise ValueError(f"wm needs mirror_steps >= 0 and mirror_batch >= 1, got {mirror_steps}, {mirror_batch}")
        self.mirror_steps, self.mirror_lr, self.mirror_decay = mirror_steps, mirror_lr, mirror_decay
        self.noise, self.mirror_batch = noise, mirror_batch
        super().__init__(model, loss_fn)

    @torch.no_grad()
    def mirror(self, steps: int = 1) -> None:
        for _ in range(steps):
            for m in self.layers.values():
                w, n = m.weight, self.mirror_batch
                if isinstance(m, FeedbackLinear):
                    x = torch.randn(n, m.in_features, device=w.device, dtype=w.dtype) * self.noise
                    y = x @ w.t()                       # (n, out)
                    corr = y.t() @ x / n                # (out, in) ~ noise² W
                else:
                    kh, kw = (d * (k - 1) + 1 for d, k in zip(m.dilation, m.kernel_size))
                    x = torch.randn(n, m.in_channels, kh, kw, device=w.device, dtype=w.dtype) * self.noise
                    y = F.conv2d(x, w, None, 1, 0, m.dilation, m.groups)  # (n, out, 1, 1)
                    _, corr, _ = torch.ops.aten.convolution_backward(
                        y, x, w, None, [1, 1], [0, 0], m.dilation, False, [0, 0], m.groups,
                        [False, True, False])
                    corr = corr / n
                m.feedback.mul_(1 - self.mirror_decay).add_(corr, alpha=self.mirror_lr)

    def after_step(self):
        self.mirror(self.mirror_steps)
