"""Depth-parallel training of rules whose parts learn from local signals (`trainer.parallel=threads`).

The contract. A rule that can be staged implements `stage_defs(k) -> list[StageDef]`: k consecutive parts,
each with its own parameters and a `forward_backward(inputs) -> (outputs, scalars)` that computes the
part's local objective(s) from the detached `inputs` its predecessor sent, fills `.grad` of its own
parameters only, and returns the detached tensors it sends on (for AL: s_k and t_k, and the labels). The
engine steps each stage's own optimizer after its forward_backward. One definition serves both schedules:

- `sequential`: for each batch, stage 1, 2, ..., K in order (what the rule's own train_step computes);
- `threads`: one Python thread per stage in this process, handing each batch's outputs to the next stage
  through a bounded queue (no copies; torch ops release the GIL). Once the pipe is full, stage k works on
  batch b while stage k-1 works on batch b+1.

For rules whose stages exchange only forward messages (AL), the two schedules compute the same thing:
stage k's input for batch b comes from stage k-1's weights after batch b-1 in both (tested: identical
weights). The loop (bpfree/train.py) asks only for this interface, never for a rule's name. A stage reads only its
own parameters while others run (`stage_defs(..., concurrent=True)`): AL's training-batch accuracy, which
decodes through every component, is therefore not reported by the threads backend (test accuracy is).

Not here (yet): the `processes` backend (torch.distributed, one process per stage) and rules whose stages
send messages backwards (synthetic gradients), which would add staleness to record.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

BACKENDS = ("sequential", "threads", "processes")  # processes: bpfree/distributed.py


class CannotStage(TypeError):
    """The rule, the number of stages or the backend cannot be used; the message says what can."""


@dataclass
class StageDef:
    params: list[nn.Parameter]
    forward_backward: Callable[[tuple], tuple[tuple, dict]]
    name: str = ""
    # scalars measured after this stage's optimizer step (AL's eq. 8 batch accuracy uses the updated
    # decoders, as its train_step does); called in the stage's own thread, right after the step. Under a
    # concurrent backend it may read only this stage's own parameters (the others are moving).
    after_step: Callable[[], dict] | None = None
    parts: list[int] = field(default_factory=list)  # which of the rule's parts (e.g. AL components, 0-based)


class StagedOptimizers:
    """One optimizer per stage, built like the run's optimizer (same class and settings), presented as one
    object so the loop's zero_grad / checkpoint / resume code is unchanged."""

    def __init__(self, template: torch.optim.Optimizer, stages: list[StageDef]):
        kind = type(template)
        self.optimizers = [kind(s.params, **template.defaults) for s in stages]

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"stages": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if "stages" not in state or len(state["stages"]) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not from a run with the same trainer.stages; "
                             "resume with the stages it was written with, or trainer.resume=false")
        for o, s in zip(self.optimizers, state["stages"]):
            o.load_state_dict(s)


def merge(a: dict, b: dict) -> dict:
    """Scalars of one batch from several stages: a key reported by more than one stage is summed (each
    stage's `loss` is its share of the rule's objective; their sum is what the rule's train_step reports)."""
    return {**a, **b, **{k: a[k] + b[k] for k in a.keys() & b.keys()}}


def balance(costs: list[float], k: int) -> list[list[int]]:
    """Split parts 0..n-1 (in order) into k contiguous groups minimising the largest group cost: balance by
    measured cost, not by count (AL's first component, with the widest layer, costs the most)."""
    n = len(costs)
    if not 1 <= k <= n:
        raise CannotStage(f"trainer.stages={k} but the rule has {n} stageable parts; use 1..{n}")
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def solve(i: int, groups: int) -> tuple[float, list[int]]:
        # parts i..n-1 into `groups` groups; returns (max cost, cut points)
        if (i, groups) in best:
            return best[(i, groups)]
        if groups == 1:
            out = (sum(costs[i:]), [])
        else:
            out = (float("inf"), [])
            for j in range(i + 1, n - groups + 2):
                rest, cuts = solve(j, groups - 1)
                cand = max(sum(costs[i:j]), rest)
                if cand < out[0]:
                    out = (cand, [j, *cuts])
        best[(i, groups)] = out
        return out

    _, cuts = solve(0, k)
    bounds = [0, *cuts, n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Engine:
    """Runs an epoch of a staged rule on one of BACKENDS. `run_epoch` returns per-batch scalar dicts in
    batch order, plus the measured busy seconds of each stage (for the bench's ideal and bubble)."""
    stages: list[StageDef]
    optimizers: StagedOptimizers
    backend: str = "threads"
    queue_size: int = 2
    busy: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise CannotStage(f"unknown trainer.parallel={self.backend!r}; valid: null, {', '.join(BACKENDS)}")

    def describe(self) -> dict:
        """What the record says about the schedule (timing.parallel)."""
        return {"backend": self.backend, "stages": len(self.stages), "world_size": 1,
                "parts": [s.parts for s in self.stages], "last_epoch_stage_busy_s": list(self.busy)}

    def _run_stage(self, k: int, inputs: tuple) -> tuple[tuple, dict]:
        t0 = time.perf_counter()
        opt = self.optimizers.optimizers[k]
        opt.zero_grad(set_to_none=True)
        outputs, scalars = self.stages[k].forward_backward(inputs)
        opt.step()
        if self.stages[k].after_step is not None:
            scalars = merge(scalars, self.stages[k].after_step())
        self.busy[k] += time.perf_counter() - t0
        return outputs, scalars

    def run_epoch(self, first_inputs: Iterable[tuple], max_steps: int | None = None) -> list[dict]:
        self.busy = [0.0] * len(self.stages)
        if self.backend == "sequential":
            out = []
            for b, inputs in enumerate(first_inputs):
                if max_steps and b >= max_steps:
                    break
                scalars: dict = {}
                for k in range(len(self.stages)):
                    inputs, s = self._run_stage(k, inputs)
                    scalars = merge(scalars, s)
                out.append(scalars)
            return out
        return self._threads(first_inputs, max_steps)

    def _threads(self, first_inputs: Iterable[tuple], max_steps: int | None) -> list[dict]:
        k_stages = len(self.stages)
        qs = [queue.Queue(maxsize=self.queue_size) for _ in range(k_stages + 1)]
        errors: list[BaseException] = []
        stop = object()

        def worker(k: int) -> None:
            try:
                while True:
                    item = qs[k].get()
                    if item is stop:
                        break
                    b, inputs, scalars = item
                    outputs, s = self._run_stage(k, inputs)
                    qs[k + 1].put((b, outputs, merge(scalars, s)))
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)
            finally:
                qs[k + 1].put(stop)

        def feeder() -> None:
            try:
                for b, inputs in enumerate(first_inputs):
                    if (max_steps and b >= max_steps) or errors:
                        break
                    qs[0].put((b, inputs, {}))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                qs[0].put(stop)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True, name=f"stage{k + 1}")
                   for k in range(k_stages)]
        threads.append(threading.Thread(target=feeder, daemon=True, name="feeder"))
        for t in threads:
            t.start()
        out = []
        while True:
            item = qs[-1].get()
            if item is stop:
                break
            out.append(item[2])
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def build_engine(rule, optimizer: torch.optim.Optimizer, backend: str, k: int, sample: tuple | None = None) -> Engine:
    """The engine for `trainer.parallel=<backend> trainer.stages=<k>`; refuses a rule without stages."""
    if not hasattr(rule, "stage_defs"):
        raise CannotStage(f"{type(rule).__name__} has no stages (stage_defs): its updates need the whole "
                          "backward pass; use trainer.parallel=null. Staged rules: those with local losses (al)")
    if backend not in BACKENDS:
        raise CannotStage(f"unknown trainer.parallel={backend!r}; valid: null, {', '.join(BACKENDS)}")
    import copy

    kept = copy.deepcopy(rule.state_dict())  # measuring stage costs must not move weights or BN statistics
    stages = rule.stage_defs(k, sample, concurrent=backend != "sequential")
    rule.load_state_dict(kept)
    covered = {id(p) for s in stages for p in s.params}
    missing = [n for n, p in rule.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise CannotStage(f"{type(rule).__name__}'s stages leave parameters untrained: {missing[:5]}")
    if backend == "processes":  # one process per stage, this one trains one of them: bpfree/distributed.py
        from bpfree.distributed import build_process_engine

        return build_process_engine(rule, stages, optimizer)
    if backend == "threads":
        torch.set_num_threads(1)  # one core per stage: the stages are the parallelism
    return Engine(stages, StagedOptimizers(optimizer, stages), backend)
