"""Step time of aux vs bp, and aux's ideal layer-parallel step time (layerwise-gradient-decoupling Table 3).

Given Z, every layer's update is independent: worker t (AuxiliaryActivations.layer_step) gathers its
z_{t-1} and z_t rows, computes zhat_t = f_t(z_{t-1}) and its term of eq. 3, backpropagates it to
theta_t, z_{t-1} and z_t, steps theta_t (Adam) and z_t's rows. The ideal layer-parallel step is the
slowest worker's time (communication not counted: in a real layer-parallel run the two contributions
to z_t's gradient, from workers t and t+1, must be summed).

Measured on real MNIST rows, one CPU thread, one process: `--rounds` rounds of
(bp step, aux step, worker 1 .. worker T), interleaved so machine load hits all alike; medians.

    python experiments/layerwise-gradient-decoupling/step_time.py --model mlp
    python experiments/layerwise-gradient-decoupling/step_time.py --model mlp_depth --depth 12
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bpfree.data import load_dataset  # noqa: E402
from bpfree.models import build_model  # noqa: E402
from bpfree.rules import build_rule  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--subset", type=int, default=6400)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist", os.environ.get("BPFREE_DATA", "data"), ".cache/bpfree", subset=a.subset,
                        test_subset=1000)
    model_kw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{a.model}.yaml"))
    model_kw.pop("name")
    if a.depth is not None:
        model_kw["depth"] = a.depth
    method_kw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "aux.yaml"))
    method_kw.pop("name")
    method_kw["compare_bp"] = False
    lr = OmegaConf.load(ROOT / "conf" / "optim" / "adam.yaml").lr

    torch.manual_seed(0)
    bp = build_rule("bp", build_model(a.model, (1, 28, 28), 10, **model_kw), F.nll_loss)
    aux = build_rule("aux", build_model(a.model, (1, 28, 28), 10, **model_kw), F.nll_loss, **method_kw)
    aux.prepare(data.train, data.test)
    bp_opt, aux_opt = torch.optim.Adam(bp.parameters(), lr=lr), torch.optim.Adam(aux.parameters(), lr=lr)
    blocks = list(aux.model.blocks.values())
    worker_opts = [torch.optim.Adam(b.parameters(), lr=lr) for b in blocks]

    def worker(t, x, y, idx):
        aux.layer_step(t, x, y, idx, worker_opts[t])

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    times = {"bp": [], "aux": [], **{f"worker_{n}": [] for n in aux.names}}
    g = torch.Generator().manual_seed(0)
    for r in range(a.rounds + 10):
        idx = torch.randperm(len(data.train), generator=g)[:a.batch]
        x, y = data.train.x[idx], data.train.y[idx]
        row = {"bp": timed(lambda: bp.train_step(x, y, bp_opt)),
               "aux": timed(lambda: aux.train_step(x, y, aux_opt, idx=idx))}
        for t, n in enumerate(aux.names):
            row[f"worker_{n}"] = timed(lambda: worker(t, x, y, idx))
        if r >= 10:  # warm-up
            for k, v in row.items():
                times[k].append(v)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ideal = max(med[f"worker_{n}"] for n in aux.names)
    out = {"model": a.model, "depth": a.depth, "batch": a.batch, "rounds": a.rounds, "threads": 1,
           "median_ms": med, "aux_over_bp": med["aux"] / med["bp"], "ideal_parallel_ms": ideal,
           "ideal_parallel_over_bp": ideal / med["bp"],
           "slowest_worker": max(aux.names, key=lambda n: med[f"worker_{n}"])}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
