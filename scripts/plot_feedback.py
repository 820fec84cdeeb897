"""Figures for the feedback / target-propagation tables, from the run records (make tables runs it).

    python scripts/plot_feedback.py [--paper backprop-free-transformers] [--records results/records]

1. Alignment per layer vs epoch, one figure per table:

For each table of the paper: one row of panels per method (table row), left the angle between B and
Wᵀ (feedback rules), right the angle between the rule's weight update and the true backprop gradient
on the fixed probe batch; one line per layer, mean over seeds. Tables with several columns (e.g. the
depth sweep) are drawn for their last column (the deepest model). Writes
results/tables/<paper>__<table>__alignment.png.
2. For tables whose spec asks for it (`figures: {vs_column: {xlabel: ...}}`, e.g. the depth sweep): test
accuracy vs column, one line per method (mean over seeds, best over epochs):
results/tables/<paper>__<table>__vs_column.png.
Nothing here trains.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.records import read_records  # noqa: E402
from bpfree.tables import load_specs  # noqa: E402

KINDS = (("angle_B/", "angle(B, Wᵀ)"), ("angle_grad/", "angle(rule update, BP gradient)"))


def _series(records: list[dict], prefix: str) -> dict[str, list[float]]:
    """layer -> per-epoch mean over the records (seeds)."""
    per_layer: dict[str, list[list[float]]] = defaultdict(list)
    for r in records:
        epochs = r["metrics"]["per_epoch"]
        keys = [k for k in (epochs[0] if epochs else {}) if k.startswith(prefix)]
        for k in keys:
            per_layer[k[len(prefix):]].append([e[k] for e in epochs if k in e])
    out = {}
    for layer, runs in per_layer.items():
        n = min(len(x) for x in runs)
        out[layer] = [sum(x[t] for x in runs) / len(runs) for t in range(n)]
    return out


def plot_table(paper: str, table: str, spec: dict, records: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ok = [r for r in records if r["status"] == "ok" and r["metrics"]["per_epoch"]]
    if not ok:
        return False
    cols = [str(c) for c in spec.get("columns", [])] or sorted({r["column"] for r in ok})
    present = [c for c in cols if any(r["column"] == c for r in ok)]
    column = present[-1] if present else ok[0]["column"]
    def has_angles(r):
        return any(k.startswith(tuple(p for p, _ in KINDS)) for k in r["metrics"]["per_epoch"][0])

    rows = [m for m in spec.get("rows", sorted({r["row"] for r in ok}))
            if any(r["row"] == m and has_angles(r) for r in ok)]  # bp has nothing to align
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.4 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        recs = [r for r in ok if r["row"] == row and r["column"] == column]
        for j, (prefix, label) in enumerate(KINDS):
            ax = axes[i][j]
            series = _series(recs, prefix)
            cmap = plt.get_cmap("viridis")
            for k, (layer, ys) in enumerate(series.items()):
                ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=2, lw=1,
                        color=cmap(k / max(len(series) - 1, 1)), label=layer)
            ax.axhline(90, color="grey", lw=0.6, ls="--")
            ax.set_ylim(0, 180 if prefix == "angle_grad/" else 100)
            ax.set_title(f"{row} ({column}, n={len(recs)}): {label}" if series else f"{row}: no {label}",
                         fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if series and len(series) <= 8:
                ax.legend(fontsize=6, ncol=2)
            elif series:
                ax.text(0.01, 0.02, f"{len(series)} layers, dark = first, yellow = last",
                        transform=ax.transAxes, fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (degrees on the fixed probe batch)", fontsize=7)
    fig.suptitle(f"{paper} {table}: alignment per layer (mean over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_vs_column(paper: str, table: str, spec: dict, records: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_spec = (spec.get("figures") or {}).get("vs_column")
    ok = [r for r in records if r["status"] == "ok" and r["metrics"]["best"].get("test_acc") is not None]
    if fig_spec is None or not ok or not all(str(r["column"]).isdigit() for r in ok):
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = spec.get("labels", {})
    for row in spec.get("rows", sorted({r["row"] for r in ok})):
        by_col = defaultdict(list)
        for r in ok:
            if r["row"] == row:
                by_col[int(r["column"])].append(r["metrics"]["best"]["test_acc"])
        if by_col:
            xs = sorted(by_col)
            ax.plot(xs, [100 * sum(by_col[x]) / len(by_col[x]) for x in xs], marker="o", label=labels.get(row, row))
    xlabel = fig_spec.get("xlabel", "column")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("test accuracy % (best epoch)", fontsize=8)
    ax.set_title(f"{paper} {table}: accuracy vs {xlabel}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", default="backprop-free-transformers")
    ap.add_argument("--records", default="results/records")
    ap.add_argument("--reference", default="results/reference.yaml")
    ap.add_argument("--specs", default="experiments")
    ap.add_argument("--out", default="results/tables")
    a = ap.parse_args(argv)
    ref = load_specs(a.specs, a.reference).get(a.paper, {})
    recs = [r for r in read_records(a.records) if r["paper"] == a.paper]
    for table in sorted(set(ref) | {r["table"] for r in recs}):
        mine = [r for r in recs if r["table"] == table]
        path = Path(a.out) / f"{a.paper}__{table}__alignment.png"
        if plot_table(a.paper, table, ref.get(table, {}), mine, path):
            print(path)
        path = Path(a.out) / f"{a.paper}__{table}__vs_column.png"
        if plot_vs_column(a.paper, table, ref.get(table, {}), mine, path):
            print(path)


if __name__ == "__main__":
    main()
