"""The `processes` backend of bpfree.parallel: one process per stage, over torch.distributed.

Launch (`stage_processes(c)`, used by run.py and scripts/bench_parallel.py):
- under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR in the environment) this process joins torchrun's group
  (env://, one or several machines); WORLD_SIZE must equal trainer.stages;
- run plainly, this process becomes rank 0 and spawns ranks 1..K-1 (torch.multiprocessing, start method
  spawn) that meet it on a free localhost port.
Rank 0 runs the ordinary loop (bpfree/train.py fit): it reads the data, trains stage 1, evaluates,
checkpoints and writes the record. Ranks 1..K-1 build the same rule from the same config and serve their
stage (`ProcessEngine.serve`) until rank 0 says stop; they write nothing.

One epoch (`ProcessEngine.run_epoch` on rank 0, `.serve` on the others):
1. rank 0 sends each rank k its stage's parameters, buffers and optimizer state (send_object_list).
   Between epochs rank 0 holds the whole run (what it evaluates, checkpoints and resumes from), so a
   resumed run continues on every rank from the checkpoint;
2. per batch, rank k receives the tuple of tensors stage k-1 sends (a fixed-size int64 header with each
   tensor's dtype and shape, then the tensors, so a short last batch needs nothing special), runs its
   stage (forward_backward, then its own optimizer's step) and isends its outputs to rank k+1 without
   waiting (at most `queue_size` batches in flight): once the pipe is full stage k trains on batch b while
   stage k-1 trains on batch b+1. A header with count -1 ends the epoch;
3. rank 0 gathers every stage's per-batch scalars, busy seconds, parameters, buffers and optimizer state.
Stage k's input for batch b comes from stage k-1's weights after batch b-1, as in the sequential schedule:
for AL the weights and records equal the sequential run's (tests/test_parallel_processes.py).
Backward messages (synthetic gradients: StageDef.send_back / receive_back) go from rank k+1 down to rank
k, the one of batch b - staleness taken before rank k's step for batch b, as in Engine._threads; at the
same trainer.staleness the weights equal the sequential schedule's (tested where the rules declare them).

Communication: gloo on CPU, NCCL when the run's device is CUDA (trainer.dist_backend=auto), one GPU per
process (LOCAL_RANK under torchrun, the rank when spawned). With gloo and a CUDA device, messages go
through CPU memory. No sockets of our own: torch.distributed's point-to-point operations only.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from bpfree.parallel import CannotStage, Engine, merge

# the wire's dtypes (a header names one by its index); bool travels as uint8 (gloo sends no bool)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)
HEADER = 64  # int64 slots: [count, then per tensor: dtype index (-1: None), ndim, *shape]; count -1 = stop
# a stage process waits for rank 0 through its evaluation and checkpoint between epochs, and through the
# record's final scoring before the stop; a crashed peer surfaces sooner, as a closed connection
TIMEOUT = timedelta(hours=2)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def in_stage_group() -> bool:
    """This process already belongs to a `processes` run's group (run.py then trains or serves in it)."""
    return dist.is_available() and dist.is_initialized()


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def dist_backend(name: str, device: torch.device) -> str:
    """trainer.dist_backend: auto = nccl on CUDA, gloo on CPU; refuses what this machine cannot run."""
    if name not in ("auto", "gloo", "nccl"):
        raise CannotStage(f"unknown trainer.dist_backend={name!r}; valid: auto, gloo, nccl")
    if not dist.is_available():
        raise CannotStage("trainer.parallel=processes needs torch.distributed, which this torch build lacks; "
                          "use trainer.parallel=threads")
    chosen = ("nccl" if device.type == "cuda" else "gloo") if name == "auto" else name
    if chosen == "nccl" and (device.type != "cuda" or not torch.cuda.is_available() or not dist.is_nccl_available()):
        raise CannotStage(f"trainer.dist_backend=nccl needs CUDA GPUs and an NCCL build of torch (the run's device is "
                          f"{device}, cuda available: {torch.cuda.is_available()}); use trainer.dist_backend=gloo "
                          "or auto")
    if chosen == "gloo" and not dist.is_gloo_available():
        raise CannotStage("trainer.dist_backend=gloo: this torch build has no gloo; use nccl on GPUs")
    return chosen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, init_method: str, backend: str, device: torch.device, local_rank: int) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # "cuda" is then this process's GPU
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)


def _device_of(c: dict) -> torch.device:
    from bpfree.build import pick_device

    return pick_device(c["trainer"]["device"])


def serve_stage(c: dict) -> dict:
    """A stage process (rank > 0): build the run's rule (bpfree.build, same seed) and serve its stage."""
    from bpfree.build import build

    b = build(c)
    b.engine.serve()
    return {"status": "stage", "rank": dist.get_rank()}


def _spawned(i: int, c: dict, port: int, world: int, backend: str) -> None:
    rank = i + 1
    _init(rank, world, f"tcp://127.0.0.1:{port}", backend, _device_of(c), rank)
    try:
        serve_stage(c)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def stage_processes(c: dict):
    """The process group of trainer.stages processes for the run `c`; yields this process's rank. Under
    torchrun it joins; otherwise it spawns ranks 1..K-1 (they serve their stages, see `serve_stage`). On
    leaving, rank 0 tells the stage processes to stop, and the group is closed."""
    k = c["trainer"]["stages"]
    device = _device_of(c)
    backend = dist_backend(c["trainer"]["dist_backend"], device)
    ctx = None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", k)) if under_torchrun() else k  # processes on this machine
    if backend == "nccl" and torch.cuda.device_count() < local:
        raise CannotStage(f"trainer.dist_backend=nccl needs one GPU per stage process: {local} processes on this "
                          f"machine, {torch.cuda.device_count()} GPU(s); use fewer stages per machine, or "
                          "trainer.dist_backend=gloo")
    if under_torchrun():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != k:
            raise CannotStage(f"torchrun started {world} processes (WORLD_SIZE) but trainer.stages={k}: one process per "
                              f"stage; launch with --nnodes x --nproc_per_node = {k}, or set trainer.stages={world}")
        _init(rank, world, "env://", backend, device, int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank, ctx = 0, _spawn_group(c, k, backend, device)
    try:
        yield rank
    except BaseException as e:
        if ctx is not None:  # rank 0 failed: stop the stage processes; show a stage's own error beside it
            child = _stop_children(ctx)
            if child:
                e.add_note(f"a stage process failed too:\n{child}")
        raise
    else:
        if rank == 0:
            for r in range(1, k):
                dist.send_object_list([None], dst=r, device=_comm_device(backend, device))
        if ctx is not None:
            ctx.join()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn_group(c: dict, k: int, backend: str, device: torch.device):
    """Make this process rank 0 of k and spawn ranks 1..k-1 on a free localhost port; returns their
    torch.multiprocessing context (None for k = 1)."""
    import torch.multiprocessing as mp

    port = _free_port()
    if k == 1:  # one stage: a group of one, nothing to spawn
        _init(0, 1, f"tcp://127.0.0.1:{port}", backend, device, 0)
        return None
    with _stdlib_start_method():
        ctx = mp.start_processes(_spawned, args=(c, port, k, backend), nprocs=k - 1, join=False, start_method="spawn")
    failed: list[BaseException] = []

    def init():
        try:
            _init(0, k, f"tcp://127.0.0.1:{port}", backend, device, 0)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failed.append(e)

    t = threading.Thread(target=init, daemon=True)
    t.start()
    while t.is_alive():  # a stage process that dies while starting must not leave rank 0 waiting
        t.join(0.2)
        try:
            if t.is_alive():
                ctx.join(timeout=0)  # raises when a stage process failed
        except BaseException:
            _terminate(ctx)
            raise
    if failed:
        _terminate(ctx)
        raise failed[0]
    return ctx


@contextlib.contextmanager
def _stdlib_start_method():
    """A spawned child re-applies its parent's global start method; inside a joblib (loky) worker, as under
    hydra/launcher=joblib, that is 'loky', which a plain child cannot find: spawn with 'spawn' meanwhile."""
    import multiprocessing
    import multiprocessing.context as mpc

    if multiprocessing.get_start_method(allow_none=True) in (None, "spawn", "fork", "forkserver"):
        yield
        return
    kept = mpc._default_context._actual_context
    mpc._default_context._actual_context = mpc._default_context.get_context("spawn")
    try:
        yield
    finally:
        mpc._default_context._actual_context = kept


def _terminate(ctx) -> None:
    for p in ctx.processes:  # only the stage processes this call started
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(5)


def _stop_children(ctx, grace: float = 2.0) -> str:
    """Give the stage processes `grace` seconds to finish failing (their error is then returned), then end them."""
    try:
        deadline = time.time() + grace
        while time.time() < deadline and not ctx.join(timeout=0.2):
            pass
    except Exception as child:  # noqa: BLE001 - torch's ProcessRaisedException carries the child's traceback
        _terminate(ctx)
        return str(child)
    _terminate(ctx)
    return ""


def _peak_mb(device: torch.device) -> float:
    """This process's peak memory so far: CUDA memory allocated on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _comm_device(backend: str, device: torch.device) -> torch.device:
    return device if backend == "nccl" else torch.device("cpu")


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def stage_state(rule, stages) -> list[dict[str, torch.Tensor]]:
    """Per stage, the rule's state_dict entries it trains: its parameters, and the buffers of modules that
    own one of them (BatchNorm's running statistics), by identity."""
    sd = rule.state_dict(keep_vars=True)
    key_of = {id(t): k for k, t in sd.items()}
    out = []
    for s in stages:
        ids = {id(p) for p in s.params}
        mine = {key_of[id(p)]: p for p in s.params if id(p) in key_of}
        for m in rule.modules():
            if any(id(p) in ids for p in m.parameters(recurse=False)):
                mine |= {key_of[id(b)]: b for b in m.buffers(recurse=False) if id(b) in key_of}
        out.append(mine)
    return out


@dataclass
class ProcessEngine(Engine):
    """Engine for one process of a `processes` run: this rank trains stage `rank` only."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dist_backend: str = "gloo"
    owned: list = field(default_factory=list)       # stage_state(rule, stages)
    timing: dict = field(default_factory=dict)      # last epoch: pipeline_s (the batches), sync_s (state moves)

    def __post_init__(self):
        super().__post_init__()
        self.comm = _comm_device(self.dist_backend, self.device)
        self._pending: dict[int, deque] = {}  # per destination: (works, tensors kept alive until sent)
        self._header: dict[int, tuple] = {}    # per source: (tensor, work) of the next header's posted irecv

    def describe(self) -> dict:
        return {**super().describe(), "world_size": self.world, "dist_backend": self.dist_backend,
                "peak_mb_per_stage": self.timing.get("peak_mb")}

    # ---- messages --------------------------------------------------------------------------------
    def _send(self, tensors, dst: int) -> None:
        head = [-1] if tensors is None else [len(tensors)]
        payload = []
        for t in tensors or ():
            if t is None:
                head.append(-1)
                continue
            if t.dtype not in DTYPES:
                raise ValueError(f"a stage sends a {t.dtype} tensor; the processes backend sends {DTYPES}")
            head += [DTYPES.index(t.dtype), t.dim(), *t.shape]
            payload.append(t.detach().to(self.comm, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous())
        if len(head) > HEADER:
            raise ValueError(f"a stage sends {len(tensors)} tensors whose shapes need {len(head)} header slots; "
                             f"bpfree.distributed.HEADER is {HEADER}")
        h = torch.tensor(head + [0] * (HEADER - len(head)), dtype=torch.int64, device=self.comm)
        pending = self._pending.setdefault(dst, deque())
        pending.append(([dist.isend(h, dst)] + [dist.isend(p, dst) for p in payload], [h, *payload]))
        # at most queue_size batches in flight forward; backward messages are bounded by the staleness
        # (the stage below takes one per batch) and are never waited for here: a gloo send completes once
        # its receiver has posted the receive, and the stage below may be waiting on this stage's forward
        while pending and all(w.is_completed() for w in pending[0][0]):
            pending.popleft()  # sent: its tensors may go
        while dst > self.rank and len(pending) > self.queue_size:
            for w in pending.popleft()[0]:
                w.wait()

    def _flush(self) -> None:
        for pending in self._pending.values():
            while pending:
                for w in pending.popleft()[0]:
                    w.wait()

    def _recv(self, src: int, prefetch: bool = True):
        """The next message's tensors from `src` (None: the epoch ended). With `prefetch` (the forward stream,
        which always ends with a stop header) the following header's irecv is posted before this batch is
        trained on, so its arrival overlaps the compute."""
        if src not in self._header:
            h = torch.empty(HEADER, dtype=torch.int64, device=self.comm)
            dist.recv(h, src)
        else:
            h, work = self._header.pop(src)
            work.wait()
        spec = h.tolist()
        if spec[0] < 0:
            return None
        bufs, works, i = [], [], 1
        for _ in range(spec[0]):
            code = spec[i]
            if code < 0:
                bufs.append(None)
                i += 1
                continue
            nd = spec[i + 1]
            dtype = DTYPES[code]
            buf = torch.empty(spec[i + 2:i + 2 + nd], dtype=torch.uint8 if dtype == torch.bool else dtype, device=self.comm)
            works.append(dist.irecv(buf, src))
            bufs.append((buf, dtype))
            i += 2 + nd
        if prefetch:  # a batch is always followed by a header (the next batch's, or the stop)
            nxt = torch.empty(HEADER, dtype=torch.int64, device=self.comm)
            self._header[src] = (nxt, dist.irecv(nxt, src))
        for w in works:
            w.wait()
        return tuple(None if b is None else b[0].to(self.device, b[1]) for b in bufs)

    # ---- state between epochs ----------------------------------------------------------------------
    def _state(self, k: int) -> dict:
        return {"tensors": _cpu(self.owned[k]), "optimizer": _cpu(self.optimizers.optimizers[k].state_dict())}

    @torch.no_grad()
    def _load(self, k: int, state: dict) -> None:
        for key, v in state["tensors"].items():
            self.owned[k][key].copy_(v)
        self.optimizers.optimizers[k].load_state_dict(state["optimizer"])

    # ---- the epoch -------------------------------------------------------------------------------
    def _pipeline(self, first_inputs, max_steps) -> tuple[list[dict], dict]:
        """This rank's stage over one epoch: (per-batch scalars, the drain's scalars). A stage with backward
        messages (StageDef.send_back / receive_back, synthetic gradients; Engine's _front / _back / _drain
        halves and its `staleness`) runs Engine._threads' order: its
        forward half, its outputs sent on, then the next stage's message of batch b - staleness (received
        from rank + 1), its own message sent down to rank - 1, the step; after the last batch the messages
        still due, one step each (the drain)."""
        r, last = self.rank, self.world - 1
        st = self.stages[r]
        backward = getattr(st, "send_back", None) is not None or getattr(st, "receive_back", None) is not None
        d = getattr(self, "staleness", 0)

        def source():
            if r == 0:
                for b, inputs in enumerate(first_inputs):
                    if max_steps and b >= max_steps:
                        return
                    yield inputs
            else:
                yield from iter(lambda: self._recv(r - 1), None)

        out, drained = [], {}
        for b, inputs in enumerate(source()):
            if not backward:
                outputs, s = self._run_stage(r, inputs)
                if r < last:
                    self._send(outputs, r + 1)
            else:
                outputs, s = self._front(r, inputs)
                if r < last:
                    self._send(outputs, r + 1)  # before waiting for a message: staleness 0 needs it
                msg = self._recv(r + 1, prefetch=False) if st.receive_back is not None and b >= d else None
                back, s2 = self._back(r, msg)
                if back is not None:
                    self._send(back, r - 1)
                s = merge(s, s2)
            out.append(s if r == 0 else _cpu(s))
        if r < last:
            self._send(None, r + 1)
        if backward and st.receive_back is not None:
            for _ in range(min(d, len(out))):
                drained = merge(drained, self._drain(r, self._recv(r + 1, prefetch=False)))
        self._flush()
        return out, (drained if r == 0 else _cpu(drained))

    def run_epoch(self, first_inputs, max_steps=None) -> list[dict]:
        """Rank 0: one epoch over all stages; returns the merged per-batch scalars (as the other backends)."""
        if self.rank != 0:
            raise RuntimeError("run_epoch is rank 0's; the other ranks call serve()")
        self.busy = [0.0] * self.world
        t0 = time.perf_counter()
        for r in range(1, self.world):
            dist.send_object_list([self._state(r)], dst=r, device=self.comm)
        t1 = time.perf_counter()
        mine, drained = self._pipeline(first_inputs, max_steps)
        t2 = time.perf_counter()
        got = [None] * self.world
        dist.gather_object((None, None, 0.0, None, None), got, dst=0)
        for r in range(1, self.world):
            scalars, _, busy, state, _ = got[r]
            if len(scalars) != len(mine):
                raise RuntimeError(f"stage {r + 1} trained on {len(scalars)} batches, stage 1 on {len(mine)}")
            self._load(r, state)
            self.busy[r] = busy
        self.timing = {"pipeline_s": t2 - t1, "sync_s": (t1 - t0) + (time.perf_counter() - t2),
                       "peak_mb": [_peak_mb(self.device), *(g[4] for g in got[1:])]}
        out = []
        for b, s in enumerate(mine):  # merged over stages in stage order; the drains join the last batch's
            for r in range(1, self.world):
                s = merge(s, got[r][0][b])
            out.append(s)
        for extra in [drained, *(g[1] for g in got[1:])]:
            if extra and out:
                out[-1] = merge(out[-1], extra)
        return out

    def serve(self) -> None:
        """Ranks > 0: train this rank's stage for each epoch rank 0 starts, until it says stop."""
        while True:
            msg = [None]
            dist.recv_object_list(msg, src=0, device=self.comm)
            if msg[0] is None:
                return
            self._load(self.rank, msg[0])
            self.busy = [0.0] * self.world
            scalars, drained = self._pipeline(None, None)
            dist.gather_object((scalars, drained, self.busy[self.rank], self._state(self.rank), _peak_mb(self.device)),
                               None, dst=0)


def build_process_engine(rule, stages, optimizer, **engine_kw) -> ProcessEngine:
    """This process's engine, from the stages bpfree.parallel.build_engine checked. Every rank must cut the
    rule where rank 0 did, and measured costs differ between processes: a rank whose cut differs takes rank
    0's (`stage_defs(groups=...)`), and a rule that cannot take it is refused."""
    from bpfree.parallel import StagedOptimizers

    k = len(stages)
    if not dist.is_initialized():
        raise CannotStage("trainer.parallel=processes needs its process group: run it through run.py (which spawns "
                          "one process per stage) or torchrun (bpfree.distributed.stage_processes)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != k:
        raise CannotStage(f"the process group has {world} processes but trainer.stages={k}; one process per stage")
    device = next(iter(rule.parameters())).device
    backend = dist.get_backend()
    parts = [[s.parts for s in stages]]
    dist.broadcast_object_list(parts, src=0, device=_comm_device(backend, device))
    if [s.parts for s in stages] != parts[0]:
        if "groups" not in inspect.signature(rule.stage_defs).parameters:
            raise CannotStage(f"{type(rule).__name__}.stage_defs cut the rule differently on rank {rank} "
                              f"({[s.parts for s in stages]}) than on rank 0 ({parts[0]}); give it a `groups` "
                              "argument (the partition rank 0 chose) to run it over processes")
        stages = rule.stage_defs(k, None, concurrent=True, groups=parts[0])  # the same cut: rank 0 checked it
    backward = any(getattr(s, "send_back", None) or getattr(s, "receive_back", None) for s in stages)
    if backward and "staleness" not in engine_kw:  # the delay must be trainer.staleness, not a silent default
        raise CannotStage("these stages exchange backward messages: bpfree.parallel.build_engine must pass "
                          "staleness=<trainer.staleness or the backend's default> to build_process_engine")
    return ProcessEngine(stages, StagedOptimizers(optimizer, stages), "processes", rank=rank, world=world,
                         device=device, dist_backend=backend, owned=stage_state(rule, stages), **engine_kw)
