"""Figures asked for by table specs (experiments/<paper>/tables.yaml `figures:`), from run records.

    python experiments/backprop-free-transformers/figures.py [--records results/records] [--out results/tables]

Spec keys (any table, any paper folder given by --specs; nothing here names a table):
  figures:
    accuracy_vs_column: {xlabel: "...", chance: 0.333}
        test accuracy (best epoch, mean over seeds, %) vs the numeric column, one line per row, the
        chance level dashed -> results/tables/<paper>__<table>__accuracy.png
    alignment_vs_column: {prefix: "angle_grad/", groups: {Q: attn.q, ...}}
        per group of layers (a layer named <block>.<suffix> belongs to the group whose suffix it ends
        with; exact names also work, e.g. head), the last epoch's angle averaged over the group's
        layers, vs column, one line per row (left panels); and for the largest column, the angle per
        block (x = block index, e.g. L1..Ln), one panel per row, one line per group (right)
        -> results/tables/<paper>__<table>__alignment_vs_column.png
Nothing here trains.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bpfree.records import read_records  # noqa: E402
from bpfree.tables import load_specs  # noqa: E402


def _ok(records):
    return [r for r in records if r["status"] == "ok" and r["metrics"]["per_epoch"]]


def _numeric(records):
    return [r for r in records if str(r["column"]).lstrip("-").isdigit()]


def accuracy_vs_column(paper: str, table: str, spec: dict, records: list[dict], path: Path) -> bool:
    fig_spec = (spec.get("figures") or {}).get("accuracy_vs_column")
    recs = _numeric(_ok(records))
    if fig_spec is None or not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = spec.get("labels", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in spec.get("rows") or sorted({r["row"] for r in recs}):
        by_col = defaultdict(list)
        for r in recs:
            if r["row"] == row and r["metrics"]["best"].get("test_acc") is not None:
                by_col[int(r["column"])].append(r["metrics"]["best"]["test_acc"])
        if by_col:
            xs = sorted(by_col)
            ax.plot(xs, [100 * sum(by_col[x]) / len(by_col[x]) for x in xs], marker="o", label=labels.get(row, row))
    if fig_spec.get("chance") is not None:
        ax.axhline(100 * fig_spec["chance"], color="black", ls="--", lw=1, label="chance")
    xlabel = fig_spec.get("xlabel", "column")
    cols = sorted({int(r["column"]) for r in recs})
    ax.set_xticks(cols)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("test accuracy % (best epoch, mean over seeds)", fontsize=8)
    ax.set_title(fig_spec.get("title", f"{paper} {table}: accuracy vs {xlabel}"), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _group_of(layer: str, groups: dict[str, str]) -> str | None:
    for g, suffix in groups.items():
        if layer == suffix or layer.endswith("." + suffix):
            return g
    return None


def last_epoch_angles(record: dict, prefix: str) -> dict[str, float]:
    last = record["metrics"]["per_epoch"][-1]
    return {k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix) and v == v}


def alignment_vs_column(paper: str, table: str, spec: dict, records: list[dict], path: Path) -> bool:
    fig_spec = (spec.get("figures") or {}).get("alignment_vs_column")
    recs = _numeric(_ok(records))
    if fig_spec is None or not recs:
        return False
    prefix, groups = fig_spec.get("prefix", "angle_grad/"), fig_spec["groups"]
    recs = [r for r in recs if last_epoch_angles(r, prefix)]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in (spec.get("rows") or sorted({r["row"] for r in recs})) if any(r["row"] == m for r in recs)]
    labels = spec.get("labels", {})
    deepest = max(int(r["column"]) for r in recs)
    n = len(groups)
    fig, axes = plt.subplots(max(n, len(rows)), 2, figsize=(11, 2.1 * max(n, len(rows))), squeeze=False)
    for i, g in enumerate(groups):  # left: group mean angle vs column, one line per rule
        ax = axes[i][0]
        for row in rows:
            by_col = defaultdict(list)
            for r in recs:
                if r["row"] != row:
                    continue
                vals = [v for k, v in last_epoch_angles(r, prefix).items() if _group_of(k, groups) == g]
                if vals:
                    by_col[int(r["column"])].append(sum(vals) / len(vals))
            if by_col:
                xs = sorted(by_col)
                ax.plot(xs, [sum(by_col[x]) / len(by_col[x]) for x in xs], marker="o", ms=3, label=labels.get(row, row))
        ax.axhline(90, color="grey", lw=0.6, ls="--")
        ax.set_ylim(0, 180)
        ax.set_title(f"{g}: {prefix} (last epoch, mean over layers and seeds) vs column", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6, ncol=4)
    for i in range(n, len(axes)):
        axes[i][0].axis("off")
    for i, row in enumerate(rows):  # right: deepest model, angle per block, one line per group
        ax = axes[i][1]
        per = defaultdict(lambda: defaultdict(list))  # group -> block index -> values
        for r in recs:
            if r["row"] != row or int(r["column"]) != deepest:
                continue
            for k, v in last_epoch_angles(r, prefix).items():
                g = _group_of(k, groups)
                block = k.split(".")[0]
                digits = "".join(ch for ch in block if ch.isdigit())
                if g is not None and digits:
                    per[g][int(digits)].append(v)
        for g, by_block in per.items():
            xs = sorted(by_block)
            ax.plot(xs, [sum(by_block[x]) / len(by_block[x]) for x in xs], marker="o", ms=3, label=g)
        ax.axhline(90, color="grey", lw=0.6, ls="--")
        ax.set_ylim(0, 180)
        ax.set_title(f"{labels.get(row, row)}, column {deepest}: {prefix} per block (last epoch)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if per:
            ax.legend(fontsize=6, ncol=len(per))
    for i in range(len(rows), len(axes)):
        axes[i][1].axis("off")
    fig.suptitle(f"{paper} {table}: where each rule loses alignment with backprop (90° = none)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=85)
    plt.close(fig)
    return True


FIGURES = {"accuracy_vs_column": ("accuracy", accuracy_vs_column),
           "alignment_vs_column": ("alignment_vs_column", alignment_vs_column)}


def render(records_dir="results/records", reference="results/reference.yaml", specs="experiments",
           out="results/tables") -> list[Path]:
    specs_all = load_specs(specs, reference)
    records = read_records(records_dir)
    written = []
    for paper, tables in specs_all.items():
        for table, spec in tables.items():
            mine = [r for r in records if r["paper"] == paper and r["table"] == spec.get("records_table", table)]
            for key, (suffix, fn) in FIGURES.items():
                if key in (spec.get("figures") or {}):
                    path = Path(out) / f"{paper}__{table}__{suffix}.png"
                    if fn(paper, table, spec, mine, path):
                        written.append(path)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="results/records")
    ap.add_argument("--reference", default="results/reference.yaml")
    ap.add_argument("--specs", default="experiments")
    ap.add_argument("--out", default="results/tables")
    a = ap.parse_args(argv)
    for p in render(a.records, a.reference, a.specs, a.out):
        print(p)


if __name__ == "__main__":
    main()
