"""Associated learning step time per component, for the pipelining issue.

For each network: the BP step on the parameter-matched model, the whole AL step (all components,
sequential), and each component's own update (forward + backward + optimizer step from cached inputs,
`AssociatedLearning.component_step_times`). Sequential AL costs about the sum of the components;
a pipelined AL (Table 1 of the paper) costs the slowest component per step once the pipe is full.

    python scripts/bench_al.py [--models mlp1024 cnn ...] [--batch 32] [--repeats 5] [--bridge-pool 4]

Writes results/bench/al_components.csv (one row per network) and prints it. `--bridge-pool` shrinks the
lower (training-only) bridges of conv nets exactly as the CPU-scale runs do; leave it at 0 for the
paper's flatten bridges (VGG's then hold 150M parameters).
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bpfree.models import build_model
from bpfree.rules import build_rule

# (config name, model registry name, model kwargs, input shape, AL components) as the conf/ files say
CASES = {
    "mlp1024": ("mlp", dict(hidden=[1024, 1024, 5120, 1024, 1024], init="he_normal"), (1, 28, 28), None),
    "cnn": ("cnn", dict(downsample="stride", init="he_normal"), (3, 32, 32),
            [["c1", "c2"], ["c3", "c4"], ["c5", "c6"], ["c7", "c8"]]),
    "vgg": ("vgg", {}, (3, 32, 32), [["c1", "c2"], ["c3", "c4"], ["c5", "c6"], ["f1", "f2"]]),
    "resnet20fc": ("resnet20", dict(fc=[1500, 300, 300, 300, 300]), (3, 32, 32),
                   [["stem"], ["s1b*"], ["s2b*"], ["s3b*"]]),
    "resnet32fc": ("resnet32", dict(fc=[1500, 300, 300, 300, 300]), (3, 32, 32),
                   [["stem"], ["s1b*"], ["s2b*"], ["s3b*"]]),
}


def _median_step(rule, x, y, opt, repeats):
    rule.train_step(x, y, opt)  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rule.train_step(x, y, opt)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(name, batch, repeats, bridge_pool):
    model_name, kw, shape, comps = CASES[name]
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    bp = build_rule("bp", build_model(model_name, shape, 10, **kw), F.nll_loss)
    bp_opt = torch.optim.Adam(bp.parameters(), 1e-4)
    al = build_rule("al", build_model(model_name, shape, 10, **kw), F.nll_loss, components=comps,
                    bridge_pool=bridge_pool or None)
    al_opt = torch.optim.Adam(al.parameters(), 1e-4)
    bp_t = _median_step(bp, x, y, bp_opt, repeats)
    al_t = _median_step(al, x, y, al_opt, repeats)
    comp = al.component_step_times(x, y, al_opt, repeats)
    counts = al.param_counts()
    return {
        "model": name, "batch": batch, "bridge_pool": bridge_pool or "",
        "params_bp": bp.param_counts()["total"], "params_al_effective": counts["effective"],
        "params_al_total": counts["total"],
        "bp_step_ms": 1e3 * bp_t, "al_step_ms": 1e3 * al_t,
        "al_components_ms": " ".join(f"{1e3 * t:.1f}" for t in comp),
        "al_sum_ms": 1e3 * sum(comp), "al_max_ms": 1e3 * max(comp),
        "ideal_pipeline_speedup": sum(comp) / max(comp),
        "al_max_over_bp": max(comp) / bp_t,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CASES))
    ap.add_argument("--batch", type=int, default=32)  # the authors' batch size
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bridge-pool", type=int, default=4)
    ap.add_argument("--out", default="results/bench/al_components.csv")
    a = ap.parse_args()
    rows = []
    for m in a.models:
        r = bench(m, a.batch, a.repeats, a.bridge_pool if m != "mlp1024" else 0)
        rows.append(r)
        print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        f.write(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}; medians of {a.repeats}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
