"""Why plain target propagation stays at chance: measurements over its first steps (issue 12).

For TP the target of layer l-1 is t_{l-1} = g_l(t_l), so its displacement from the activity splits as
    t_{l-1} - h_{l-1} = [g_l(t_l) - g_l(h_l)]  (the error signal sent down)
                      + [g_l(h_l) - h_{l-1}]   (the inverse's reconstruction error, no error signal at all)
DTP subtracts the second term. Every `every` steps, on a fixed batch of 1000 MNIST test images, this
records per hidden layer: the size of both terms (mean over samples of their norms), the cosine between
the displacement and the true descent direction -dL/dh_{l-1}, the fraction of dead (ReLU: zero on
every sample) or saturated (tanh: |h| > 0.99) units, the spread of the activity across samples
(mean over units of the std), and the test accuracy of that batch.

    PYTHONPATH=. python experiments/backprop-free-transformers/tp_probe.py   # ~2-5 min on one busy core
writes results/figures/bpf_tp_probe.{json,png}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bpfree.data import load_dataset
from bpfree.models import build_model
from bpfree.rules import build_rule

OUT = Path("results/figures/bpf_tp_probe")
# (label, rule, model kwargs, optimizer, method kwargs): the committed mnist_rules setting and
# Lee et al. 2015's DTP setting (conf/experiment/bpf_rules_source_dtp.yaml) with and without the difference
SETTINGS = [
    ("tp, seed MLP ReLU, Adam 1e-4 (mnist_rules)", "tp", {}, ("adam", 1e-4),
     {"target_lr": 0.1, "noise": 0.1}),
    ("tp, 7x240 tanh, Lee et al. settings", "tp", {"hidden": [240] * 7, "activation": "tanh"},
     ("rmsprop", 0.0149), {"target_lr": 0.00328, "noise": 0.36, "inverse_lr": 0.005}),
    ("dtp, 7x240 tanh, Lee et al. settings", "dtp", {"hidden": [240] * 7, "activation": "tanh"},
     ("rmsprop", 0.0149), {"target_lr": 0.00328, "noise": 0.36, "inverse_lr": 0.005}),
]


def optimizer(rule, name, lr):
    if name == "adam":
        return torch.optim.Adam(rule.optimizer_groups(), lr=lr)
    return torch.optim.RMSprop(rule.optimizer_groups(), lr=lr, alpha=0.95, eps=0.0316, momentum=0.9, centered=True)


@torch.no_grad()
def measure(rule, x, y, relu: bool) -> dict:
    _, h = rule.forward_all(x)
    with torch.enable_grad():
        _, t = rule.targets(h, y)
        # true descent direction at every hidden layer: -dL/dh_l (summed loss: per-sample gradients)
        z, keep = x.flatten(1), []
        for lin, act in rule.pairs:
            z = act(lin(z))
            z.retain_grad()
            keep.append(z)
        loss = rule.loss_fn(keep[-1], y) * len(y)
        loss.backward()
        grads = {l: -keep[l - 1].grad.detach() for l in range(1, len(rule.pairs))}
        rule.zero_grad(set_to_none=True)
    L = len(rule.pairs)
    out = {"acc": float((rule.model(x).argmax(1) == y).float().mean())}
    for l in range(1, L):
        d = t[l] - h[l]
        out[f"cos/{l}"] = float(F.cosine_similarity(d, grads[l], dim=1).mean())
        out[f"displacement/{l}"] = float(d.norm(dim=1).mean())
        out[f"spread/{l}"] = float(h[l].std(0).mean())
        out[f"dead/{l}"] = float(((h[l] == 0).all(0) if relu else (h[l].abs() > 0.99).float().mean(0) > 0.5).float().mean())
        if l < L - 1:  # t_l came through g_{l+1}: split it into the signal and the reconstruction error
            g = rule.inverses[rule.names[l]]
            out[f"signal/{l}"] = float((g(t[l + 1]) - g(h[l + 1])).norm(dim=1).mean())
            out[f"recon/{l}"] = float((g(h[l + 1]) - h[l]).norm(dim=1).mean())
    return out


def main(steps: int = 500, every: int = 25) -> None:
    torch.set_num_threads(1)
    d = load_dataset("mnist", os.environ.get("BPFREE_DATA", "../shared/data"),
                     os.environ.get("BPFREE_CACHE", ".cache/bpfree"), test_subset=1000)
    x_te, y_te = d.test.x, d.test.y
    results = {}
    for label, name, mkw, (oname, lr), rkw in SETTINGS:
        torch.manual_seed(0)
        rule = build_rule(name, build_model("mlp", (1, 28, 28), 10, **mkw), F.nll_loss, **rkw)
        opt = optimizer(rule, oname, lr)
        g = torch.Generator().manual_seed(0)
        relu = mkw.get("activation", "relu") == "relu"
        curve = []
        for step in range(steps + 1):
            if step % every == 0:
                curve.append({"step": step, **measure(rule, x_te, y_te, relu)})
                print(label, curve[-1]["step"], f"acc {curve[-1]['acc']:.3f}", flush=True)
            idx = torch.randint(0, len(d.train.y), (64,), generator=g)
            rule.train_step(d.train.x[idx], d.train.y[idx], opt)
        results[label] = curve
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results)


def plot(results) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("acc", "test accuracy (1000 images)"), ("cos", "cos(t_l - h_l, -dL/dh_l)"),
              ("ratio", "||reconstruction error|| / ||signal||"), ("dead", "dead (ReLU) / saturated (tanh) units")]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(4 * len(panels), 3 * len(results)), squeeze=False)
    for r, (label, curve) in enumerate(results.items()):
        steps = [c["step"] for c in curve]
        layers = sorted({int(k.split("/")[1]) for k in curve[0] if k.startswith("cos/")})
        for c, (key, title) in enumerate(panels):
            ax = axes[r][c]
            if key == "acc":
                ax.plot(steps, [p["acc"] for p in curve])
            else:
                for l in layers:
                    if key == "ratio":
                        if f"recon/{l}" not in curve[0]:
                            continue
                        ys = [p[f"recon/{l}"] / max(p[f"signal/{l}"], 1e-12) for p in curve]
                        ax.set_yscale("log")
                    else:
                        ys = [p[f"{key}/{l}"] for p in curve]
                    ax.plot(steps, ys, label=f"h{l}")
                ax.legend(fontsize=6)
            ax.set_title(f"{title}\n{label}" if c == 0 else title, fontsize=8)
            ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=90)


if __name__ == "__main__":
    main()
