"""Synthetic gradients at a block boundary: Jaderberg et al.'s (c)DNI synthesizers, virtual
forward-backward networks (VFBN) and layer-wise supervised losses (virtual-forward-backward-networks.md).

The model is cut at one or more block boundaries named by the addressing contract (`method.split=s2b9`,
a list cuts at each: every segment below the top one gets its own synthesizer; null = the model's
`default_split`, else the middle of its blocks). With h_k the output of
segment k (the stream leaving block `split[k]`, shape (B, *S)):

- segment k < top learns from the synthetic gradient delta_hat_k(h_k, y): h_k.backward(delta_hat_k / B)
  the moment h_k is computed; the top segment learns from the task loss as usual;
- each segment's input is detached, so nothing from above a split reaches below it;
- synthesizer k learns from the DETACHED target delta_k, minimising alpha_gs * ||delta_k - delta_hat_k||^2
  / (B * |S|) (the element mean, as Chainer's F.mean_squared_error and dni-pytorch's F.mse_loss; the sum
  over S made a linear synthesizer's regression diverge under SGD lr 0.1 * alpha_gs 1e-3: its Hessian
  grows with the 74 x 5 x 5 inputs and 11 x 11 positions per output): its input h_k is detached and the target
  is a constant, so nothing from the synthesizer's loss reaches the base model (the bug dni-pytorch's
  users hit, koz4k/dni-pytorch PR #3, was a true gradient that was not detached);
- `target: bp` (virtual-forward-backward-networks footnote 1: synchronous training) makes delta_k the
  gradient BP would give at h_k; `target: bootstrap` (Jaderberg et al. §3, every layer decoupled) makes
  it the gradient that segment k+1 sends down from its own synthetic gradient (the true one at the top).

Gradients are on the per-sample scale: delta = B * d(mean loss)/dh, i.e. d l(y_i, .)/dh_i for a network
without batch coupling, which is what eq. 6 synthesizes; the lower segment receives delta_hat / B, so a
synthesizer that returns the true delta trains exactly as BP (tests/test_synthetic.py).

Rules: `sg_linear` (eq. 7; App. B.1: one 5x5 conv on [h, one-hot y]), `sg_resnet` (App. B.1's small
ResNet synthesizer), `vfbn` (eq. 6: delta_hat = d l(y, v_f(h))/dh by autograd through a small virtual
network v_f; eq. 8/9 on vectors), `local_supervised` (segment k learns from its own classifier head's
loss at the split) and `bottom_half_bp` (`local_supervised` scored through that head and without the
top segment: Table 1's "bottom half with back prop" as a rule option, predict_from: split).

Per epoch, on the probe batch: `sg_cos/<split>` (cosine of delta_hat and the true delta, the batch as
one vector), `sg_cos_sample/<split>` (mean per-sample cosine), `sg_norm_ratio/<split>` (||delta_hat|| /
||delta||); every rule here, local_supervised's head gradient included.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.alignment import grad_alignment, saved_grads
from bpfree.models import surgery
from bpfree.models.surgery import block_names, blocks as model_blocks
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, UnsupportedModel


# the diagnostics' record keys (tables.yaml `diagnostics:` reads sg_cos/, sg_norm_ratio/)
SG_KEYS = {"sg_cos/": "cos", "sg_cos_sample/": "cos_sample", "sg_norm_ratio/": "norm_ratio"}


# ----------------------------------------------------------------------------------------- synthesizers
def _context(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot labels broadcast to h's layout: (B, K) for vectors, (B, K, H, W) for maps."""
    oh = F.one_hot(y, num_classes).to(h.dtype)
    return oh[:, :, None, None].expand(-1, -1, *h.shape[2:]) if h.dim() == 4 else oh


def _layer(kind: str, c_in: int, c_out: int, kernel: int = 3) -> nn.Module:
    return nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2) if kind == "map" else nn.Linear(c_in, c_out)


def _norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if kind == "map" else nn.BatchNorm1d(c)


def _zero(m: nn.Module) -> nn.Module:
    nn.init.zeros_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


class ResUnit(nn.Module):
    """Two (conv or linear) + BN + ReLU layers with a skip around them: relu(bn(W2 relu(bn(W1 z))) + z)."""

    def __init__(self, kind: str, c: int):
        super().__init__()
        self.f1, self.n1 = _layer(kind, c, c), _norm(kind, c)
        self.f2, self.n2 = _layer(kind, c, c), _norm(kind, c)

    def forward(self, z):
        return F.relu(self.n2(self.f2(F.relu(self.n1(self.f1(z))))) + z)


class LinearSynthesizer(nn.Module):
    """Eq. 7: delta_hat = W [h, y]. Maps: one kernel x kernel conv on the C + K maps of [h, one-hot y]
    (App. B.1: 5x5 on 64 + 10 = 74 maps at 11x11); vectors: one Linear on [h, y]."""

    def __init__(self, kind: str, c: int, num_classes: int, *, context: bool, kernel: int, zero_init: bool):
        super().__init__()
        self.num_classes, self.context = num_classes, context
        self.net = _layer(kind, c + (num_classes if context else 0), c, kernel)
        if zero_init:  # Jaderberg et al. §3 / dni-pytorch: the last layer starts at zero, delta_hat = 0
            _zero(self.net)

    def forward(self, h, y):
        return self.net(torch.cat([h, _context(h, y, self.num_classes)], 1) if self.context else h)


class ResNetSynthesizer(nn.Module):
    """App. B.1's "Jaderberg's small-ResNet": a 3x3 conv of [h, y] to `width` maps, 4 convs with a skip
    every 2, a final 3x3 conv back to C maps; BN + ReLU after every conv but the last. On vectors the same
    layout with Linear layers (our analogue; App. B.1 only describes maps)."""

    def __init__(self, kind: str, c: int, num_classes: int, *, context: bool, width: int, zero_init: bool):
        super().__init__()
        self.num_classes, self.context = num_classes, context
        self.inp = nn.Sequential(_layer(kind, c + (num_classes if context else 0), width), _norm(kind, width),
                                 nn.ReLU())
        self.units = nn.Sequential(ResUnit(kind, width), ResUnit(kind, width))
        self.out = _layer(kind, width, c)
        if zero_init:
            _zero(self.out)

    def forward(self, h, y):
        z = torch.cat([h, _context(h, y, self.num_classes)], 1) if self.context else h
        return self.out(self.units(self.inp(z)))


class VirtualNet(nn.Module):
    """v_f of eq. 6, emitting log-probabilities. Maps (App. B.1): 4 residual 3x3 convs at C maps (BN +
    ReLU each, a skip every 2), global average pooling, a linear softmax classifier. Vectors: `hidden`
    = [] is eq. 8's linear v_f, [n] eq. 9's one hidden layer (ReLU), and so on."""

    def __init__(self, kind: str, c: int, num_classes: int, *, hidden):
        super().__init__()
        if kind == "map":
            self.body = nn.Sequential(ResUnit(kind, c), ResUnit(kind, c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            layers, w = [], c
            for n in hidden:
                layers += [nn.Linear(w, n), nn.ReLU()]
                w = n
            self.body, c = nn.Sequential(*layers), w
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, h):
        return F.log_softmax(self.classifier(self.body(h)), dim=1)


class VFBNSynthesizer(nn.Module):
    """Eq. 6: delta_hat(h, y) = v_f'(h) x d l(y, v_f(h)) / d v_f(h) = d l(y, v_f(h)) / dh, by autograd.
    With grad mode on, the result keeps its graph to v_f's parameters (create_graph), so
    ||delta - delta_hat||^2 trains v_f through its own backward pass (second order)."""

    def __init__(self, kind: str, c: int, num_classes: int, *, loss_fn, hidden):
        super().__init__()
        self.vf, self.loss_fn = VirtualNet(kind, c, num_classes, hidden=hidden), loss_fn

    def forward(self, h, y):
        train_vf = torch.is_grad_enabled()
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            total = self.loss_fn(self.vf(h), y) * len(y)  # sum of per-sample losses: per-sample gradients
            (g,) = torch.autograd.grad(total, h, create_graph=train_vf)
        return g


class LocalHead(nn.Module):
    """The layer-wise supervised loss's classifier at the split: global average pooling (maps) and a
    linear softmax layer. Its 'synthetic gradient' (for the diagnostics) is d l(y, head(h)) / dh."""

    def __init__(self, kind: str, c: int, num_classes: int, *, loss_fn):
        super().__init__()
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if kind == "map" else []
        self.head, self.loss_fn = nn.Sequential(*pool, nn.Linear(c, num_classes), nn.LogSoftmax(dim=1)), loss_fn

    def forward(self, h, y):
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss_fn(self.head(h), y) * len(y), h)
        return g


# ---------------------------------------------------------------------------------------------- rules
class SplitRule(LearningRule):
    """The shared machinery: cut the model at `split`, one synthesizer per lower segment, the train step
    of the module docstring, predict = the model's own forward, per-split diagnostics."""

    def __init__(self, model: nn.Module, loss_fn, *, split, alpha_gs: float, target: str):
        super().__init__(model, loss_fn)
        if target not in ("bp", "bootstrap"):
            raise ValueError(f"method.target={target!r}; valid: bp (the gradient BP gives at h, "
                             "footnote 1) or bootstrap (the gradient sent down by the next synthesizer)")
        if alpha_gs < 0:
            raise ValueError(f"method.alpha_gs={alpha_gs} must be >= 0 (0 keeps the synthesizer at its init)")
        self.alpha_gs, self.target = float(alpha_gs), target
        names = block_names(model)
        if split is None:  # the model's own (resnet*_vfbn: App. B.1's), else the middle of its blocks
            split = getattr(model, "default_split", None) or names[max(len(names) // 2 - 1, 0)]
        splits = [split] if isinstance(split, str) else list(split)
        for s in splits:
            if s not in names[:-1]:
                raise ValueError(f"method.split names {s!r}, which is not a block {type(model).__name__} can be "
                                 f"cut after; valid block names: {names[:-1]}")
        if len(set(splits)) != len(splits) or not splits:
            raise ValueError(f"method.split={splits} must name distinct blocks, at least one")
        splits.sort(key=names.index)
        self.splits = splits
        cuts = [names.index(s) + 1 for s in splits]
        self.segments = [names[a:b] for a, b in zip([0, *cuts], [*cuts, len(names)])]
        shapes, self.num_classes = self._probe_shapes(model, names)
        synths = []
        for s in splits:
            shape = shapes[s]
            kind = {3: "map", 1: "vector"}.get(len(shape))
            if kind is None:
                raise UnsupportedModel(f"{type(self).__name__} needs a (B, C, H, W) or (B, D) stream at the split; "
                                       f"block {s!r} of {type(model).__name__} emits (B, {', '.join(map(str, shape))})")
            synth = self.make_synthesizer(kind, shape[0], self.num_classes)
            self._check_shape(synth, s, shape, names)
            synths.append(synth)
        self.synths = nn.ModuleList(synths)

    # -- construction helpers
    @staticmethod
    @torch.no_grad()
    def _probe_shapes(model, names):
        if not hasattr(model, "input_shape"):
            raise UnsupportedModel(f"{type(model).__name__} has no input_shape; the synthetic-gradient rules "
                                   "size their synthesizers from a probe forward pass")
        was = model.training
        model.eval()
        z, shapes = surgery.entry(model, torch.zeros(2, *model.input_shape)), {}
        try:
            for n in names:
                z = model.blocks[n](z)
                if isinstance(z, torch.Tensor):
                    shapes[n] = tuple(z.shape[1:])
        finally:
            model.train(was)
        return shapes, z.shape[-1]

    def _check_shape(self, synth, split, shape, names):
        was = synth.training
        synth.eval()
        with torch.no_grad():
            out = synth(torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long))
        synth.train(was)
        if tuple(out.shape[1:]) != tuple(shape):
            raise ValueError(f"{type(self).__name__}'s synthesizer at split {split!r} emits (B, "
                             f"{', '.join(map(str, out.shape[1:]))}) but h there is (B, {', '.join(map(str, shape))}); "
                             f"fix the synthesizer's settings (e.g. an odd method.kernel) or cut elsewhere; "
                             f"valid block names: {names[:-1]}")

    def make_synthesizer(self, kind: str, c: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    # -- training
    def _run(self, k: int, z):
        return surgery.run_blocks(self.model, self.segments[k], surgery.entry(self.model, z) if k == 0 else z)

    def lower_update(self, k: int, h: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> dict:
        """Segment k's update from its synthesizer, and the synthesizer's own update from `target`."""
        synth, b = self.synths[k], len(y)
        if self.alpha_gs > 0:
            dh = synth(h.detach(), y)  # graph reaches the synthesizer's parameters only
            sg_loss = (dh - target.detach()).pow(2).mean()
            if sg_loss.requires_grad:  # (a synthesizer without parameters has nothing to learn)
                (self.alpha_gs * sg_loss).backward()
            dh = dh.detach()
        else:  # alpha_gs = 0: the synthesizer stays at its initialisation (Table 1, VFBN alpha = 0)
            with torch.no_grad():
                dh = synth(h.detach(), y)
                sg_loss = (dh - target).pow(2).mean()
        h.backward(dh / b)
        return {f"sg_loss/{self.splits[k]}": sg_loss.detach()}

    def compute_grads(self, x, y):
        b, top = len(y), len(self.segments) - 1
        ins, outs, z = [], [], x
        for k in range(top + 1):
            if k > 0:  # each segment starts from a detached copy: nothing from above reaches below
                z = z.detach().requires_grad_(True)
            ins.append(z)
            z = self._run(k, z)
            outs.append(z)
        loss = self.loss_fn(outs[top], y)
        loss.backward()
        stats = {"loss": loss.detach()}
        true = ins[top].grad * b  # the gradient BP gives at h_{top-1}, per-sample scale
        for k in range(top - 1, -1, -1):
            target = true if self.target == "bp" else ins[k + 1].grad * b
            if self.target == "bp" and k > 0:  # carry BP's gradient one segment further down
                (true,) = torch.autograd.grad(outs[k], ins[k], true, retain_graph=True)
            stats |= self.lower_update(k, outs[k], y, target)
        return stats

    # -- depth-parallel stages (bpfree/parallel.py)
    def segment_step_times(self, x, y, repeats: int = 3) -> list[float]:
        """Seconds of one update of each segment (forward, its synthesizer, backward) on (x, y), the
        fastest of `repeats`: the costs stage_defs balances. Leaves gradients filled (the caller zeroes)."""
        top, times = len(self.segments) - 1, [float("inf")] * len(self.segments)
        for _ in range(repeats):
            z = x
            for j in range(top + 1):
                t0 = time.perf_counter()
                z_in = z.detach().requires_grad_(j > 0)
                out = self._run(j, z_in)
                if j == top:
                    self.loss_fn(out, y).backward()
                else:
                    dh = self.synths[j](out.detach(), y)
                    if dh.requires_grad:
                        dh.pow(2).mean().backward()
                    out.backward(dh.detach())
                times[j] = min(times[j], time.perf_counter() - t0)
                z = out
        return times

    def stage_defs(self, k: int, sample: tuple | None = None, concurrent: bool = False,
                   groups: list[list[int]] | None = None) -> list:
        """k stages of consecutive segments (the parts; cuts only at splits), balanced by each segment's
        measured update time on `sample` = (x, y) (parameter counts without one); `groups` (0-based segment
        indices per stage) skips balancing. A stage holds its segments and the synthesizers (local heads)
        of the splits at their outputs: stage 1 = the bottom segments and the synthesizer at the cut.
        Messages (h, None, y) go up; for the synthetic-gradient rules the true gradient at the cut (per-sample
        scale, the synthesizer's target) comes back down (_SplitStage). `concurrent` changes nothing: every
        stage reads only its own parameters."""
        from bpfree.parallel import StageDef, balance

        if groups is None:
            if sample is not None:
                costs = self.segment_step_times(*sample)
                self.zero_grad(set_to_none=True)
            else:
                costs = [float(sum(p.numel() for p in self._stage_params([j]))) for j in range(len(self.segments))]
            groups = balance(costs, k)
        stages = []
        for g in groups:
            st = _SplitStage(self, g)
            top = g[-1] == len(self.segments) - 1
            receives = not top and self.sends_targets
            sends = g[0] > 0 and self.sends_targets
            label = "+".join("/".join(self.segments[j]) for j in g)
            st.stage = StageDef(self._stage_params(g), st.forward_backward, f"segments {label}", None, list(g),
                                st.send_back if sends else None, st.receive_back if receives else None)
            stages.append(st.stage)
        return stages

    sends_targets = True  # the synthesizers learn from the true gradient the stage above sends back

    def _stage_params(self, g: list[int]) -> list[nn.Parameter]:
        """Segments g's parameters and those of the synthesizers at their output splits."""
        out = [p for j in g for n in self.segments[j] for p in self.model.blocks[n].parameters()]
        return out + [p for j in g if j < len(self.splits) for p in self.synths[j].parameters()]

    def predict(self, x):
        return self.model(x)

    # -- diagnostics
    def _true_deltas(self, x, y):
        """h at every split and the gradient BP gives there (per-sample scale), in eval mode."""
        hs, z = [], surgery.entry(self.model, x)
        for n in model_blocks(self.model):
            z = self.model.blocks[n](z)
            if n in self.splits:
                hs.append(z)
        grads = torch.autograd.grad(self.loss_fn(z, y), hs)
        return [h.detach() for h in hs], [g * len(y) for g in grads]

    def diagnostics(self, x, y):
        with saved_grads(self.parameters()), torch.enable_grad():
            hs, deltas = self._true_deltas(x, y)
        with torch.no_grad():
            mine = {s: synth(h, y) for s, synth, h in zip(self.splits, self.synths, hs)}
        return grad_alignment(mine, dict(zip(self.splits, deltas)), SG_KEYS)

    def param_counts(self):
        count = lambda ps: sum(p.numel() for p in ps if p.requires_grad)  # noqa: E731
        return {"total": count(self.parameters()), "effective": count(self.model.parameters()),
                "synthesizers": count(self.synths.parameters())}


@contextmanager
def _stats_frozen(modules):
    """BatchNorm layers in `modules` leave their running statistics alone: a forward pass recomputed on a
    batch they have already counted once (a late target's update)."""
    bns = [m for mod in modules for m in mod.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, n) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(n)


class _SplitStage:
    """Segments `g` (0-based, consecutive) of a SplitRule as one pipeline stage (bpfree/parallel.py).

    forward_backward runs them on the detached input (x, or the h the stage below sent), as train_step
    does: the top stage learns from the task loss and its inner splits exactly as train_step; a lower
    stage updates its segments from the synthesizers' delta_hat at once (nothing waits for the stage above)
    and keeps the batch until the true gradient at its output cut comes back (receive_back): then the
    synthesizer there learns from it, and with target: bp the gradient is carried down to the stage's inner
    splits. A message that comes at staleness 0 finds the stage's parameters unchanged and reuses the
    batch's graphs (what train_step computes, bit for bit); one that comes d >= 1 steps late finds them
    moved, and delta_hat and the carry are recomputed with the current ones at the stored h (BatchNorm
    statistics untouched: that batch was counted once already). The top stage (and, for target: bootstrap,
    every stage above the first) sends down the gradient at its input, per-sample scale (send_back)."""

    def __init__(self, rule: SplitRule, g: list[int]):
        self.rule, self.g, self.top = rule, g, len(rule.segments) - 1
        self.pending: deque = deque()  # batches in flight: (ins, outs, y, {segment: delta_hat or None})
        self.back: torch.Tensor | None = None  # this batch's message down
        self.stage = None  # its StageDef: the engine writes stage.staleness before the first batch

    def forward_backward(self, inputs):
        z, _, y = inputs
        ins, outs = [], []
        for j in self.g:
            if j > 0:  # each segment starts from a detached copy, as in train_step
                z = z.detach().requires_grad_(True)
            ins.append(z)
            z = self.rule._run(j, z)
            outs.append(z)
        if self.g[-1] == self.top:
            return (), self._top(ins, outs, y)
        return (outs[-1].detach(), None, y), self._lower(ins, outs, y)

    def _top(self, ins, outs, y) -> dict:
        r, n = self.rule, len(y)
        loss = r.loss_fn(outs[-1], y)
        loss.backward()
        stats = {"loss": loss.detach()}
        true = ins[-1].grad * n if ins[-1].requires_grad else None
        for pos in range(len(self.g) - 2, -1, -1):  # the inner splits, top down: train_step's loop
            j = self.g[pos]
            target = true if r.target == "bp" else ins[pos + 1].grad * n
            if r.target == "bp" and j > 0:
                (true,) = torch.autograd.grad(outs[pos], ins[pos], true, retain_graph=True)
            stats |= r.lower_update(j, outs[pos], y, target)
        if self.g[0] > 0 and r.sends_targets:
            self.back = true if r.target == "bp" else ins[0].grad * n
        return stats

    def _lower(self, ins, outs, y) -> dict:
        r, n, d = self.rule, len(y), self.stage.staleness
        if not r.sends_targets:  # local_supervised: every split's own head loss, at once
            stats = {}
            for pos in reversed(range(len(self.g))):
                stats |= r.lower_update(self.g[pos], outs[pos], y, None)
            return stats
        carry = r.target == "bp"
        if carry and self.g[0] > 0 and d > 0:
            from bpfree.parallel import CannotStage

            raise CannotStage(f"{type(r).__name__} with method.target=bp: a middle stage (segments {self.g}) "
                              f"sends down the true gradient carried from the message above, which comes "
                              f"{d} step(s) late, so the delays would add up; use method.target=bootstrap, "
                              "trainer.stages=2, or trainer.staleness=0")
        keep = d == 0 and r.alpha_gs > 0  # delta_hat's graph serves a target that comes before any step
        stats, dhs = {f"sg_staleness_steps/{r.splits[self.g[-1]]}": float(d)}, {}
        for pos in reversed(range(len(self.g))):
            j = self.g[pos]
            if pos < len(self.g) - 1 and not carry:  # an inner split, bootstrap: its target is here
                stats |= r.lower_update(j, outs[pos], y, ins[pos + 1].grad * n)
                continue
            with torch.set_grad_enabled(keep):
                dh = r.synths[j](outs[pos].detach(), y)
            dhs[j] = dh if keep or r.alpha_gs == 0 else None
            # the carry (bp) later runs back through this segment: keep its graph when it may reuse it
            outs[pos].backward(dh.detach() / n, retain_graph=keep and carry and (pos > 0 or self.g[0] > 0))
        if self.g[0] > 0 and not carry:
            self.back = ins[0].grad * n
        if not keep:  # a late target meets moved parameters: keep the values only
            ins = [z.detach() for z in ins]
            outs = [h.detach() for h in outs]
        self.pending.append((ins, outs, y, dhs))
        return stats

    def receive_back(self, message, age: int) -> dict:
        r = self.rule
        (true,) = message
        ins, outs, y, dhs = self.pending.popleft()
        stats = {}
        for pos in reversed(range(len(self.g))):
            j = self.g[pos]
            if j not in dhs:  # bootstrap's inner splits learnt in forward_backward
                continue
            stats |= self._learn(j, outs[pos], y, dhs[j], true, age)
            if r.target == "bp" and (pos > 0 or self.g[0] > 0):
                true = self._carry(j, ins[pos], outs[pos], true, age)
        if self.g[0] > 0 and r.target == "bp":
            self.back = true
        return stats

    def _learn(self, j, h, y, dh, target, age) -> dict:
        """Synthesizer j's update from `target` (lower_update's second half)."""
        r = self.rule
        synth = r.synths[j]
        if r.alpha_gs > 0:
            if age > 0 or dh is None or not dh.requires_grad:
                with _stats_frozen([synth]):
                    dh = synth(h.detach(), y)
            sg_loss = (dh - target.detach()).pow(2).mean()
            if sg_loss.requires_grad:
                (r.alpha_gs * sg_loss).backward()
        else:  # alpha_gs = 0: the synthesizer stays at its initialisation; its error is still reported
            sg_loss = (dh - target).pow(2).mean()
        return {f"sg_loss/{r.splits[j]}": sg_loss.detach()}

    def _carry(self, j, z_in, out, true, age) -> torch.Tensor:
        """BP's gradient at segment j's input from `true` at its output (train_step's carry)."""
        if age == 0:
            (g,) = torch.autograd.grad(out, z_in, true)
            return g
        blocks = [self.rule.model.blocks[n] for n in self.rule.segments[j]]
        with torch.enable_grad(), _stats_frozen(blocks):
            z = z_in.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.rule._run(j, z), z, true)
        return g

    def send_back(self) -> tuple:
        back, self.back = self.back, None
        if back is None:
            raise RuntimeError(f"stage with segments {self.g} has no backward message for this batch")
        return (back.detach(),)


@RULES.register("sg_linear")
class SGLinear(SplitRule):
    """Jaderberg et al.'s linear synthesizer, eq. 7 (with label context: cDNI)."""

    def __init__(self, model, loss_fn, *, split, alpha_gs: float, target: str, context: bool, kernel: int,
                 zero_init: bool):
        self.cfg = dict(context=context, kernel=kernel, zero_init=zero_init)
        super().__init__(model, loss_fn, split=split, alpha_gs=alpha_gs, target=target)

    def make_synthesizer(self, kind, c, num_classes):
        return LinearSynthesizer(kind, c, num_classes, **self.cfg)


@RULES.register("sg_resnet")
class SGResNet(SplitRule):
    """Jaderberg's small-ResNet synthesizer of App. B.1."""

    def __init__(self, model, loss_fn, *, split, alpha_gs: float, target: str, context: bool, width: int,
                 zero_init: bool):
        self.cfg = dict(context=context, width=width, zero_init=zero_init)
        super().__init__(model, loss_fn, split=split, alpha_gs=alpha_gs, target=target)

    def make_synthesizer(self, kind, c, num_classes):
        return ResNetSynthesizer(kind, c, num_classes, **self.cfg)


@RULES.register("vfbn")
class VFBN(SplitRule):
    """Virtual forward-backward networks, eq. 6."""

    def __init__(self, model, loss_fn, *, split, alpha_gs: float, target: str, hidden):
        self.hidden = list(hidden)
        super().__init__(model, loss_fn, split=split, alpha_gs=alpha_gs, target=target)

    def make_synthesizer(self, kind, c, num_classes):
        return VFBNSynthesizer(kind, c, num_classes, loss_fn=self.loss_fn, hidden=self.hidden)


@RULES.register("local_supervised")
class LocalSupervised(SplitRule):
    """Table 1's layer-wise supervised loss: each lower segment learns, with its head, from the head's
    cross-entropy at the split; the top segment from the task loss on its detached input."""

    def __init__(self, model, loss_fn, *, split, target: str, predict_from: str):
        if predict_from not in ("top", "split"):
            raise ValueError(f"method.predict_from={predict_from!r}; valid: top (the whole model) or split "
                             "(the lower segment and its head: Table 1's bottom half with back prop)")
        self.predict_from = predict_from
        super().__init__(model, loss_fn, split=split, alpha_gs=1.0, target=target)
        if predict_from == "split" and len(self.splits) != 1:
            raise ValueError(f"predict_from=split needs one split, got {self.splits}")

    def make_synthesizer(self, kind, c, num_classes):
        return LocalHead(kind, c, num_classes, loss_fn=self.loss_fn)

    sends_targets = False  # the heads learn from the labels at the split: stages exchange forward messages only

    def stage_defs(self, k, sample=None, concurrent=False, groups=None):
        if self.predict_from == "split":
            from bpfree.parallel import CannotStage

            raise CannotStage("local_supervised with predict_from=split (bottom_half_bp) trains one segment: "
                              "nothing to stage; use trainer.parallel=null or predict_from=top")
        return super().stage_defs(k, sample, concurrent, groups)

    def lower_update(self, k, h, y, target):
        local = self.loss_fn(self.synths[k].head(h), y)  # h keeps its graph: lower segment + head by BP
        local.backward()
        return {f"local_loss/{self.splits[k]}": local.detach()}

    def _bottom(self, x):
        return self.synths[0].head(self._run(0, x))

    def compute_grads(self, x, y):
        if self.predict_from == "top":
            return super().compute_grads(x, y)
        loss = self.loss_fn(self._bottom(x), y)  # the top segment is never used: train only the bottom
        loss.backward()
        return {"loss": loss.detach()}

    def predict(self, x):
        if self.predict_from == "top":
            return self.model(x)
        views = getattr(self.model, "over_views", None)  # the model's test-view averaging, if it has one
        return views(x, self._bottom) if views is not None and self.model.test_views else self._bottom(x)

    def diagnostics(self, x, y):
        return super().diagnostics(x, y) if self.predict_from == "top" else {}

    def param_counts(self):
        out = super().param_counts()
        if self.predict_from == "split":  # the scored network: the blocks up to the split and the head
            lower = [p for n in self.segments[0] for p in self.model.blocks[n].parameters()]
            out["effective"] = sum(p.numel() for p in lower) + out["synthesizers"]
        return out


@RULES.register("bottom_half_bp")
class BottomHalfBP(LocalSupervised):
    """Table 1's "bottom half with back prop": local_supervised with predict_from=split (the blocks up to
    the split plus a classifier head, trained alone by BP and scored through that head)."""

    def __init__(self, model, loss_fn, *, split):
        super().__init__(model, loss_fn, split=split, target="bp", predict_from="split")
