"""make bench: training-step time of every method relative to backprop, on the configs the runs use.

Cases come from experiments/<paper>/bench.yaml: `{case, overrides: [Hydra overrides], batch_size, steps,
methods: [...] | all}`. Each (case, method) is composed from conf/ exactly as `python run.py <overrides>
method=<m>` would be (method_model files included) and built by bpfree.build, so no model is re-created by
hand. Inputs are random tensors of the dataset's input shape (no data is loaded). For each method, `steps`
training steps are interleaved with bp's on the same batch in this one process (bp, rule, bp, rule, ...),
after warm-up; a row reports the median step time, samples/s and step_time_ratio = rule / bp (1.0 = as
fast as bp). A method that refuses the model (UnsupportedModel, at construction or on its first step) is a
`skipped: <reason>` row; an error in one case is reported and the others still run.

    python scripts/bench.py [--cases ...] [--methods ...] [--threads 1] [--out runs/bench]
Rows -> <out>/<case>.json (default runs/bench, ignored; BENCH_OUT=results/bench to refresh the committed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bpfree.build import build_rule_for, validate  # noqa: E402
from bpfree.registry import RULES  # noqa: E402
from bpfree.rules import UnsupportedModel  # noqa: E402
from bpfree.tasks import Classification, smoothed_nll  # noqa: E402
from bpfree.train import make_optimizer  # noqa: E402


def load_cases(root: Path = ROOT / "experiments") -> list[dict]:
    cases = []
    for f in sorted(root.glob("*/bench.yaml")):
        for c in yaml.safe_load(f.read_text()) or []:
            cases.append({"steps": 10, "methods": "all", "overrides": [], **c, "paper": f.parent.name})
    names = [c["case"] for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"bench case names repeat across experiments/*/bench.yaml: {sorted(dup)}")
    return cases


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def batch(c: dict, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Random inputs of the dataset's shape and the task's loss. Translation: (B, 2, L) ids (source;
    BOS + target) with L = `dataset.bench_len` or 20 (a typical Multi30k sentence), (B, L) next pieces."""
    ds = c["dataset"]
    g = torch.Generator().manual_seed(0)
    if ds.get("vocab_size"):
        length = ds.get("bench_len", 20)
        x = torch.randint(4, ds["num_classes"], (batch_size, 2, length), generator=g)
        x[:, 1, 0] = 2
        y = torch.randint(4, ds["num_classes"], (batch_size, length), generator=g)
        smoothing = (ds.get("eval") or {}).get("label_smoothing", 0.0)
        return x.to(device), y.to(device), (lambda out, t: smoothed_nll(out, t, smoothing))
    x = torch.randn(batch_size, *ds["input_shape"], generator=g)
    y = torch.randint(0, ds["num_classes"], (batch_size,), generator=g)
    return x.to(device), y.to(device), Classification(ds["num_classes"]).loss


def make(c: dict, loss, device):
    validate(c)
    rule = build_rule_for(c, c["dataset"]["input_shape"], c["dataset"]["num_classes"], loss, device)
    opt, _, _ = make_optimizer(rule.parameters(), c["optim"]["name"],
                               **{k: v for k, v in c["optim"].items() if k not in ("name", "scheduler")})
    return rule, opt


def _time(rule, x, y, opt, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    rule.train_step(x, y, opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_case(case: dict, device, methods: list[str] | None, steps: int | None) -> list[dict]:
    over = [*case["overrides"], "trainer.device=" + device.type]
    base = compose([*over, "method=bp"])
    x, y, loss = batch(base, case["batch_size"], device)
    torch.manual_seed(0)
    bp, bp_opt = make(base, loss, device)
    wanted = methods or (RULES.names() if case["methods"] == "all" else case["methods"])
    steps = steps or case["steps"]
    rows = []
    for name in wanted:
        row = {"case": case["case"], "method": name, "model": base["model"]["name"], "batch_size": case["batch_size"]}
        try:
            torch.manual_seed(0)
            rule, opt = make(compose([*over, f"method={name}"]), loss, device)
            for _ in range(3):  # warm-up (allocator, lazy init, derived matrices); a refusal shows here too
                bp.train_step(x, y, bp_opt)
                rule.train_step(x, y, opt)
        except UnsupportedModel as e:
            row["skipped"] = str(e).splitlines()[0]
            rows.append(row)
            print(f"  {name:28s} skipped: {row['skipped']}")
            continue
        t_bp, t_rule = [], []
        for _ in range(steps):
            t_bp.append(_time(bp, x, y, bp_opt, device))
            t_rule.append(_time(rule, x, y, opt, device))
        m_bp, m_rule = statistics.median(t_bp), statistics.median(t_rule)
        row |= {"step_ms": 1000 * m_rule, "bp_step_ms": 1000 * m_bp, "samples_per_second": case["batch_size"] / m_rule,
                "step_time_ratio": m_rule / m_bp, "steps": steps}
        if y.dim() == 2:
            row["target_tokens_per_second"] = y.numel() / m_rule
        extra = getattr(rule, "bench_extras", None)  # e.g. per-component step times (associated learning)
        if callable(extra):
            row.update(extra(x, y))
        rows.append(row)
        print(f"  {name:28s} {row['step_ms']:8.3f} ms/step  {row['samples_per_second']:10.0f} samples/s  "
              + (f"{row['target_tokens_per_second']:8.0f} tokens/s  " if "target_tokens_per_second" in row else "")
              + f"ratio to bp {row['step_time_ratio']:.2f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default: per case)")
    ap.add_argument("--methods", nargs="*", default=None, help="default: the case's list (all = every registered)")
    ap.add_argument("--cases", nargs="*", default=None, help="default: every case of experiments/*/bench.yaml")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "runs/bench"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (1 gives stable ratios on a shared CPU)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}
    cases = load_cases()
    unknown = set(a.cases or []) - {c["case"] for c in cases}
    if unknown:
        raise SystemExit(f"unknown bench case(s) {sorted(unknown)}; cases: {[c['case'] for c in cases]}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    failed = []
    for case in cases:
        if a.cases and case["case"] not in a.cases:
            continue
        print(f"{case['case']} ({case['paper']}): {' '.join(case['overrides'])}, batch {case['batch_size']}, {env['device']}")
        try:
            rows = bench_case(case, device, a.methods, a.steps)
        except Exception:  # noqa: BLE001 - one broken case must not lose the others' rows
            failed.append(case["case"])
            traceback.print_exc()
            continue
        path = Path(a.out) / f"{case['case']}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"env": env, "overrides": case["overrides"], "rows": rows}, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"  -> {path}")
    if failed:
        print(f"bench: {len(failed)} case(s) failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
