"""make bench-parallel: wall-clock gain of depth-parallel (staged) training, measured in one run.

On the same cores, model, batch and data (real batches of the case's dataset: MNIST, or cifar10_jpeg, the
LOSSY JPEG copy of CIFAR-10), for `--steps` training steps each (default: the case's, STEPS):
- bp_best:     backprop, one process, with 1 and with 2 intra-op threads (the faster is the anchor);
- bp_pipeline: backprop as ordinary pipeline parallelism over 2 processes (torch.distributed.pipelining
               ScheduleGPipe, gloo, the batch split into `--microbatches`), one thread each;
- sequential:  the decoupled rule's stages run in order, one thread (bpfree.parallel, backend sequential);
- staged:      the same stages, one thread per stage in one process (backend threads), and one process per
               stage over gloo (backend processes, bpfree/distributed.py: this process is rank 0 and
               spawns the other stage; isend/irecv of each batch's detached messages). Its samples_per_s
               counts the batches only; sync_s is the epoch's state exchange (weights and optimizer state
               out to the stages and back to rank 0), which a real epoch adds once.
Each row: mode, backend, method, model, samples_per_s, ratio_to_bp_best, ratio_to_bp_pipeline,
fraction_of_ideal (staged / ideal, ideal = sequential throughput x sum of stage times / slowest stage),
bubble (1 - busy time / (stages x wall)), peak RSS, and test_acc after those steps (bp_pipeline: not
evaluated; it computes bp's update with gradients accumulated over micro-batches). Staged synthetic
gradients (vfbn) add staleness_steps (trainer.staleness: the synthesizer's target comes that many steps
late). A row that cannot be built says why (`skipped`) instead of a number.

    python scripts/bench_parallel.py [--case al_mlp1024 ...] [--steps N] [--out runs/bench]
Rows -> <out>/parallel_<case>.json (BENCH_OUT=results/bench to refresh the committed ones).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bpfree.build import build  # noqa: E402
from bpfree.data import batches, load_dataset  # noqa: E402
from bpfree.models import surgery  # noqa: E402
from scripts.bench import compose  # noqa: E402

# case -> (the rule's overrides, batch size); the model is the rule's own (AL's §5.2 MNIST MLP and CNN;
# VFBN's App. B.1 ResNet at depth 14, resnet14_vfbn, as in vfbn_table1_cpu). cifar10_jpeg is the LOSSY JPEG
# copy of CIFAR-10 (its own dataset); the ResNet cases test on 1000 images over 2 views to keep the bench short.
VFBN_RESNET = ["experiment=vfbn_table1_cpu", "data.test_subset=1000"]  # its settings: SGD 0.1, split s2b1
CASES = {
    "al_mlp1024": (["method=al", "model=mlp1024", "dataset=mnist", "optim.lr=1e-3"], 64),
    "al_mlp256": (["method=al", "model=mlp1024", "model.hidden=[256,256,1280,256,256]", "dataset=mnist",
                   "optim.lr=1e-3"], 64),
    # associated-learning Table 3's CNN row on cifar10_jpeg (its 4 components, conf/method_model/al_cnn.yaml)
    "al_cnn_cifar10_jpeg": (["method=al", "model=cnn", "dataset=cifar10_jpeg", "optim.lr=1e-4",
                             "data.test_subset=1000"], 32),
    # virtual-forward-backward-networks Table 1 rows on its small ResNet, cut after s2b1 (App. B.1)
    "local_supervised_resnet14": (["method=local_supervised", *VFBN_RESNET], 128),
    "vfbn_resnet14": (["method=vfbn", *VFBN_RESNET], 128),
}
# training steps per row where --steps is not given (the ResNet's steps cost ~10x the MLP's)
STEPS = {"al_mlp1024": 200, "al_mlp256": 200, "al_cnn_cifar10_jpeg": 100, "local_supervised_resnet14": 40,
         "vfbn_resnet14": 40}


def _bp(overrides: list[str]) -> list[str]:
    """The same case for backprop: method=bp, the rule's own method.* settings dropped."""
    return ["method=bp" if o.startswith("method=") else o for o in overrides if not o.startswith("method.")]


def _load(c: dict):
    from bpfree.build import DATASET_META, LOADER_KEYS

    ds = c["dataset"]
    options = {k: v for k, v in ds.items() if k not in DATASET_META}
    return load_dataset(ds["name"], **{k: c["data"][k] for k in LOADER_KEYS}, **options)


def _cfg(overrides, batch_size, threads, parallel=None, stages=2):
    over = [*overrides, f"trainer.batch_size={batch_size}", f"trainer.num_threads={threads}", "trainer.device=cpu"]
    if parallel:
        over += [f"trainer.parallel={parallel}", f"trainer.stages={stages}"]
    return compose(over)


@torch.no_grad()
def _test_acc(rule, data) -> float:
    rule.eval()
    correct = sum(int((rule.predict(x).argmax(1) == y).sum()) for x, y in batches(data.test, 1000, shuffle=False))
    rule.train()
    return correct / len(data.test)


def _train(c, data, steps: int) -> dict:
    b = build(c, data=data)
    it = batches(b.data.train, c["trainer"]["batch_size"], shuffle=True, seed=0, epoch=0)
    chosen = [next(it) for _ in range(steps)]
    if b.engine is not None:
        t0 = time.perf_counter()
        b.engine.run_epoch(((x, None, y) for x, y in chosen))
        wall = time.perf_counter() - t0
        busy = list(b.engine.busy)
        timing = getattr(b.engine, "timing", {})  # processes: pipeline_s (the batches) and sync_s (state moves)
        wall = timing.get("pipeline_s", wall)
        extra = {"sync_s": timing["sync_s"], "peak_mb_per_stage": timing["peak_mb"]} if timing else {}
    else:
        t0 = time.perf_counter()
        for x, y in chosen:
            b.rule.train_step(x, y, b.optimizer)
        wall = time.perf_counter() - t0
        busy, extra = [wall], {}
    n = sum(len(y) for _, y in chosen)
    out = {"samples_per_s": n / wall, "wall_s": wall, "stage_busy_s": busy, "test_acc": _test_acc(b.rule, b.data),
           **extra}
    if b.engine is not None and any(s.receive_back for s in b.engine.stages):
        out["staleness_steps"] = b.engine.staleness  # how late the synthesizers' targets arrive
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline_worker(rank, port, overrides, batch_size, steps, microbatches, out_path):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    c = _cfg(_bp(overrides), batch_size, 1)
    data = _load(c)
    b = build(c, data=data)
    model = b.rule.model
    names = list(model.blocks)
    # split where the parameter counts balance (the MLP's blocks differ widely in width)
    sizes = [sum(p.numel() for p in model.blocks[n].parameters()) for n in names]
    cut = min(range(1, len(names)), key=lambda i: abs(sum(sizes[:i]) - sum(sizes[i:])))
    mine = names[:cut] if rank == 0 else names[cut:]

    class Part(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(model.blocks[n] for n in mine)

        def forward(self, z):
            z = surgery.entry(model, z) if rank == 0 else z  # the MLP flattens outside its blocks
            for blk in self.blocks:
                z = blk(z)
            return z

    part = Part()
    # static micro-batch shapes: the stage's own shape inference hangs over gloo on CPU (torch 2.14)
    mb_x = data.train.x[: batch_size // microbatches]
    with torch.no_grad():
        full = model.blocks
        z = surgery.entry(model, mb_x)
        for n in names[:cut]:
            z = full[n](z)
        mid = z
        for n in names[cut:]:
            z = full[n](z)
    ins, outs = ((mb_x,), (mid,)) if rank == 0 else ((mid,), (z,))
    stage = PipelineStage(part, rank, 2, torch.device("cpu"), input_args=ins, output_args=outs)
    sched = ScheduleGPipe(stage, microbatches, loss_fn=b.task.loss if rank == 1 else None)
    opt = torch.optim.Adam(part.parameters(), lr=c["optim"]["lr"], fused=True)
    it = batches(data.train, batch_size, shuffle=True, seed=0, epoch=0)
    chosen = [next(it) for _ in range(steps)]
    dist.barrier()
    t0 = time.perf_counter()
    for x, y in chosen:
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        opt.step()
    dist.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        n = sum(len(y) for _, y in chosen)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(out_path).write_text(json.dumps({"samples_per_s": n / wall, "wall_s": wall, "peak_rss_mb": peak}))
    dist.destroy_process_group()


def _spawn2(worker, *args) -> dict:
    """Run `worker(rank, port, *args, out_path)` on 2 processes; rank 0 writes its result to out_path."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        mp.spawn(worker, args=(_free_port(), *args, str(out)), nprocs=2, join=True)
        return json.loads(out.read_text())


def staged_processes(c, data, steps) -> dict:
    """The trainer's processes backend: this process is rank 0 (stage 1) and spawns the other stage."""
    from bpfree.distributed import stage_processes

    with stage_processes(c):
        r = _train(c, data, steps)
    busy = r["stage_busy_s"]
    return r | {"bubble": 1 - sum(busy) / (len(busy) * r["wall_s"]),
                "peak_rss_mb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bp_pipeline(overrides, batch_size, steps, microbatches) -> dict:
    return _spawn2(_pipeline_worker, overrides, batch_size, steps, microbatches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", default=sorted(CASES), choices=sorted(CASES), help="default: every case")
    ap.add_argument("--steps", type=int, default=None, help="training steps per row (default: the case's, STEPS)")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "runs/bench"))
    a = ap.parse_args(argv)
    for case in a.case:
        print(f"case {case}", flush=True)
        bench_case(case, a.steps or STEPS[case], a.microbatches, Path(a.out))
    return 0


def bench_case(case: str, steps: int, microbatches: int, out: Path) -> None:
    a = argparse.Namespace(case=case, steps=steps, microbatches=microbatches)
    overrides, bs = CASES[a.case]
    c0 = _cfg(overrides, bs, 1)
    data = _load(c0)
    rows, method, model = [], c0["method"]["name"], c0["model"]["name"]

    def row(mode, backend, r, threads, stages=1):
        rows.append({"mode": mode, "backend": backend, "method": "bp" if mode.startswith("bp") else method,
                     "model": model, "threads": threads, "stages": stages, "batch_size": bs, **r})
        if "skipped" in r:
            print(f"  {mode:12s} {backend:10s} skipped: {r['skipped']}", flush=True)
        else:
            print(f"  {mode:12s} {backend:10s} {r['samples_per_s']:9.0f} samples/s  test_acc "
                  f"{r.get('test_acc', float('nan')):.4f}", flush=True)

    bp_over = _bp(overrides)
    for t in (1, 2):
        torch.set_num_threads(t)
        row("bp_best", f"{t} thread(s)", _train(_cfg(bp_over, bs, t), data, a.steps), t)
    best = max((r for r in rows if r["mode"] == "bp_best"), key=lambda r: r["samples_per_s"])
    for r in [r for r in rows if r["mode"] == "bp_best" and r is not best]:
        rows.remove(r)
    try:
        pipe = bp_pipeline(overrides, bs, a.steps, a.microbatches)
        row("bp_pipeline", "processes", {**pipe, "microbatches": a.microbatches}, 1, 2)
    except Exception as e:  # noqa: BLE001 - the row says why it is missing
        pipe = None
        row("bp_pipeline", "processes", {"skipped": f"torch.distributed.pipelining could not run {model}: "
                                                    f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}, 1, 2)
    torch.set_num_threads(1)
    seq = _train(_cfg(overrides, bs, 1, "sequential"), data, a.steps)
    row("sequential", "sequential", seq, 1, 2)
    staged_cfg = _cfg(overrides, bs, 1, "threads")
    staged = _train(staged_cfg, data, a.steps)
    busy = staged["stage_busy_s"]
    ideal = seq["samples_per_s"] * sum(seq["stage_busy_s"]) / max(seq["stage_busy_s"])
    staged |= {"ideal_samples_per_s": ideal, "fraction_of_ideal": staged["samples_per_s"] / ideal,
               "bubble": 1 - sum(busy) / (len(busy) * staged["wall_s"]),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    row("staged", "threads", staged, 1, 2)
    proc = staged_processes(_cfg(overrides, bs, 1, "processes"), data, a.steps)
    proc |= {"ideal_samples_per_s": ideal, "fraction_of_ideal": proc["samples_per_s"] / ideal}
    row("staged", "processes", proc, 1, 2)
    for r in rows:
        if "samples_per_s" in r:
            r["ratio_to_bp_best"] = r["samples_per_s"] / best["samples_per_s"]
            r["ratio_to_bp_pipeline"] = r["samples_per_s"] / pipe["samples_per_s"] if pipe else None
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"parallel_{a.case}.json"
    env = {"torch": torch.__version__, "cpus": os.cpu_count(), "steps": a.steps, "load_avg_at_start": os.getloadavg()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"{'mode':12s} {'backend':12s} {'samples/s':>10s} {'/bp_best':>9s} {'/bp_pipe':>9s} {'of ideal':>9s} {'test_acc':>9s}")
    for r in rows:
        if "samples_per_s" in r:
            to_pipe = r["ratio_to_bp_pipeline"] if r["ratio_to_bp_pipeline"] is not None else float("nan")
            print(f"{r['mode']:12s} {r['backend']:12s} {r['samples_per_s']:10.0f} {r['ratio_to_bp_best']:9.2f} "
                  f"{to_pipe:9.2f} {r.get('fraction_of_ideal', float('nan')):9.2f} "
                  f"{r.get('test_acc', float('nan')):9.4f}")
        else:
            print(f"{r['mode']:12s} {r['backend']:12s} skipped: {r['skipped']}")
    print(f"-> {path}")


if __name__ == "__main__":
    sys.exit(main())
