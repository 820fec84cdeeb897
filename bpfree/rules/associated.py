"""Associated learning, AL (Kao & Chen 2021; associated-learning.md §4).

The model's own blocks are *folded* into L components (Fig. 2-4). Read bottom-up, block names
from the model's `blocks`:

    x -> [f_1 blocks] -> s_1 -> ... -> [f_L blocks] -> s_L -> [top-bridge blocks] -> s'_L ~ t_L
    y -> one-hot t_0 -g_1-> t_1 -g_2-> ... -g_L-> t_L          (encoders, created here)
         t_0 <-h_1- t_1 <-h_2- ...  <-h_L- t_L                 (decoders = the model's last L blocks)
    lower bridges b_i (i < L): s_i -> s'_i ~ t_i               (created here, 2 layers like the top one)

Component i owns f_i, b_i, g_i, h_i and minimises (eq. 7)

    local_i = MSE(b_i(s_i), t_i) + MSE(h_i(g_i(t_{i-1})), t_{i-1})

with s_{i-1} and t_{i-1} *detached* on entry (`local_objective`, the only place a component
boundary is crossed) and t_i detached as the bridge's target (the authors' tf.stop_gradient), so the
gradient of local_i reaches no other component's parameters: each component could be stepped on its
own, which is what a pipelined execution needs. MSE is the mean over elements (tf.losses.mean_squared_error
in the authors' code), not the sum ||.||^2 of the equations.

Inference is eq. 8: x -> f_1 .. f_L -> b_L -> h_L .. h_1 -> y_hat, a path through the model's own
blocks only. Effective parameters = those on that path (f_i, top bridge, h_i) = exactly the model's
parameters, so BP on the same model config is the parameter-matched baseline of §5.1 by
construction; affiliated parameters (g_i, lower bridges) only train.

Activations follow §5.1: `f_activation` (ELU) in the f blocks, `t_activation` (sigmoid) in bridges,
encoders and decoders; the rule swaps the model's activation modules at construction. y_hat lies in
(0, 1)^classes; `predict` returns log(y_hat / sum(y_hat)), log-probabilities with the same argmax, so the
loop's NLL test_loss is defined (it is not what AL minimises).

A training step reports `loss` = that task loss of eq. 8 on the batch (the LearningRule contract;
computed as `acc` is, from the step's own top-bridge output through the just-updated decoders:
`loss_straddles_step`), and the local objectives it minimises under their own keys `assoc{i}`,
`ae{i}`. Pipelined over threads (stage_defs(concurrent=True)) eq. 8 is not defined mid-step: there
neither `loss` nor `acc` is reported (a key means one thing in every record); `local_loss`, the sum of
the local objectives, is, and the loop's divergence check reads it.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.models import surgery
from bpfree.models.surgery import blocks as model_blocks
from bpfree.models.init import he_normal_
from bpfree.models.mlp import ACTIVATIONS
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, UnsupportedModel

# activation modules the rule may replace (the model's output LogSoftmax becomes the decoder's sigmoid)
_ACTS = (nn.ReLU, nn.ELU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.LogSoftmax, nn.Softmax)


def _swap_activations(module: nn.Module, make) -> int:
    return len(surgery.swap(module, lambda m: isinstance(m, _ACTS), lambda m: make()))


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _count(params) -> int:
    return sum(p.numel() for p in params)


@RULES.register("al")
class AssociatedLearning(LearningRule):
    """components: list of groups of block names (fnmatch patterns allowed, e.g. ["s1b*"]), one group
    per component, bottom-up, starting at the first block; or an int L (one block per component); or
    null = fold a fully connected model into (n_blocks - 2) // 2 one-block components, leaving a
    2-layer top bridge (the paper's MLP). The last L blocks are the decoders h_L..h_1; the blocks
    between the f side and the decoders form the top bridge (an odd middle layer lands there, §5.2).
    l2: L2 penalty (l2/2) * sum ||kernel||² added to each component's associated loss, on the kernels
    (Linear/Conv2d weights) of its f blocks and its bridge only: the authors' kernel_regularizer
    (CIFAR10/models.py al_loss, conv_layer_bn), which never regularises the autoencoders g_i, h_i.
    Use it instead of optim.weight_decay, which would also shrink g_i, h_i (train_step refuses that).
    bridge_hidden: width of the lower bridges' hidden layer (null = the top bridge's first width, the
    authors' 5n). bridge_pool: average-pool conv features to this spatial size before a lower bridge
    flattens them (null = flatten as the authors do; an int shrinks the bridges for CPU runs).
    """

    def __init__(self, model: nn.Module, loss_fn, *, components, bridge_hidden: int | None, bridge_pool: int | None,
                 f_activation: str, t_activation: str, l2: float):  # defaults: conf/method/al.yaml
        super().__init__(model, loss_fn)
        if l2 < 0:
            raise ValueError(f"al method.l2 must be >= 0 (an L2 penalty on the f side and bridges), got {l2}")
        self.l2 = l2
        for a in (f_activation, t_activation):
            if a not in ACTIVATIONS:
                raise ValueError(f"unknown activation {a!r} for al; valid: {sorted(ACTIVATIONS)}")
        blocks = model_blocks(model)
        names = list(blocks.keys())
        model_name = type(model).__name__
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise UnsupportedModel(f"al needs model.input_shape to size its bridges; {model_name} has none")
        self.fold = self._resolve_fold(components, names, blocks, model_name)
        L = len(self.fold)
        rest = names[names.index(self.fold[-1][-1]) + 1:]
        if len(rest) < L + 1:
            raise UnsupportedModel(
                f"al on {model_name} with {L} components needs at least {L + 1} blocks after the f side "
                f"(a top bridge and {L} decoders) but only {rest} follow {self.fold[-1][-1]!r}. Give the "
                "model fully connected layers on top (e.g. model=resnet20fc, the paper's extra layers) or "
                "fewer components (method.components)")
        self.top_bridge = rest[:-L]                 # s_L -> s'_L
        self.decoders = list(reversed(rest[-L:]))   # decoders[i-1] = h_i; h_1 = the output block
        for n in [*self.top_bridge, *self.decoders]:
            if not _linears(blocks[n]):
                raise UnsupportedModel(f"al: block {n!r} of {model_name} is on the t side (bridge/decoder) "
                                       "and must contain a Linear layer; the t side is fully connected (§5.2)")
        f_act, t_act = ACTIVATIONS[f_activation], ACTIVATIONS[t_activation]
        for group in self.fold:
            for n in group:
                _swap_activations(blocks[n], f_act)
        for n in [*self.top_bridge, *self.decoders]:
            if _swap_activations(blocks[n], t_act) == 0:
                blocks[n].append(t_act())  # a decoder without an activation still must land in (0, 1)

        # widths of t_0..t_L: t_i enters h_i, t_0 is what h_1 emits (the classes)
        d_t = [_linears(blocks[self.decoders[0]])[-1].out_features]
        for i, h in enumerate(self.decoders, start=1):
            lin = _linears(blocks[h])
            d_t.append(lin[0].in_features)
            if lin[-1].out_features != d_t[i - 1]:
                raise UnsupportedModel(f"al: decoder {h!r} maps to {lin[-1].out_features} features but t_{i - 1} "
                                       f"has {d_t[i - 1]}; the model's last {L} blocks must chain")
        top_out = _linears(blocks[self.top_bridge[-1]])[-1].out_features
        if top_out != d_t[L]:
            raise UnsupportedModel(f"al: the top bridge ends with {top_out} features but t_{L} has {d_t[L]}")
        self.t_widths = d_t

        # shapes of s_1..s_{L-1} from one dummy pass (eval mode: BN must not see it)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            s, s_shapes = self._entry(torch.zeros(2, *input_shape)), []
            for i in range(1, L):
                s = self._f(i, s)
                s_shapes.append(tuple(s.shape[1:]))
        model.train(was_training)
        hidden = bridge_hidden or _linears(blocks[self.top_bridge[0]])[0].out_features

        # the rule's own (affiliated) modules, He-normal as everything in the paper (§5.1)
        self.encoders = nn.ModuleList(
            he_normal_(nn.Sequential(nn.Linear(d_t[i - 1], d_t[i]), t_act())) for i in range(1, L + 1))
        lower = []
        for i, shape in enumerate(s_shapes, start=1):
            pre = []
            if bridge_pool and len(shape) == 3 and shape[1] > bridge_pool:
                pre.append(nn.AdaptiveAvgPool2d(bridge_pool))
                shape = (shape[0], bridge_pool, bridge_pool)
            lower.append(he_normal_(nn.Sequential(
                *pre, nn.Flatten(), nn.Linear(math.prod(shape), hidden), t_act(),
                nn.Linear(hidden, d_t[i]), t_act())))
        self.bridges = nn.ModuleList(lower)   # bridges[i-1] = b_i for i < L
        self.num_classes = d_t[0]

    # ---- folding -----------------------------------------------------------------------------
    @staticmethod
    def _resolve_fold(components, names, blocks, model_name) -> list[list[str]]:
        if components is None or isinstance(components, int):
            if not all(_linears(b) and not any(isinstance(m, nn.Conv2d) for m in b.modules())
                       for b in blocks.values()):
                raise UnsupportedModel(
                    f"al cannot guess how to fold {model_name} (it has conv blocks); list its components "
                    f"with method.components, e.g. [[c1, c2], [c3, c4]] (conf/method_model/al_<model>.yaml); "
                    f"blocks: {names}")
            L = components if isinstance(components, int) else (len(names) - 2) // 2
            if L < 1:
                raise UnsupportedModel(f"al needs at least 4 blocks to fold {model_name}; it has {names}")
            return [[n] for n in names[:L]]
        fold, used = [], []
        for group in components:
            pats = [group] if isinstance(group, str) else list(group)
            got = surgery.match(names, pats)
            if not got:
                raise ValueError(f"al component {pats} matches no block of {model_name}; blocks: {names}")
            fold.append(got)
            used += got
        if used != names[:len(used)]:
            raise ValueError(f"al components must cover consecutive blocks from the first one in order; "
                             f"got {fold} for blocks {names}")
        return fold

    # ---- the pieces of the fold -------------------------------------------------------------
    def _entry(self, x: torch.Tensor) -> torch.Tensor:
        return surgery.entry(self.model, x)

    def _run(self, names, z):
        return surgery.run_blocks(self.model, names, z)

    def _f(self, i: int, s):  # f_i, i = 1..L
        return self._run(self.fold[i - 1], s)

    def _bridge(self, i: int, s):  # b_i
        return self._run(self.top_bridge, s) if i == len(self.fold) else self.bridges[i - 1](s)

    def _h(self, i: int, t):  # h_i: t_i -> t_{i-1}
        return self._run([self.decoders[i - 1]], t)

    def _decode(self, t):  # h_1 o ... o h_L
        for i in range(len(self.fold), 0, -1):
            t = self._h(i, t)
        return t  # (B, classes) in (0, 1)

    def component_modules(self, i: int) -> list[nn.Module]:
        """The modules component i owns: f_i blocks, b_i, g_i, h_i."""
        blocks = model_blocks(self.model)
        L = len(self.fold)
        bridge = [blocks[n] for n in self.top_bridge] if i == L else [self.bridges[i - 1]]
        return [*(blocks[n] for n in self.fold[i - 1]), *bridge, self.encoders[i - 1], blocks[self.decoders[i - 1]]]

    def component_parameters(self, i: int) -> list[nn.Parameter]:
        return [p for m in self.component_modules(i) for p in m.parameters()]

    def local_objective(self, i: int, s_prev: torch.Tensor, t_prev: torch.Tensor):
        """Component i from its inputs (s_{i-1}, t_{i-1}): returns (assoc, ae, s_i, t_i, s'_i).
        The inputs are detached here, so no gradient of this component's loss leaves it."""
        s_prev, t_prev = s_prev.detach(), t_prev.detach()
        s = self._f(i, s_prev)
        t = self.encoders[i - 1](t_prev)             # (B, d_t[i])
        s_bridged = self._bridge(i, s)               # (B, d_t[i])
        assoc = F.mse_loss(s_bridged, t.detach())    # MSE_i^(1): flows into f_i and b_i only
        ae = F.mse_loss(self._h(i, t), t_prev)       # MSE_i^(2): flows into g_i and h_i only
        return assoc, ae, s, t, s_bridged

    def l2_penalty(self, i: int) -> torch.Tensor | float:
        """(l2 / 2) * sum of squared kernels of component i's f blocks and bridge (tf's
        l2_regularizer(scale)(w) = scale * sum(w²) / 2, so its gradient is l2 * w, as Adam's
        weight_decay would be); the autoencoders g_i, h_i are never penalised (authors' code)."""
        if not self.l2:
            return 0.0
        blocks = model_blocks(self.model)
        L = len(self.fold)
        mods = [*(blocks[n] for n in self.fold[i - 1]),
                *([blocks[n] for n in self.top_bridge] if i == L else [self.bridges[i - 1]])]
        kernels = [m.weight for mod in mods for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return 0.5 * self.l2 * sum(w.pow(2).sum() for w in kernels)

    def t_side_parameters(self) -> list[nn.Parameter]:
        """Encoders g_i and decoders h_i: the autoencoders, trained by the ae losses only."""
        blocks = model_blocks(self.model)
        return [p for m in [*self.encoders, *(blocks[n] for n in self.decoders)] for p in m.parameters()]

    def _check_optimizer(self, optimizer) -> None:
        """Refuse an optimizer that weight-decays the autoencoders. Their ae losses are element-mean
        MSEs of sigmoid outputs (gradients ~1e-5 once t_{i-1} is nearly constant), so a coupled L2 term
        dominates and Adam's normalisation turns it into a ~lr-per-step shrink of g_i, h_i: the targets
        t_i collapse to one vector for every class, the associated losses fall to ~0 by predicting it,
        and eq. 8 predicts a constant (measured on ResNet-20, cifar10_jpeg: test acc 0.1000)."""
        if getattr(self, "_optimizer_checked", None) == id(optimizer):
            return
        t_ids = {id(p) for p in self.t_side_parameters()}
        for g in optimizer.param_groups:
            if g.get("weight_decay", 0) and any(id(p) in t_ids for p in g["params"]):
                raise ValueError(
                    f"al: the optimizer's weight_decay={g['weight_decay']} also decays the autoencoders g_i, h_i, "
                    "which collapses AL's targets to one vector for all classes (constant predictions). "
                    "Set optim.weight_decay=0 and method.l2=<value>: an L2 penalty on the f side and "
                    "bridges only, as the authors' kernel_regularizer")
        self._optimizer_checked = id(optimizer)

    def _targets(self, y):
        return F.one_hot(y, self.num_classes).float()  # t_0: (B, classes)

    # ---- stages (bpfree/parallel.py): components grouped into k pipeline stages ---------------
    def stage_defs(self, k: int, sample: tuple | None = None, concurrent: bool = False,
                   groups: list[list[int]] | None = None) -> list:
        """k stages of consecutive components, balanced by each component's measured update time on
        `sample` = (x, y) (parameter counts without one). Stage inputs/outputs: (s, t, y), detached. Run in
        order (not `concurrent`), the last stage also reports the batch's eq. 8 training accuracy as
        train_step does; run concurrently it cannot: eq. 8 decodes through every component's h_i, which
        the other stages are updating at that moment, so the figure would depend on thread timing.
        `groups` (0-based component indices per stage, StageDef.parts of another process) skips balancing."""
        from bpfree.parallel import StageDef, balance

        L = len(self.fold)
        if groups is None:
            if sample is not None:
                costs = self.component_step_times(*sample, torch.optim.SGD(self.parameters(), lr=0.0), repeats=3)
            else:
                costs = [float(_count(self.component_parameters(i))) for i in range(1, L + 1)]
            groups = balance(costs, k)

        def make(comps: list[int]):
            last = {}  # this stage's latest top-bridge output, for after_step (one batch at a time)

            def forward_backward(inputs):
                s, t, y = inputs
                first = comps[0] == 1
                if first:
                    s, t = self._entry(s), self._targets(y)
                total, out = 0.0, {}
                for i in comps:
                    assoc, ae, s, t, s_bridged = self.local_objective(i, s, t)
                    total = total + assoc + ae + self.l2_penalty(i)
                    out[f"assoc{i}"], out[f"ae{i}"] = assoc.detach(), ae.detach()
                total.backward()
                if concurrent:  # eq. 8's task loss needs every stage's decoder at once, so no `loss` here
                    out["local_loss"] = total.detach()  # this stage's share (the engine sums the stages')
                last["s_bridged"], last["y"] = s_bridged.detach(), y
                return (s.detach(), t.detach(), y), out

            def accuracy():  # eq. 8's loss and accuracy on this batch with the just-updated decoders, as train_step
                return self.eq8_scalars(last["s_bridged"], last["y"])

            return forward_backward, (accuracy if comps[-1] == L and not concurrent else None)

        stages = []
        for g in groups:
            fb, after = make([i + 1 for i in g])
            stages.append(StageDef([p for i in g for p in self.component_parameters(i + 1)], fb,
                                   f"components {g[0] + 1}-{g[-1] + 1}", after, list(g)))
        return stages

    # ---- LearningRule interface ---------------------------------------------------------------
    # `loss` is eq. 8's task loss measured as `acc` is: from the step's own top-bridge output through the
    # just-updated decoders (a pipelined step, stage_defs, has updated the lower components' decoders
    # before its last stage runs, so this is what both schedules can report, identically)
    loss_straddles_step = True

    def compute_grads(self, x, y):
        s, t = self._entry(x), self._targets(y)
        total, out = 0.0, {}
        for i in range(1, len(self.fold) + 1):
            assoc, ae, s, t, s_bridged = self.local_objective(i, s, t)
            total = total + assoc + ae + self.l2_penalty(i)
            out[f"assoc{i}"], out[f"ae{i}"] = assoc.detach(), ae.detach()  # the local objectives
        # one backward of the sum = each component's own backward: the boundaries are detached, so
        # d(total)/d(theta_i) = d(local_i)/d(theta_i) exactly (tested)
        total.backward()
        self._s_bridged = s_bridged.detach()
        return out

    def train_step(self, x, y, optimizer):
        self._check_optimizer(optimizer)
        out = super().train_step(x, y, optimizer)
        s_bridged, self._s_bridged = self._s_bridged, None
        return out | self.eq8_scalars(s_bridged, y)

    @torch.no_grad()
    def eq8_scalars(self, s_bridged, y) -> dict[str, torch.Tensor]:
        """eq. 8 on a training batch from its top-bridge output (computed by the step, so only the
        decoders run): `loss`, the task loss of the prediction, and `acc` (Table 6's train accuracy)."""
        y_hat = self._decode(s_bridged)
        return {"loss": self.loss_fn(self._log_probs(y_hat), y), "acc": (y_hat.argmax(1) == y).float().mean()}

    @staticmethod
    def _log_probs(y_hat):
        """eq. 8's y_hat in (0, 1)^classes -> log(y_hat / sum(y_hat)): log-probabilities, same argmax."""
        y_hat = y_hat.clamp_min(1e-12)
        return torch.log(y_hat / y_hat.sum(1, keepdim=True))

    def predict(self, x):
        s = self._entry(x)
        for i in range(1, len(self.fold) + 1):
            s = self._f(i, s)
        return self._log_probs(self._decode(self._bridge(len(self.fold), s)))  # eq. 8

    @torch.no_grad()
    def diagnostics(self, x, y):
        """Held-out local losses per component (eval mode: BN uses its running statistics)."""
        s, t, out = self._entry(x), self._targets(y), {}
        for i in range(1, len(self.fold) + 1):
            assoc, ae, s, t, _ = self.local_objective(i, s, t)
            out[f"probe_assoc{i}"], out[f"probe_ae{i}"] = float(assoc), float(ae)
        return out

    def param_counts(self):
        effective = _count(self.model.parameters())  # f_i, top bridge, h_i: the eq. 8 path
        affiliated = _count(self.encoders.parameters()) + _count(self.bridges.parameters())
        per = {f"component{i}": _count(self.component_parameters(i)) for i in range(1, len(self.fold) + 1)}
        return {"total": effective + affiliated, "effective": effective, "affiliated": affiliated, **per}

    def bench_extras(self, x, y) -> dict:
        """scripts/bench.py hook: per-component update times (ms), their sum (sequential AL) and max (the
        ideal pipelined step of Table 1, once the pipe is full)."""
        times = self.component_step_times(x, y, torch.optim.Adam(self.parameters(), lr=1e-4))
        ms = [1e3 * t for t in times]
        return {"al_component_ms": ms, "al_component_sum_ms": sum(ms), "al_component_max_ms": max(ms),
                "al_ideal_pipeline_speedup": sum(ms) / max(ms)}

    def component_step_times(self, x, y, optimizer, repeats: int = 5) -> list[float]:
        """Median seconds of one component's update (forward, backward, optimizer step on its
        parameters alone) from cached inputs: what one stage of the pipelined AL of Table 1 costs.
        The ideal pipelined step is the max over components; the sequential step is about the sum."""
        with torch.no_grad():
            s, t, inputs = self._entry(x), self._targets(y), []
            for i in range(1, len(self.fold) + 1):
                inputs.append((s, t))
                _, _, s, t, _ = self.local_objective(i, s, t)
        times = []
        for i, (s_in, t_in) in enumerate(inputs, start=1):
            runs = []
            for _ in range(repeats + 1):  # first run warms up
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                assoc, ae, *_ = self.local_objective(i, s_in, t_in)
                (assoc + ae + self.l2_penalty(i)).backward()
                optimizer.step()  # Adam/SGD skip parameters whose .grad is None: only component i moves
                if x.is_cuda:
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t0)
            times.append(sorted(runs[1:])[len(runs[1:]) // 2])
        optimizer.zero_grad(set_to_none=True)
        return times
