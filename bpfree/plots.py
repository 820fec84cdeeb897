"""Every figure of `make tables`: a table spec's `figures:` list (experiments/<paper>/tables.yaml) drawn
from the same records as its table. Nothing here trains or names a paper; a new figure is YAML.

Each table gets its learning curve (`<paper>__<table>.png`: the first metric per epoch, one line per
row / column / scale) and, when its spec lists `diagnostics` (per-epoch key prefixes), the diagnostics
figure (`__diagnostics.png`: a panel per key and column, a line per row). A spec's `figures:` adds more,
each written to results/tables/<paper>__<table>__<name>.png. Kinds and their keys:

  curves   a per-epoch value vs epoch.      keys: [per-epoch keys; one ending in '/' or '_' is a prefix];
           optional: true draws nothing (instead of failing) when no record has them
  versus   a value vs a number, mean ± std over seeds (error bars).
           metric: <a metric of the records' `select` (best|final) block>, or keys: [...] (last epoch);
           x: column (the table's columns, numeric) | block (the integer in the layer name's first
           dotted part, e.g. L3.attn.q -> 3)
  scatter  a 2-D embedding coloured by class, a panel per (row, layer). data: <record key naming an .npz
           holding y (N,) class labels, layers (names) and emb_<layer> (N, 2)>; default `features`
  all      name (required), title, rows, columns ([...] or `last`), labels (merged over the table's),
           panels: [<=2 dims: grid rows, grid columns], lines: [dims], groups: {group: layer suffix},
           xlabel, ylabel, ylim: [lo, hi], hline: y (a dashed reference), hline_label, percent (x100)

Dims: row, column, scale, key (per-epoch key), prefix (the `keys` entry it matched), layer (the key
after its prefix), group (a `groups` name). A line is the mean over seeds (records) of the mean over
every dim the figure does not draw, so e.g. `lines: [row]` with `groups` averages a group's layers.
PNGs are written atomically with no version stamp (`metadata={"Software": None}`) under matplotlib's
default style, so the same records give byte-identical files.
"""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from bpfree import atomic

DIMS = ("row", "column", "scale", "key", "prefix", "layer", "group")
COMMON = {"kind", "name", "title", "rows", "columns", "labels", "panels", "lines", "groups", "xlabel", "ylabel",
          "ylim", "hline", "hline_label", "percent"}
KINDS = {"curves": COMMON | {"keys", "optional"}, "versus": COMMON | {"metric", "keys", "x"}, "scatter": COMMON | {"data"}}
DPI = 100


class FigureSpecError(ValueError):
    """A figure spec names something that does not exist (kind, key, dim, metric, row, column)."""


# ---- drawing: data in, PNG out --------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write atomically (tmp + rename) and reproducibly (no version or date in the PNG)."""
    path = Path(path)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def draw_lines(path: Path, grid: list[list[dict | None]], *, title: str, xlabel: str, ylabel: str = "",
               ylim=None, hline=None, hline_label=None, xticks=None, sequential: bool = False) -> Path:
    """grid[i][j] = {"title": str, "lines": [{"label", "slot", "n", "x", "y", "err" (or None)}]} or None
    (a blank panel). A line's colour follows its `slot` (its place among all the figure's lines), so a
    label has one colour in every panel; `sequential`: the slots are ordered (layers), dark to yellow.
    One panel with up to 8 lines: a legend inside it (with n, the seeds averaged); otherwise one legend
    beside the grid, and n in each panel's title."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [p for r in grid for p in r if p]
    slots = {ln["slot"]: ln["label"] for p in panels for ln in p["lines"]}
    n_slots = max(slots) + 1
    shared = len(slots) > 8 or len(panels) > 1
    n_r, n_c = len(grid), max(len(r) for r in grid)
    with plt.style.context("default"):
        cmap = plt.get_cmap("viridis" if sequential else ("tab10" if n_slots <= 10 else "tab20"))

        def color(slot):
            return cmap(slot / max(n_slots - 1, 1)) if sequential else cmap(slot % cmap.N)

        legend_w = 0.06 * max(map(len, slots.values())) + 0.6 if shared else 0.0  # inches, fontsize 6
        size = (max(7.0, 4.6 * n_c) + legend_w, max(4.2, 2.6 * n_r, 0.12 * len(slots) + 1 if shared else 0))
        fig, axes = plt.subplots(n_r, n_c, figsize=size, squeeze=False, layout="constrained")
        for i, prow in enumerate(grid):
            for j in range(n_c):
                ax = axes[i][j]
                if j >= len(prow) or prow[j] is None:
                    ax.axis("off")
                    continue
                panel = prow[j]
                for ln in panel["lines"]:
                    label = ln["label"] if shared else f"{ln['label']} (n={ln['n']})"
                    if ln.get("err") is not None and any(e > 0 for e in ln["err"]):
                        ax.errorbar(ln["x"], ln["y"], yerr=ln["err"], marker="o", ms=3, lw=1, capsize=2,
                                    color=color(ln["slot"]), label=label)
                    else:
                        ax.plot(ln["x"], ln["y"], marker="o", ms=3, lw=1, color=color(ln["slot"]), label=label)
                if hline is not None:
                    ax.axhline(hline, color="black", ls="--", lw=0.8, label=hline_label)
                if ylim is not None:
                    ax.set_ylim(*ylim)
                if xticks is not None and len(xticks) <= 15:  # every x drawn, e.g. the depths of a sweep
                    ax.set_xticks(xticks)
                else:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ns = sorted({ln["n"] for ln in panel["lines"]})
                n_note = f" (n={ns[0]})" if len(ns) == 1 else f" (n={ns[0]}-{ns[-1]})"
                ax.set_title(panel["title"] + (n_note if shared else ""), fontsize=8)
                ax.set_xlabel(xlabel, fontsize=7)
                ax.set_ylabel(ylabel, fontsize=7)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if not shared:
                    ax.legend(fontsize=6, ncol=1 if len(panel["lines"]) <= 4 else 2)
        if shared:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], color=color(k), marker="o", ms=3, lw=1) for k in sorted(slots)]
            fig.legend(handles, [slots[k] for k in sorted(slots)], loc="outside right upper", fontsize=6)
        fig.suptitle(textwrap.fill(title, int(11 * size[0])), fontsize=9)
        return save(fig, path)


def draw_scatter(path: Path, grid: list[list[dict]], *, title: str) -> Path:
    """grid[i][j] = {"title": str, "xy": (N, 2) array, "c": (N,) class labels}."""
    plt = _pyplot()
    n_r, n_c = len(grid), max(len(r) for r in grid)
    with plt.style.context("default"):
        size = (3 * n_c, 3 * n_r)
        fig, axes = plt.subplots(n_r, n_c, figsize=size, squeeze=False, layout="constrained")
        for i, prow in enumerate(grid):
            for j in range(n_c):
                ax = axes[i][j]
                if j < len(prow):
                    p = prow[j]
                    ax.scatter(p["xy"][:, 0], p["xy"][:, 1], c=p["c"], cmap="tab10", s=3, linewidths=0)
                    ax.set_title(p["title"], fontsize=9)
                ax.set_xticks([]), ax.set_yticks([])
                if j >= len(prow):
                    ax.axis("off")
        fig.suptitle(textwrap.fill(title, int(11 * size[0])), fontsize=9)
        return save(fig, path)


# ---- specs ----------------------------------------------------------------------------------------
def figures_of(spec: dict) -> list[dict]:
    """A table's figures: its learning curve, its diagnostics (when listed) and its `figures:`."""
    out = [{"kind": "curves", "name": "", "keys": spec["metrics"][:1], "lines": ["row", "column", "scale"],
            "title": f"{spec['metrics'][0]} per epoch (mean over seeds)", "optional": True}]  # none if not per epoch
    if spec.get("diagnostics"):
        out.append({"kind": "curves", "name": "diagnostics", "keys": list(spec["diagnostics"]),
                    "panels": ["key", "column"], "lines": ["row", "scale"],
                    "title": "rule diagnostics per epoch (fixed probe batch; mean over seeds)"})
    declared = spec.get("figures") or []
    if not isinstance(declared, list):
        raise FigureSpecError(f"`figures` must be a list of {{kind, name, ...}} (kinds: {', '.join(sorted(KINDS))}), "
                              f"not {type(declared).__name__}")
    return out + [dict(f) for f in declared]


def check(fig: dict, spec: dict, where: str) -> None:
    """Errors that need no records: kind, option names, dims, rows and columns the table does not have."""
    kind = fig.get("kind")
    if kind not in KINDS:
        raise FigureSpecError(f"{where}: unknown figure kind {kind!r}; valid kinds: {', '.join(sorted(KINDS))}")
    if not isinstance(fig.get("name"), str):
        raise FigureSpecError(f"{where}: a figure needs a `name` (its file is <paper>__<table>__<name>.png)")
    extra = set(fig) - KINDS[kind]
    if extra:
        raise FigureSpecError(f"{where}: unknown key(s) {sorted(extra)} for kind {kind!r}; valid: {sorted(KINDS[kind])}")
    dims = list(fig.get("panels", [])) + list(fig.get("lines", []))
    bad = [d for d in dims if d not in DIMS]
    if bad:
        raise FigureSpecError(f"{where}: unknown dim(s) {bad} in panels/lines; valid dims: {', '.join(DIMS)}")
    if len(fig.get("panels", [])) > 2:
        raise FigureSpecError(f"{where}: panels takes at most 2 dims (grid rows, grid columns), got {fig['panels']}")
    if "group" in dims and not fig.get("groups"):
        raise FigureSpecError(f"{where}: dim 'group' needs `groups: {{name: layer suffix}}`")
    if kind == "curves" and not fig.get("keys"):
        raise FigureSpecError(f"{where}: kind 'curves' needs `keys` (per-epoch keys or prefixes)")
    if kind == "versus":
        if ("metric" in fig) == ("keys" in fig):
            raise FigureSpecError(f"{where}: kind 'versus' takes exactly one of `metric` (a {spec.get('select', 'best')} "
                                  "metric) and `keys` (per-epoch keys, last epoch)")
        if fig.get("x", "column") not in ("column", "block"):
            raise FigureSpecError(f"{where}: x {fig['x']!r} is not one of: column, block")
    for what in ("rows", "columns"):
        chosen = fig.get(what)
        if chosen is None or chosen == "last" and what == "columns":
            continue
        valid = [str(v) for v in spec.get(what, [])]
        unknown = [v for v in map(str, chosen) if v not in valid]
        if valid and unknown:
            raise FigureSpecError(f"{where}: unknown {what[:-1]}(s) {unknown}; the table's {what}: {', '.join(valid)}")


def _match(key: str, entries: list[str]) -> str | None:
    """The `keys` entry a per-epoch key matches: an entry ending in '/' or '_' is a prefix, else exact."""
    for e in entries:
        if key == e or (e.endswith(("/", "_")) and key.startswith(e)):
            return e
    return None


def _group(layer: str, groups: dict) -> str | None:
    for g, suffix in groups.items():
        if layer == suffix or layer.endswith("." + suffix):
            return g
    return None


def _block(layer: str) -> int | None:
    digits = "".join(ch for ch in layer.split(".")[0] if ch.isdigit())
    return int(digits) if digits else None


def _number(column: str, where: str) -> float:
    try:
        return float(column)
    except ValueError:
        raise FigureSpecError(f"{where}: x: column needs numeric columns, got {column!r}; use kind 'curves' or "
                              "name numeric columns") from None


def _points(fig: dict, spec: dict, records: list[dict], where: str) -> list[dict]:
    """One point per (record, key, x): {rec, row, column, scale, key, prefix, layer, group, x, y}."""
    entries, groups, select = fig.get("keys"), fig.get("groups") or {}, spec.get("select", "best")
    points = []
    for i, r in enumerate(records):
        base = {"rec": i, "row": r["row"], "column": str(r["column"]), "scale": r["scale"]}
        if fig.get("metric") is not None:
            v = r["metrics"][select].get(fig["metric"])
            if v is not None:
                points.append({**base, "key": fig["metric"], "prefix": fig["metric"], "layer": fig["metric"],
                               "group": None, "x": _number(base["column"], where), "y": v})
            continue
        epochs = r["metrics"]["per_epoch"]
        if fig["kind"] == "versus":
            epochs = epochs[-1:]
        for t, e in enumerate(epochs):
            for k, v in e.items():
                p = _match(k, entries)
                if p is None or v is None or v != v:
                    continue
                layer = k[len(p):] if k != p else k
                g = _group(layer, groups) if groups else None
                if groups and g is None:
                    continue
                if fig["kind"] == "curves":
                    x = e.get("epoch", t + 1)
                elif fig.get("x", "column") == "block":
                    x = _block(layer)
                    if x is None:
                        continue
                else:
                    x = _number(base["column"], where)
                points.append({**base, "key": k, "prefix": p, "layer": layer, "group": g, "x": x, "y": v})
    return points


def _order(values, preferred) -> list:
    preferred = [str(p) for p in preferred]
    seen = list(dict.fromkeys(values))
    return [p for p in preferred if p in seen] + [v for v in seen if v not in preferred]


def _available(fig: dict, spec: dict, records: list[dict]) -> str:
    if fig.get("metric") is not None:
        names = {k for r in records for k in r["metrics"][spec.get("select", "best")]}
        return f"the records' {spec.get('select', 'best')} metrics: " + ", ".join(sorted(names))
    names = {k.split("/")[0] + "/" if "/" in k else k for r in records for e in r["metrics"]["per_epoch"] for k in e}
    return "the records' per-epoch keys: " + ", ".join(sorted(names))


def _line_data(fig: dict, spec: dict, records: list[dict], where: str):
    points = _points(fig, spec, records, where)
    if not points and fig.get("optional"):
        return None
    if not points:
        raise FigureSpecError(f"{where}: {fig.get('metric') or fig.get('keys')} matches nothing in the "
                              f"{len(records)} record(s); {_available(fig, spec, records)}")
    panels, lines = list(fig.get("panels", [])), list(fig.get("lines", ["row"]))
    dims = panels + lines
    # mean inside a record over the dims not drawn, then mean ± std over records
    per_rec: dict[tuple, list[float]] = defaultdict(list)
    for p in points:
        per_rec[(p["rec"], *(p[d] for d in dims), p["x"])].append(p["y"])
    per_line: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for (rec, *vals, x), ys in per_rec.items():
        per_line[tuple(vals)][x].append(sum(ys) / len(ys))
    order = {d: _order([p[d] for p in points], {"row": spec.get("rows", []), "column": spec.get("columns", []),
                                                "prefix": fig.get("keys") or [], "group": list(fig.get("groups") or {})
                                                }.get(d, [])) for d in dims}
    labels = {**{str(k): v for k, v in (spec.get("labels") or {}).items()},
              **{str(k): v for k, v in (fig.get("labels") or {}).items()}}
    scale = 100.0 if fig.get("percent") else 1.0

    def name(v):
        return str(labels.get(str(v), v))

    grid_rows = [()] if not panels else [(v,) for v in order[panels[0]]]
    grid_cols = [()] if len(panels) < 2 else [(v,) for v in order[panels[1]]]
    grid = []
    for gr in grid_rows:
        prow = []
        for gc in grid_cols:
            pv = gr + gc
            items = []
            for slot, lv in enumerate(_product([order[d] for d in lines])):
                by_x = per_line.get(pv + lv)
                if not by_x:
                    continue
                n = max(len(v) for v in by_x.values())
                # curves: the epochs every seed reached; versus: every x, each its own seeds
                xs = sorted(x for x in by_x if fig["kind"] == "versus" or len(by_x[x]) == n)
                ys = [scale * sum(by_x[x]) / len(by_x[x]) for x in xs]
                err = [scale * _std(by_x[x]) for x in xs] if fig["kind"] == "versus" else None
                items.append({"label": " / ".join(name(v) for v in lv), "slot": slot, "n": n, "x": xs, "y": ys,
                              "err": err})
            prow.append({"title": " · ".join(name(v) for v in pv), "lines": items} if items else None)
        if any(prow):  # a grid row with nothing to draw goes; an empty panel stays blank, keeping the columns
            grid.append(prow)
    return grid


def _product(lists):
    out = [()]
    for values in lists:
        out = [o + (v,) for o in out for v in values]
    return out


def _std(vals: list[float]) -> float:
    if len(vals) < 2:
        return 0.0
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _select(fig: dict, spec: dict, records: list[dict], where: str) -> list[dict]:
    rows = fig.get("rows")
    if rows is not None:
        records = [r for r in records if r["row"] in [str(x) for x in rows]]
    cols = fig.get("columns")
    if cols == "last":
        present = _order([str(r["column"]) for r in records], spec.get("columns", []))
        cols = present[-1:]
    if cols is not None:
        records = [r for r in records if str(r["column"]) in [str(c) for c in cols]]
    return records


def render(paper: str, table: str, spec: dict, records: list[dict], out_dir, draw: bool = True) -> list[Path]:
    """Draw every figure of one table from its records (status ok, one per seed); returns the PNGs
    written. A table without records draws nothing; a spec naming what does not exist raises.
    draw=False: gather every figure's data and check it, write nothing (a fast check of the specs)."""
    figs = figures_of(spec)
    seen = set()
    for i, fig in enumerate(figs):
        where = f"experiments/{paper}/tables.yaml: {table}: figure {fig.get('name', i)!r}"
        check(fig, spec, where)
        if fig["name"] in seen:
            raise FigureSpecError(f"{where}: two figures share the name {fig['name']!r}")
        seen.add(fig["name"])
    todo = []  # every figure's data first, so that a bad spec fails before anything is written
    for fig in figs:
        where = f"experiments/{paper}/tables.yaml: {table}: figure {fig['name']!r}"
        recs = _select(fig, spec, records, where)
        grid = (_scatter_data if fig["kind"] == "scatter" else _line_data)(fig, spec, recs, where) if recs else None
        if grid is not None:
            todo.append((fig, recs, grid))
    written = []
    for fig, recs, grid in todo:
        path = Path(out_dir) / (f"{paper}__{table}" + (f"__{fig['name']}" if fig["name"] else "") + ".png")
        title = f"{paper} {table}: {fig.get('title', fig['name'])}"
        if fig["kind"] == "scatter":
            title += f" ({len(grid[0][0]['c'])} points, scale {recs[0]['scale']})"
            written.append(draw_scatter(path, grid, title=title) if draw else path)
            continue
        if fig["kind"] == "curves":
            xlabel, ylabel = fig.get("xlabel", "epoch"), fig.get("ylabel", ", ".join(fig["keys"]))
        else:
            xlabel = fig.get("xlabel", fig.get("x", "column"))
            ylabel = fig.get("ylabel", fig.get("metric") or " ".join(fig["keys"]))
        hline = fig.get("hline")
        written.append(path if not draw else draw_lines(
            path, grid, title=title, xlabel=xlabel, ylabel=ylabel, ylim=fig.get("ylim"),
            hline=None if hline is None else hline * (100.0 if fig.get("percent") else 1.0),
            hline_label=fig.get("hline_label"),
            xticks=sorted({x for row in grid for p in row if p for ln in p["lines"] for x in ln["x"]}),
            sequential="layer" in fig.get("lines", [])))
    return written


def _scatter_data(fig: dict, spec: dict, records: list[dict], where: str) -> list[list[dict]]:
    """A panel per (row, layer) of the .npz each record names (the lowest seed of a row)."""
    key = fig.get("data", "features")
    labels = {**{str(k): v for k, v in (spec.get("labels") or {}).items()},
              **{str(k): v for k, v in (fig.get("labels") or {}).items()}}
    by_row: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r.get(key) is None:
            raise FigureSpecError(f"{where}: record {r['name']} has no {key!r} (the .npz of its embedding); "
                                  f"its keys: {', '.join(sorted(r))}")
        by_row.setdefault(r["row"], r)
    grid = []
    for row in _order(list(by_row), spec.get("rows", [])):
        r = by_row[row]
        if not Path(r[key]).exists():
            raise FileNotFoundError(f"{where}: record {r['name']}'s {key} file {r[key]} does not exist (run from the "
                                    "repository root; the producer of that file writes it)")
        d = np.load(r[key])
        grid.append([{"title": f"{labels.get(row, row)}: {labels.get(str(layer), layer)}",
                      "xy": d[f"emb_{layer}"].astype(np.float32), "c": d["y"]} for layer in d["layers"]])
    return grid
