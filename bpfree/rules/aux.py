"""Layer-wise gradient decoupling with trainable auxiliary activations (layerwise-gradient-decoupling §3).

Model: a chain of blocks f_1..f_T (`model.blocks`, applied in order; the input of block t is the
output of block t-1, reshaped). Write z_0 = x, z_T = y. For every training example i and hidden
layer t = 1..T-1 the rule keeps a trainable auxiliary activation z_t^i (eq. 1), stored as buffers
Z_t (n, d_t) with d_t the per-example size of block t's output. In training, block t computes its
estimate from its own auxiliary input only,

    zhat_t = f_t(z_{t-1}; theta_t),            (eq. 1, the paper's zhat_{t+1} = f(z_t, theta_t))

so no gradient crosses a layer boundary, and the loss is eq. 3 per example,

    l_i = L_y(zhat_T^i, y^i) + lambda_h * sum_{t=1}^{T-1} L_h(z_t^i, zhat_t^i),

L_y the task loss (NLL on the log-softmax output), L_h `hidden_loss` (mse: mean over the d_t units
of (z - zhat)^2). theta_t appears in one term only (its own output's), z_t in two: as the target of
block t and as the input of block t+1; both get the gradient of that sum. One backward pass:
  - theta: the batch mean of l_i, stepped by the run's optimizer (optim.*);
  - Z: the per-example gradient d l_i / d z_t^i (batch size does not scale it), stepped by the rule's
    own optimizer (`z_optim`: adam with `z_betas`, `z_eps`, one step count per example, so example i's
    z is updated exactly as Adam would update it as its own parameter, only when i is in the batch;
    or sgd), learning rate `z_lr` (0 = Z fixed).
Inference (`predict`) is the ordinary chain x -> f_1 -> ... -> f_T with the learned theta.

Memory: Z has n x sum_t d_t numbers (float32), Adam keeps two more copies plus an int32 step count
per example. The per-example figure is computed at construction, the total in `prepare` (where n is
known) and printed; above `max_aux_gb` the run stops there, before training, with the number and
the fix. A 4-hidden-layer MLP on MNIST needs ~0.5 GB with Adam; a conv net on CIFAR-10 tens of GB.

`compare_bp`: a shadow backprop copy of the model from the same initial weights, stepped on the same
batches by an optimizer of the run's type and settings (so it is the `method=bp` run of this seed),
kept outside `parameters()` (the run's optimizer never sees it) and checkpointed with its optimizer
state in this rule's extra state. It costs one more BP step per batch and a copy of the model.
Per-epoch diagnostics (keys in the record's metrics.per_epoch):
  aux_gap/<block>    eq. 2 on the whole training set: mean_i ||z_t^i - zhat_t^i|| / ||zhat_t^i||
                     (zhat_t from z_{t-1}), for the hidden blocks;
  with compare_bp, on the whole test set, both networks run as ordinary chains:
  bp_test_acc, acc_gap  the twin's test accuracy and ours minus it;
  agreement          fraction of test examples where both predict the same class;
  cka/<block>        linear CKA between the two networks' outputs of that block;
  cka_bp_init/<block> the same between the BP twin and the initial network (a baseline: how much of
                     cka/ BP's representation shares with where both started);
  param_dist/<block> ||theta_aux - theta_bp|| / ||theta_bp - theta_0|| over the block's parameters.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.models import surgery
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, UnsupportedModel
from bpfree.similarity import linear_cka, relative_distance

HIDDEN_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}
Z_INITS = ("forward", "random")
Z_OPTIMS = ("adam", "sgd")
_CHUNK = 2000  # examples per forward pass when initialising Z or measuring over a whole split


def chain_shapes(model: nn.Module) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per-example input and output shapes of each block, checking on a random input that the model
    is a chain: block t's input is block t-1's output (up to a reshape, e.g. flatten) and block 1's is
    x reshaped. Raises UnsupportedModel otherwise (skip connections across blocks, several inputs)."""
    need = "aux needs a model whose forward applies model.blocks in order, each to the previous block's output"
    blocks = getattr(model, "blocks", None)
    shape = getattr(model, "input_shape", None)
    if not isinstance(blocks, nn.ModuleDict) or len(blocks) < 2 or shape is None:
        raise UnsupportedModel(f"{need} (>= 2 blocks) and an input_shape; {type(model).__name__} has not")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = surgery.output_hooks(model, list(blocks), lambda _: lambda m, args, out: seen.append((args[0], out)))
    was_training = model.training
    try:
        model.eval()
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            final = model(x)
    except Exception as e:  # a model that cannot run a plain batch is not a chain either
        raise UnsupportedModel(f"{need}; {type(model).__name__} failed on a (2, {shape}) input: {e}") from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if len(seen) != len(blocks):
        raise UnsupportedModel(f"{need}; {type(model).__name__} called its blocks {len(seen)} times, not {len(blocks)}")
    prev = x
    for name, (inp, out) in zip(blocks, seen):
        if not (isinstance(inp, torch.Tensor) and inp.numel() == prev.numel()
                and torch.equal(inp.reshape(-1), prev.reshape(-1))):
            raise UnsupportedModel(f"{need}; the input of block {name!r} of {type(model).__name__} is not the "
                                   f"previous block's output (a skip connection or an operation between blocks)")
        prev = out
    if not torch.equal(prev, final):
        raise UnsupportedModel(f"{need}; {type(model).__name__}'s output is not its last block's output")
    return [tuple(i.shape[1:]) for i, _ in seen], [tuple(o.shape[1:]) for _, o in seen]


@RULES.register("aux")
class AuxiliaryActivations(LearningRule):
    wants_indices = True

    def __init__(self, model, loss_fn, *, lambda_h: float, hidden_loss: str, z_lr: float, z_optim: str,
                 z_betas, z_eps: float, z_init: str, z_init_std: float, max_aux_gb: float, compare_bp: bool):
        super().__init__(model, loss_fn)
        for key, value, valid in (("hidden_loss", hidden_loss, sorted(HIDDEN_LOSSES)),
                                  ("z_init", z_init, Z_INITS), ("z_optim", z_optim, Z_OPTIMS)):
            if value not in valid:
                raise ValueError(f"unknown method.{key} {value!r}; valid: {', '.join(valid)}")
        for key, value in (("lambda_h", lambda_h), ("z_lr", z_lr), ("max_aux_gb", max_aux_gb)):
            if not value >= 0:
                raise ValueError(f"method.{key} must be >= 0, got {value}")
        self.lambda_h, self.hidden_loss, self.z_lr, self.z_optim = float(lambda_h), hidden_loss, float(z_lr), z_optim
        self.z_betas, self.z_eps = tuple(float(b) for b in z_betas), float(z_eps)
        self.z_init, self.z_init_std, self.max_aux_gb = z_init, float(z_init_std), float(max_aux_gb)
        self.in_shapes, self.out_shapes = chain_shapes(model)
        self.names = list(model.blocks)               # l1..lT; Z_t is the output of block names[t-1]
        self.widths = [math.prod(s) for s in self.out_shapes[:-1]]  # d_1..d_{T-1}
        copies = 3 if z_optim == "adam" else 1        # Z (+ Adam's two moments)
        self.bytes_per_example = 4 * copies * sum(self.widths) + (4 if z_optim == "adam" else 0)
        print(f"aux: auxiliary activations need {self.bytes_per_example} B per training example "
              f"({sum(self.widths)} units {self.widths} x 4 B x {copies} with z_optim={z_optim})")
        # theta_0 and the BP twin live outside the module tree: the run's optimizer must not step them
        self.__dict__["_theta0"] = {n: [p.detach().clone() for p in b.parameters()] for n, b in model.blocks.items()}
        self.__dict__["_twin"] = copy.deepcopy(model) if compare_bp else None
        self.__dict__["_init"] = copy.deepcopy(model) if compare_bp else None  # theta_0, for the CKA baseline
        self._twin_opt, self._twin_opt_pending = None, None
        self._train = self._test = None
        self._batch_is_data = False  # bound to one batch by a train_step without indices (bench)
        self._batch = None  # (idx, Z leaves) of the step in progress, from train_step to after_step

    # ----------------------------------------------------------------------------------- state
    def aux_gb(self, n: int) -> float:
        return n * self.bytes_per_example / 1e9

    def prepare(self, train, test) -> None:
        n, device = len(train), train.x.device
        gb = self.aux_gb(n)
        print(f"aux: Z for {n} training examples = {gb:.3f} GB (method.max_aux_gb={self.max_aux_gb})")
        if gb > self.max_aux_gb:
            sgd = n * 4 * sum(self.widths) / 1e9
            raise ValueError(
                f"aux needs {gb:.2f} GB for its auxiliary activations ({n} examples x {sum(self.widths)} hidden "
                f"units x 4 B x {3 if self.z_optim == 'adam' else 1} with method.z_optim={self.z_optim}), more "
                f"than method.max_aux_gb={self.max_aux_gb}. Fix: raise method.max_aux_gb (if the memory is "
                f"there), or use method.z_optim=sgd ({sgd:.2f} GB), fewer examples (data.subset=N) or a "
                f"narrower model (aux suits MLPs; a conv net stores every feature map of every example)")
        for name, d in zip(self.names, self.widths):
            self.register_buffer(f"z_{name}", torch.zeros(n, d, device=device))
            if self.z_optim == "adam":
                self.register_buffer(f"zm_{name}", torch.zeros(n, d, device=device))
                self.register_buffer(f"zv_{name}", torch.zeros(n, d, device=device))
        if self.z_optim == "adam":
            self.register_buffer("z_steps", torch.zeros(n, dtype=torch.int32, device=device))
        self._train, self._test = train, test
        self.__dict__["_theta0"] = {k: [t.to(device) for t in v] for k, v in self._theta0.items()}
        if self._twin is not None:
            self._twin.to(device)
            self._init.to(device)
        with torch.no_grad():
            if self.z_init == "forward":  # the initial network's forward pass: eq. 2 holds exactly at step 0
                was = self.model.training
                self.model.eval()
                for s in range(0, n, _CHUNK):
                    h = train.x[s:s + _CHUNK]
                    for name, block, shape in zip(self.names[:-1], self.model.blocks.values(), self.in_shapes):
                        h = block(h.reshape(-1, *shape))
                        self.Z(name)[s:s + _CHUNK] = h.reshape(len(h), -1)
                self.model.train(was)
            else:
                for name in self.names[:-1]:
                    self.Z(name).normal_(0.0, self.z_init_std)

    def Z(self, name: str) -> torch.Tensor:
        return getattr(self, f"z_{name}")

    def get_extra_state(self):
        if self._twin is None:
            return {}
        opt = self._twin_opt.state_dict() if self._twin_opt is not None else self._twin_opt_pending
        return {"twin": self._twin.state_dict(), "twin_optimizer": opt}

    def set_extra_state(self, state) -> None:
        if self._twin is not None and state:
            self._twin.load_state_dict(state["twin"])
            self._twin_opt, self._twin_opt_pending = None, state["twin_optimizer"]  # built at the next step

    # ----------------------------------------------------------------------------------- training
    def inputs(self, x: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """[z_0 = x (B, *in_shape of block 1), z_1 .. z_{T-1} (B, d_t)], the Z rows as leaves with grad
        (when they learn), so each block's input is its own auxiliary variable."""
        zs = [x]
        for name in self.names[:-1]:
            z = self.Z(name)[idx].clone()
            zs.append(z.requires_grad_(self.z_lr > 0))
        return zs

    def layer_losses(self, zs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        """Term t (t = 1..T) of eq. 3 for the batch, the one of block t's output: lambda_h L_h(z_t, zhat_t)
        for hidden blocks, L_y(zhat_T, y) for the last. Term t depends on theta_t, z_{t-1} and z_t only."""
        terms = []
        for t, (block, shape) in enumerate(zip(self.model.blocks.values(), self.in_shapes)):
            zhat = block(zs[t].reshape(len(zs[t]), *shape))
            if t < len(self.names) - 1:
                terms.append(self.lambda_h * HIDDEN_LOSSES[self.hidden_loss](zhat.reshape(len(zhat), -1), zs[t + 1]))
            else:
                terms.append(self.loss_fn(zhat, y))
        return terms

    def train_step(self, x, y, optimizer, idx=None):
        if idx is None:
            idx = self._batch_as_data(x, y)
        if self._train is None:
            raise RuntimeError("aux: call rule.prepare(train, test) before training (fit does)")
        self._batch = (idx, None)  # (rows of Z, their leaves once compute_grads made them)
        out = super().train_step(x, y, optimizer)  # zero_grad -> compute_grads -> theta step -> after_step (Z)
        if self._twin is not None:
            out["bp_loss"] = self._twin_step(x, y, optimizer)
        return out

    def compute_grads(self, x, y):
        idx = self._batch[0]
        zs = self.inputs(x, idx)
        terms = self.layer_losses(zs, y)
        sum(terms).backward()
        self._batch = (idx, zs)
        with torch.no_grad():  # the task loss of the prediction (the ordinary chain from x), before the step:
            task = self.loss_fn(self.model(x), y)  # one more forward, no graph (terms[-1] starts from z_{T-1})
        return {"loss": task, "output_loss": terms[-1].detach(), "hidden_loss": sum(terms[:-1]).detach()}

    def after_step(self):
        """Z's step, with the gradient the same backward left on the batch's rows."""
        (idx, zs), self._batch = self._batch, None
        if self.z_lr > 0:
            with torch.no_grad():
                self._step_z(idx, [z.grad * len(idx) for z in zs[1:]])  # x B: d l_i / d z_i, not of the mean

    def _batch_as_data(self, x, y) -> torch.Tensor:
        """train_step without indices (scripts/bench.py times one fixed batch): that batch is the training
        set, examples 0..B-1. Inside fit (which always passes idx) a missing idx is an error."""
        if self._train is None:
            from bpfree.data import TensorData
            self.prepare(TensorData(x, y), TensorData(x, y))
            self._batch_is_data = True
        if not self._batch_is_data or len(y) != len(self._train):
            raise ValueError("aux keeps one auxiliary activation per training example and needs each batch's "
                             "example indices: train it through bpfree.train.fit (which passes idx because "
                             "aux.wants_indices is True) or call train_step(x, y, optimizer, idx=...)")
        return torch.arange(len(y), device=y.device)

    def layer_step(self, t: int, x, y, idx, optimizer) -> None:
        """What layer t's worker does in a layer-parallel step, given Z: gather z_{t-1} and z_t, compute
        its term of eq. 3, backward, step theta_t with `optimizer` (over block t's parameters only) and
        step z_t's rows with this term's gradient (the other term's is worker t+1's, summed in a
        layer-parallel implementation). For timing; a real step is train_step."""
        last = t == len(self.names) - 1
        z_in = x if t == 0 else self.Z(self.names[t - 1])[idx].clone().requires_grad_(self.z_lr > 0)
        z_out = None if last else self.Z(self.names[t])[idx].clone().requires_grad_(self.z_lr > 0)
        block = self.model.blocks[self.names[t]]
        optimizer.zero_grad(set_to_none=True)
        zhat = block(z_in.reshape(len(idx), *self.in_shapes[t]))
        if last:
            term = self.loss_fn(zhat, y)
        else:
            term = self.lambda_h * HIDDEN_LOSSES[self.hidden_loss](zhat.reshape(len(idx), -1), z_out)
        term.backward()
        optimizer.step()
        if not last and self.z_lr > 0:
            with torch.no_grad():
                self._step_z(idx, [z_out.grad * len(idx)], names=[self.names[t]])

    def bench_extras(self, x, y, repeats: int = 10) -> dict[str, float]:
        """scripts/bench.py's extra columns: each layer's step time given Z (median of `repeats`, ms) and
        the ideal layer-parallel step time, the slowest layer's (every layer's update is independent
        given Z; communication not counted). Worker optimizers are Adam with lr 0 (timing only)."""
        import statistics
        import time

        idx = self._batch_as_data(x, y)
        out = {}
        for t, name in enumerate(self.names):
            opt = torch.optim.Adam(self.model.blocks[name].parameters(), lr=0.0)
            times = []
            for _ in range(repeats + 2):
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                self.layer_step(t, x, y, idx, opt)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"layer_step_ms/{name}"] = 1000 * statistics.median(times[2:])
        out["ideal_parallel_step_ms"] = max(out.values())
        return out

    def _step_z(self, idx, grads, names=None) -> None:
        """Step the batch's rows of Z_t for t in `names` (default: all hidden) with their gradients."""
        names = self.names[:-1] if names is None else names
        if self.z_optim == "sgd":
            for name, g in zip(names, grads):
                self.Z(name)[idx] -= self.z_lr * g
            return
        b1, b2 = self.z_betas
        k = self.z_steps[idx] + 1
        self.z_steps[idx] = k
        c1 = (1 - b1 ** k.double()).float()[:, None]  # (B, 1) bias corrections, one step count per example
        c2 = (1 - b2 ** k.double()).float()[:, None]
        for name, g in zip(names, grads):
            m_all, v_all = getattr(self, f"zm_{name}"), getattr(self, f"zv_{name}")
            m = b1 * m_all[idx] + (1 - b1) * g
            v = b2 * v_all[idx] + (1 - b2) * g * g
            m_all[idx], v_all[idx] = m, v
            self.Z(name)[idx] -= self.z_lr * (m / c1) / ((v / c2).sqrt() + self.z_eps)

    def _twin_step(self, x, y, optimizer) -> torch.Tensor:
        if self._twin_opt is None:  # same optimizer type and settings as the run's
            self._twin_opt = type(optimizer)(self._twin.parameters(), **optimizer.defaults)
            if self._twin_opt_pending is not None:
                self._twin_opt.load_state_dict(self._twin_opt_pending)
                self._twin_opt_pending = None
        for g_twin, g in zip(self._twin_opt.param_groups, optimizer.param_groups):
            g_twin["lr"] = g["lr"]  # follow the run's scheduler
        self._twin_opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self._twin(x), y)
        loss.backward()
        self._twin_opt.step()
        return loss.detach()

    # ----------------------------------------------------------------------------------- measuring
    def _chain(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output (N, d_t) of the ordinary chain on x, in chunks."""
        outs = [[] for _ in self.names]
        for s in range(0, len(x), _CHUNK):
            h = x[s:s + _CHUNK]
            for t, (block, shape) in enumerate(zip(model.blocks.values(), self.in_shapes)):
                h = block(h.reshape(len(h), *shape))
                outs[t].append(h.reshape(len(h), -1))
        return [torch.cat(o) for o in outs]

    @torch.no_grad()
    def aux_gaps(self) -> dict[str, float]:
        """eq. 2 on the whole training set: mean_i ||z_t^i - zhat_t^i|| / ||zhat_t^i||, zhat_t = f_t(z_{t-1})."""
        n = len(self._train)
        sums = [0.0] * (len(self.names) - 1)
        for s in range(0, n, _CHUNK):
            rows = torch.arange(s, min(s + _CHUNK, n), device=self._train.x.device)
            zs = [self._train.x[rows]] + [self.Z(name)[rows] for name in self.names[:-1]]
            for t, (block, shape) in enumerate(zip(list(self.model.blocks.values())[:-1], self.in_shapes)):
                zhat = block(zs[t].reshape(len(rows), *shape)).reshape(len(rows), -1)
                rel = (zs[t + 1] - zhat).norm(dim=1) / zhat.norm(dim=1).clamp_min(1e-12)
                sums[t] += float(rel.sum())
        return {f"aux_gap/{name}": v / n for name, v in zip(self.names, sums)}

    @torch.no_grad()
    def diagnostics(self, x, y) -> dict[str, float]:
        if self._train is None:
            return {}
        out = self.aux_gaps()
        if self._twin is None:
            return out
        # the whole test set (the probe batch is too small for a CKA of 392-unit layers)
        ours, theirs = self._chain(self.model, self._test.x), self._chain(self._twin, self._test.x)
        pred_a, pred_b = ours[-1].argmax(1), theirs[-1].argmax(1)
        acc_a = float((pred_a == self._test.y).float().mean())
        acc_b = float((pred_b == self._test.y).float().mean())
        out |= {"bp_test_acc": acc_b, "acc_gap": acc_a - acc_b,
                "agreement": float((pred_a == pred_b).float().mean())}
        start = self._chain(self._init, self._test.x)
        for name, a, b, o in zip(self.names, ours, theirs, start):
            out[f"cka/{name}"] = linear_cka(a, b)
            out[f"cka_bp_init/{name}"] = linear_cka(o, b)  # baseline: BP's representation vs its own start
        for name in self.names:
            out[f"param_dist/{name}"] = relative_distance(
                list(self.model.blocks[name].parameters()), list(self._twin.blocks[name].parameters()),
                self._theta0[name])
        return out

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        n = len(self._train) if self._train is not None else 0
        return counts | {"effective": counts["total"], "auxiliary_activations": n * sum(self.widths)}
