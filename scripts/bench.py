"""make bench: training-step time of every registered method relative to backprop.

For each case (model + input shape + batch size) and each registered rule that supports the model,
time `--steps` training steps interleaved with bp's steps on the same batch in this one process
(bp, rule, bp, rule, ...), after warm-up; report the median step time, samples/s and
step_time_ratio = rule median / bp median (1.0 = as fast as bp). Rows -> results/bench/<case>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.models import build_model  # noqa: E402
from bpfree.registry import RULES  # noqa: E402
from bpfree.rules import UnsupportedModel, build_rule  # noqa: E402
from bpfree.tasks import Classification, smoothed_nll  # noqa: E402


@dataclass
class Case:
    name: str
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    model_kwargs: dict = field(default_factory=dict)
    steps: int = 30
    method_kwargs: dict = field(default_factory=dict)  # {method name: kwargs}, e.g. AL's fold of a conv net
    task: str = "classification"  # translation: input_shape = (2, L) token ids, tokens/s reported


_AL_RESNET = {"al": {"components": [["stem"], ["s1b*"], ["s2b*"], ["s3b*"]], "bridge_pool": 4}}
CASES = [
    Case("mlp_mnist_b64", "mlp", (1, 28, 28), 10, 64),  # abstracted-gradients §4.1 setting
    Case("cnn_cifar_b128", "cnn", (3, 32, 32), 10, 128, steps=10),  # associated-learning §5.2 vanilla CNN
    Case("resnet20_cifar_b128", "resnet20", (3, 32, 32), 10, 128, steps=10),  # feedback rules on ResNet-20
    # associated-learning §5.2 networks at the authors' batch size 32 (conf/model/*.yaml, method_model/al_*);
    # AL's lower bridges pooled to 4x4 as in the CPU-scale runs (bridge_pool), the eq. 8 path unchanged
    Case("al_mlp1024_mnist_b32", "mlp", (1, 28, 28), 10, 32,
         dict(hidden=[1024, 1024, 5120, 1024, 1024], init="he_normal"), steps=10),
    Case("al_cnn_cifar_b32", "cnn", (3, 32, 32), 10, 32, dict(downsample="stride", init="he_normal"), steps=10,
         method_kwargs={"al": {"components": [["c1", "c2"], ["c3", "c4"], ["c5", "c6"], ["c7", "c8"]],
                               "bridge_pool": 4}}),
    Case("al_vgg_cifar_b32", "vgg", (3, 32, 32), 10, 32, steps=5,
         method_kwargs={"al": {"components": [["c1", "c2"], ["c3", "c4"], ["c5", "c6"], ["f1", "f2"]],
                               "bridge_pool": 4}}),
    Case("al_resnet20fc_cifar_b32", "resnet20", (3, 32, 32), 10, 32, dict(fc=[1500, 300, 300, 300, 300]),
         steps=5, method_kwargs=_AL_RESNET),
    Case("al_resnet32fc_cifar_b32", "resnet32", (3, 32, 32), 10, 32, dict(fc=[1500, 300, 300, 300, 300]),
         steps=5, method_kwargs=_AL_RESNET),
    # abstracted-gradients §4.2-4.3: 6+6-layer transformer, batch 32, ~20-piece Multi30k sentences,
    # M over E4-E6. Paper width (d_model 512) and the CPU-scale width (128) used for our CPU tables.
    *(Case(f"transformer{d}_multi30k_b32", "transformer", (2, 20), 8000, 32, steps=10, task="translation",
           model_kwargs={"d_model": d, "heads": h, "ff": 4 * d, "layers": 6},
           method_kwargs={m: {"regions": [["E4", "E6"]]} for m in ("abstraction_identity", "abstraction_derived")})
      for d, h in ((512, 8), (128, 4))),
]


def _time_steps(rule, x, y, opt, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    rule.train_step(x, y, opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_case(case: Case, device: torch.device, methods: list[str], steps: int) -> list[dict]:
    torch.manual_seed(0)
    if case.task == "translation":  # token ids: (B, 2, L) source / BOS + target, (B, L) next pieces
        x = torch.randint(4, case.num_classes, (case.batch_size, *case.input_shape), device=device)
        x[:, 1, 0] = 2
        y = torch.randint(4, case.num_classes, (case.batch_size, case.input_shape[1]), device=device)
        loss = lambda out, t: smoothed_nll(out, t, 0.1)  # noqa: E731
    else:
        x = torch.randn(case.batch_size, *case.input_shape, device=device)
        y = torch.randint(0, case.num_classes, (case.batch_size,), device=device)
        loss = Classification(case.num_classes).loss

    def make(name):
        model = build_model(case.model, case.input_shape, case.num_classes, **case.model_kwargs)
        rule = build_rule(name, model, loss, **case.method_kwargs.get(name, {})).to(device)
        return rule, torch.optim.Adam(rule.parameters(), lr=1e-4)

    bp, bp_opt = make("bp")
    rows = []
    for name in methods:
        try:
            rule, opt = make(name)
        except (UnsupportedModel, ValueError) as e:  # ValueError: e.g. its default regions name other layers
            print(f"  {name:28s} skipped: {str(e).splitlines()[0]}")
            continue
        try:
            for _ in range(5):  # warm-up (allocator, lazy init, derived matrices)
                bp.train_step(x, y, bp_opt)
                rule.train_step(x, y, opt)
        except ValueError as e:  # a configuration this model cannot take, e.g. M = I across unequal widths
            print(f"  {name:28s} skipped: {str(e).splitlines()[0]}")
            continue
        t_bp, t_rule = [], []
        for _ in range(steps):
            t_bp.append(_time_steps(bp, x, y, bp_opt, device))
            t_rule.append(_time_steps(rule, x, y, opt, device))
        m_bp, m_rule = statistics.median(t_bp), statistics.median(t_rule)
        row = {
            "case": case.name, "method": name, "model": case.model, "batch_size": case.batch_size,
            "step_ms": 1000 * m_rule, "bp_step_ms": 1000 * m_bp, "samples_per_second": case.batch_size / m_rule,
            "step_time_ratio": m_rule / m_bp, "steps": steps,
        }
        if case.task == "translation":
            row["target_tokens_per_second"] = y.numel() / m_rule
        extra = getattr(rule, "bench_extras", None)  # e.g. per-component step times (associated learning)
        if callable(extra):
            row.update(extra(x, y))
        rows.append(row)
        print(f"  {name:28s} {row['step_ms']:8.3f} ms/step  {row['samples_per_second']:10.0f} samples/s  "
              + (f"{row['target_tokens_per_second']:8.0f} tokens/s  " if "target_tokens_per_second" in row else "")
              + f"ratio to bp {row['step_time_ratio']:.2f}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default: per case)")
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument("--cases", nargs="*", default=None, help=f"default: all of {[c.name for c in CASES]}")
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (1 gives stable ratios on a shared CPU)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    methods = a.methods or RULES.names()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for case in CASES:
        if a.cases and case.name not in a.cases:
            continue
        print(f"{case.name}: {case.model}, input {case.input_shape}, batch {case.batch_size}, {env['device']}")
        rows = bench_case(case, device, methods, a.steps or case.steps)
        path = Path(a.out) / f"{case.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"  -> {path}")


if __name__ == "__main__":
    main()
