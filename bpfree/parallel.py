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

For rules whose stages exchange only forward messages (AL, local_supervised), the two schedules compute
the same thing: stage k's input for batch b comes from stage k-1's weights after batch b-1 in both (tested:
identical weights). The loop (bpfree/train.py) asks only for this interface, never for a rule's name. A
stage reads only its own parameters while others run (`stage_defs(..., concurrent=True)`): AL's
training-batch accuracy, which decodes through every component, is therefore not reported by the threads
backend (test accuracy is).

Backward messages (synthetic gradients: sg_linear, sg_resnet, vfbn). The synthesizer at a cut learns from
the true gradient there, which the stage above computes: a StageDef may `send_back()` the detached tensors
for the previous stage (after its forward_backward of batch b) and `receive_back(tensors, age)` the next
stage's (before its step). `trainer.staleness` = d says which message a stage takes at its step for batch
b: the one of batch b - d (none for b < d; the last d are taken after the last batch, one step each, the
drain). d = 0 in order is the rule's synchronous train_step, bit for bit; d = 1 (the threads default) lets
stage k train on batch b+1 while stage k+1 finishes batch b, the synthesizer's target then one step old.
The delay is fixed, not timing-dependent: threads and sequential at the same d give identical weights
(tests/test_parallel.py). Each receiving stage reports it (`sg_staleness_steps/<split>` in the record).
The engine writes `StageDef.staleness` before the first batch. The `processes` backend
(bpfree/distributed.py) carries the same messages in the same order (rank k+1 down to rank k).

Not here (yet): target: bp through a middle stage at d >= 1 (its message down would wait for the one from
above: the delays add up; refused, use target: bootstrap).
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
# trainer.staleness=null: a backward message of batch b is used at the step of batch b + this. In order it
# can be 0 (the synchronous rule); overlapped, 1 lets stage k work on batch b+1 while stage k+1 finishes b
DEFAULT_STALENESS = {"sequential": 0, "threads": 1, "processes": 1}


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
    # Backward messages (synthetic gradients: the true gradient at a cut, which trains the synthesizer of
    # the stage below). `send_back()`: called right after this stage's forward_backward (and receive_back)
    # for batch b, before its step; returns the detached tensors for the previous stage, for batch b.
    # `receive_back(tensors, age)`: called in this stage's own thread before its step for batch b with the
    # next stage's message for batch b - age (age = `staleness`); adds to its parameters' .grad and returns
    # scalars. `staleness` is written by the engine (trainer.staleness) before the first batch.
    send_back: Callable[[], tuple] | None = None
    receive_back: Callable[[tuple, int], dict] | None = None
    staleness: int = 0


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
    batch order, plus the measured busy seconds of each stage (for the bench's ideal and bubble).

    Per stage and batch b: zero_grad, forward_backward, hand the outputs on; then, if the stage receives
    backward messages, take the next stage's message for batch b - staleness (none for the first
    `staleness` batches); send_back its own for batch b; step; after_step. After the last batch a receiving
    stage takes the messages still due, one optimizer step each (the drain: every message is used once;
    their scalars join the last batch's). With staleness 0 the stage's step for batch b waits for the
    message of batch b: the sequential schedule then computes what the rule's synchronous train_step does;
    the threads schedule is then lock-step (correct, not overlapped). With staleness d >= 1 both schedules
    compute the same thing (the delay is fixed, not timing-dependent), and the threads one overlaps."""
    stages: list[StageDef]
    optimizers: StagedOptimizers
    backend: str = "threads"
    queue_size: int = 2
    busy: list[float] = field(default_factory=list)
    staleness: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise CannotStage(f"unknown trainer.parallel={self.backend!r}; valid: null, {', '.join(BACKENDS)}")
        if self.staleness < 0:
            raise CannotStage(f"trainer.staleness={self.staleness} must be >= 0 (steps a backward message is late)")
        for s in self.stages:
            s.staleness = self.staleness

    def describe(self) -> dict:
        """What the record says about the schedule (timing.parallel)."""
        return {"backend": self.backend, "stages": len(self.stages), "world_size": 1,
                "parts": [s.parts for s in self.stages], "last_epoch_stage_busy_s": list(self.busy),
                "staleness": self.staleness}

    def _run_stage(self, k: int, inputs: tuple) -> tuple[tuple, dict]:
        """One batch of a stage without backward messages: forward_backward, step, after_step (the
        processes backend's path for such stages)."""
        st = self.stages[k]
        if st.send_back is not None or st.receive_back is not None:
            raise RuntimeError(f"stage {st.name!r} exchanges backward messages (send_back / receive_back): "
                               "run it through Engine._front / _back / _drain, as the backends do")
        outputs, s = self._front(k, inputs)
        return outputs, merge(s, self._back(k, None)[1])

    def _front(self, k: int, inputs: tuple) -> tuple[tuple, dict]:
        t0 = time.perf_counter()
        self.optimizers.optimizers[k].zero_grad(set_to_none=True)
        outputs, scalars = self.stages[k].forward_backward(inputs)
        self.busy[k] += time.perf_counter() - t0
        return outputs, scalars

    def _back(self, k: int, message: tuple | None, hook: bool = True) -> tuple[tuple | None, dict]:
        """Take `message` (the next stage's, or None), send_back, step, after_step (`hook`): the rest of a
        stage's batch; returns (its own backward message or None, scalars)."""
        t0 = time.perf_counter()
        st, scalars, out = self.stages[k], {}, None
        if message is not None:
            scalars = st.receive_back(message, self.staleness)
        if st.send_back is not None:
            out = st.send_back()
        self.optimizers.optimizers[k].step()
        if hook and st.after_step is not None:
            scalars = merge(scalars, st.after_step())
        self.busy[k] += time.perf_counter() - t0
        return out, scalars

    def _drain(self, k: int, message: tuple) -> dict:
        t0 = time.perf_counter()
        self.optimizers.optimizers[k].zero_grad(set_to_none=True)
        scalars = self.stages[k].receive_back(message, self.staleness)
        self.optimizers.optimizers[k].step()
        self.busy[k] += time.perf_counter() - t0
        return scalars

    def _join(self, scalars: list[dict[int, dict]], drained: list[dict], n: int) -> list[dict]:
        """Per-batch scalars merged over stages in stage order; the drain's join the last batch's."""
        out = []
        for b in range(n):
            merged: dict = {}
            for per_batch in scalars:
                merged = merge(merged, per_batch[b])
            out.append(merged)
        for extra in drained:
            if extra and out:
                out[-1] = merge(out[-1], extra)
        return out

    def run_epoch(self, first_inputs: Iterable[tuple], max_steps: int | None = None) -> list[dict]:
        self.busy = [0.0] * len(self.stages)
        if self.backend == "sequential":
            return self._sequential(first_inputs, max_steps)
        return self._threads(first_inputs, max_steps)

    def _sequential(self, first_inputs: Iterable[tuple], max_steps: int | None) -> list[dict]:
        """Forward halves of batch b in stage order, then the back halves from the last stage down (so a
        staleness-0 message of batch b reaches the stage below before its step), then after_step hooks
        in stage order (AL's accuracy reads every stage's updated weights, as its train_step does)."""
        k_stages, d = len(self.stages), self.staleness
        inbox: list[dict[int, tuple]] = [{} for _ in range(k_stages)]  # stage k's messages from k+1, by batch
        scalars: list[dict[int, dict]] = [{} for _ in range(k_stages)]
        n = 0
        for b, inputs in enumerate(first_inputs):
            if max_steps and b >= max_steps:
                break
            for k in range(k_stages):
                inputs, scalars[k][b] = self._front(k, inputs)
            for k in reversed(range(k_stages)):
                msg = inbox[k].pop(b - d) if self.stages[k].receive_back and b >= d else None
                back, s = self._back(k, msg, hook=False)
                if back is not None:
                    inbox[k - 1][b] = back
                scalars[k][b] = merge(scalars[k][b], s)
            for k, st in enumerate(self.stages):
                if st.after_step is not None:
                    t0 = time.perf_counter()
                    scalars[k][b] = merge(scalars[k][b], st.after_step())
                    self.busy[k] += time.perf_counter() - t0
            n = b + 1
        drained: list[dict] = [{} for _ in range(k_stages)]
        for k in range(k_stages):  # the drain: the messages of the last `staleness` batches
            for b in sorted(inbox[k]):
                drained[k] = merge(drained[k], self._drain(k, inbox[k].pop(b)))
        return self._join(scalars, drained, n)

    def _threads(self, first_inputs: Iterable[tuple], max_steps: int | None) -> list[dict]:
        k_stages, d = len(self.stages), self.staleness
        # OpenMP's thread count is per thread: a new thread starts at the machine default, not at
        # trainer.num_threads (torch ops do not change that), so stages oversubscribed the cores and, under
        # load, summed differently from the caller (threads vs sequential weights stopped matching bit for
        # bit). Each stage adopts the caller's count.
        n_threads = torch.get_num_threads()
        qs = [queue.Queue(maxsize=self.queue_size) for _ in range(k_stages + 1)]
        backs = [queue.Queue() for _ in range(k_stages)]  # stage k's inbox from stage k+1: (batch, tensors)
        scalars: list[dict[int, dict]] = [{} for _ in range(k_stages)]
        drained: list[dict] = [{} for _ in range(k_stages)]
        errors: list[BaseException] = []
        stop = object()

        def put(q: queue.Queue, item) -> None:  # never blocks for good on a stage that has failed
            while True:
                try:
                    return q.put(item, timeout=0.1)
                except queue.Full:
                    if errors:
                        raise RuntimeError("another stage failed") from None

        def get(q: queue.Queue):  # the same, reading: a failure anywhere reads as `stop`
            while True:
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    if errors:
                        return stop

        def message(k: int, b: int) -> tuple:
            got = get(backs[k])
            if got is stop:
                raise RuntimeError(f"stage {k + 2} stopped before sending batch {b}'s backward message")
            assert got[0] == b, (got[0], b)  # one producer, in batch order
            return got[1]

        def worker(k: int) -> None:
            torch.set_num_threads(n_threads)
            st, done = self.stages[k], 0
            try:
                while True:
                    item = get(qs[k])
                    if item is stop:
                        break
                    b, inputs = item
                    outputs, s = self._front(k, inputs)
                    put(qs[k + 1], (b, outputs))  # before waiting for a message: staleness 0 needs it
                    msg = message(k, b - d) if st.receive_back and b >= d else None
                    back, s2 = self._back(k, msg)
                    if back is not None:
                        backs[k - 1].put((b, back))
                    scalars[k][b] = merge(s, s2)
                    done = b + 1
                if st.receive_back and not errors:  # the drain
                    for b in range(max(done - d, 0), done):
                        drained[k] = merge(drained[k], self._drain(k, message(k, b)))
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)
            finally:
                _offer(qs[k + 1], stop) if errors else qs[k + 1].put(stop)
                if k > 0:
                    backs[k - 1].put(stop)

        def feeder() -> None:
            try:
                for b, inputs in enumerate(first_inputs):
                    if (max_steps and b >= max_steps) or errors:
                        break
                    put(qs[0], (b, inputs))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                _offer(qs[0], stop) if errors else qs[0].put(stop)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True, name=f"stage{k + 1}")
                   for k in range(k_stages)]
        threads.append(threading.Thread(target=feeder, daemon=True, name="feeder"))
        for t in threads:
            t.start()
        n = 0
        while get(qs[-1]) is not stop:
            n += 1
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return self._join(scalars, drained, n)


def _offer(q: queue.Queue, item) -> None:
    """Put without blocking when a stage failed: a full queue's reader is gone or will see the error."""
    try:
        q.put_nowait(item)
    except queue.Full:
        pass


def build_engine(rule, optimizer: torch.optim.Optimizer, backend: str, k: int, sample: tuple | None = None,
                 staleness: int | None = None) -> Engine:
    """The engine for `trainer.parallel=<backend> trainer.stages=<k>`; refuses a rule without stages.
    `staleness` (trainer.staleness): steps a backward message arrives late; None = the backend's own
    (DEFAULT_STALENESS: 0 in order, 1 when the stages overlap)."""
    if not hasattr(rule, "stage_defs"):
        raise CannotStage(f"{type(rule).__name__} has no stages (stage_defs): its updates need the whole "
                          "backward pass; use trainer.parallel=null. Staged rules: al, local_supervised, sg_linear, "
                          "sg_resnet, vfbn")
    if backend not in BACKENDS:
        raise CannotStage(f"unknown trainer.parallel={backend!r}; valid: null, {', '.join(BACKENDS)}")
    import copy

    kept = copy.deepcopy(rule.state_dict())  # measuring stage costs must not move weights or BN statistics,
    cuda = [sample[0].device] if sample is not None and sample[0].is_cuda else []
    with torch.random.fork_rng(devices=cuda):  # nor the random stream (a model's random crops draw from it)
        stages = rule.stage_defs(k, sample, concurrent=backend != "sequential")
    rule.load_state_dict(kept)
    covered = {id(p) for s in stages for p in s.params}
    missing = [n for n, p in rule.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise CannotStage(f"{type(rule).__name__}'s stages leave parameters untrained: {missing[:5]}")
    d = DEFAULT_STALENESS[backend] if staleness is None else staleness
    if backend == "processes":  # one process per stage, this one trains one of them: bpfree/distributed.py
        from bpfree.distributed import build_process_engine

        return build_process_engine(rule, stages, optimizer, staleness=d)
    if backend == "threads":
        torch.set_num_threads(1)  # one core per stage: the stages are the parallelism
    return Engine(stages, StagedOptimizers(optimizer, stages), backend, staleness=d)
