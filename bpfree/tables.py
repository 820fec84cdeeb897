"""Records + table specs + the papers' reported numbers -> results/tables/<paper>__<table>.{md,csv} (+ the
table's figures, bpfree/plots.py). `python -m bpfree.tables` (make tables). Nothing here trains; every number of ours
comes from a record, every paper number from results/reference.yaml, and a cell with no records says why.
A table's layout (rows, columns, metrics, not_run, borrow, ...) is its spec in experiments/<paper>/tables.yaml.

Layout (long format, one line per cell and metric):
  row | column | metric | scale | ours (mean ± std) | n | paper (mean ± std) | ours - paper | z
where z = (ours - paper) / sqrt(std_ours^2 + std_paper^2), blank when neither std is known.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd
import yaml

from bpfree import atomic
from bpfree.plots import render as render_figures
from bpfree.records import read_records

DEFAULT_REFERENCE = "results/reference.yaml"
DEFAULT_SPECS = "experiments"
DEFAULT_SPEC = {"metrics": ["test_acc"], "select": "best"}  # a table of records with no spec yet
_ALT = {"": "learning curves", "__diagnostics": "rule diagnostics"}  # alt text of a table's two standard figures


def _paper_value(reported: dict, row: str, col: str, metric: str, single: bool):
    v = reported.get(row, {}).get(col)
    if isinstance(v, dict):
        v = v.get(metric)
    elif not single:
        v = None
    if v is None:
        return None, None
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return float(v[0]), (float(v[1]) if len(v) > 1 else None)


def _fmt(mean, std=None, digits=4) -> str:
    if mean is None:
        return ""
    if 0 < abs(mean) < 0.5 * 10 ** -digits:  # would print as 0.0000 (associated-learning Table 5 losses)
        return f"{mean:.{digits - 1}e}" + (f" ± {std:.{digits - 1}e}" if std is not None else "")
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _why_empty(unavailable: list[dict]) -> str:
    """Why a cell without runs is empty, from the committed records alone (never from the filesystem of
    the machine that renders the table): a sweep job that found no data left an 'unavailable' record."""
    if unavailable:
        return "no records: " + sorted({r.get("message") or "dataset not available" for r in unavailable})[0]
    return "no records (not run yet)"


def _budget(runs: list[dict]) -> list[str]:
    """How long a cell's runs trained ("20 epochs", "1 epoch on 12800 examples"): CPU-scale cells differ."""
    out = set()
    for r in runs:
        cfg = r.get("config") or {}
        epochs = (cfg.get("trainer") or {}).get("epochs")
        subset = (cfg.get("data") or {}).get("subset")
        if epochs is not None:
            out.add(f"{epochs} epoch{'s' if epochs != 1 else ''}" + (f" on {subset} examples" if subset else ""))
    return sorted(out)


def _not_run(spec: dict, row: str, col: str) -> str | None:
    """Why a cell is deliberately left empty: spec `not_run`, keyed "row/column", row, or column."""
    why = spec.get("not_run", {})
    return why.get(f"{row}/{col}") or why.get(row) or why.get(col)


def one_per_seed(records: list[dict]) -> tuple[list[dict], dict]:
    """A cell averages over seeds, so it keeps one record per seed: the longest-trained, then the newest
    (a record written under an older naming scheme beside a rerun of the same cell would otherwise count
    twice). Returns the kept records and, per cell, how many were set aside."""
    best: dict[tuple, dict] = {}
    superseded: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in records:
        key = (r["row"], r["column"], r["scale"], r["seed"])
        rank = (r["status"] == "ok", len(r["metrics"]["per_epoch"]), r.get("created", ""))
        if key in best:
            superseded[key[:3]] += 1
            old = best[key]
            if rank <= (old["status"] == "ok", len(old["metrics"]["per_epoch"]), old.get("created", "")):
                continue
        best[key] = r
    return list(best.values()), superseded


def build_table(paper: str, table: str, spec: dict, records: list[dict]) -> pd.DataFrame:
    metrics, select = spec["metrics"], spec.get("select", "best")
    reported = spec.get("reported", {})
    labels = spec.get("labels", {})
    single = len(metrics) == 1
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    diverged: dict[tuple[str, str, str], int] = defaultdict(int)
    unavailable: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == "unavailable":
            unavailable[(r["row"], r["column"])].append(r)
    records, superseded = one_per_seed([r for r in records if r["status"] != "unavailable"])
    for r in records:
        key = (r["row"], r["column"], r["scale"])
        if r["status"] == "ok":
            cells[key].append(r)
        else:
            diverged[key] += 1
    rows = list(spec.get("rows", [])) + sorted({k[0] for k in cells} - set(spec.get("rows", [])))
    cols = list(spec.get("columns", [])) + sorted({k[1] for k in cells} - set(spec.get("columns", [])))
    scales = sorted({k[2] for k in cells} | {k[2] for k in diverged}) or ["-"]
    lines = []
    for row in rows:
        for col in cols:
            present = [s for s in scales if (row, col, s) in cells or (row, col, s) in diverged]
            for scale in present or ["-"]:
                runs = cells.get((row, col, scale), [])
                notes = []
                if diverged.get((row, col, scale)):
                    notes.append(f"{diverged[(row, col, scale)]} run(s) diverged (excluded)")
                if superseded.get((row, col, scale)):
                    notes.append(f"{superseded[(row, col, scale)]} shorter or older run(s) of the same seed "
                                 "superseded")
                ds_notes = {r.get("dataset_note") for r in runs if r.get("dataset_note")}
                notes += sorted(ds_notes) + _budget(runs)
                for metric in metrics:
                    vals = [r["metrics"][select].get(metric) for r in runs]
                    vals = [v for v in vals if v is not None]
                    mean = sum(vals) / len(vals) if vals else None
                    std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                           if len(vals) > 1 else None)
                    p_mean, p_std = _paper_value(reported, row, col, metric, single)
                    if not runs:
                        # spec.dataset names the one dataset of a table whose columns are not datasets
                        # a reason given in the spec (cell left out on purpose) beats the generic ones
                        why = _not_run(spec, row, col)
                        note = "" if notes else (f"no records: {why}" if why else
                                                 _why_empty(unavailable.get((row, col), [])))
                        ours = note or "; ".join(notes)
                    elif not vals:
                        ours = f"n/a ({metric} not recorded: " + "; ".join(
                            sorted({str(r["metrics"][select].get(f'{metric}_note', 'missing')) for r in runs})) + ")"
                    else:
                        ours = _fmt(mean, std)
                    diff = mean - p_mean if (mean is not None and p_mean is not None) else None
                    lines.append({
                        "row": labels.get(row, row), "column": labels.get(col, col), "metric": metric,
                        "scale": scale if runs else "", "ours": ours, "n": len(vals),
                        "paper": _fmt(p_mean, p_std), "ours - paper": _fmt(diff) if diff is not None else "",
                        "z": _z(diff, std, p_std),
                        "notes": "; ".join(notes) if runs else "",
                    })
    return pd.DataFrame(lines)


def _z(diff, std, p_std) -> str:
    sigma = math.sqrt((std or 0.0) ** 2 + (p_std or 0.0) ** 2)
    return f"{diff / sigma:+.1f}" if diff is not None and sigma > 0 else ""


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(out)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key repeated in one mapping is an error: a repeated paper or table block
    would otherwise silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: "
                                 "merge the two blocks into one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_reference(path) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=_UniqueKeyLoader) or {}


def load_specs(specs_dir=DEFAULT_SPECS, reference=DEFAULT_REFERENCE) -> dict:
    """{paper: {table: spec}}: each experiments/<paper>/tables.yaml, with the paper's numbers (`source`,
    `reported`) joined in from the reference file. Reference numbers for a table no spec lays out are
    an error (they would never be shown)."""
    specs: dict = {}
    for f in sorted(Path(specs_dir).glob("*/tables.yaml")):
        specs[f.parent.name] = load_reference(f)
    for paper, tables in load_reference(reference).items():
        for table, ref in tables.items():
            if table not in specs.get(paper, {}):
                raise ValueError(f"{reference} has numbers for {paper}/{table}, which no "
                                 f"{specs_dir}/{paper}/tables.yaml lays out: add its spec there")
            extra = set(ref) - {"source", "reported"}
            if extra:
                raise ValueError(f"{reference}: {paper}/{table} has {sorted(extra)}; the reference file holds "
                                 f"only the papers' `source` and `reported`; layout keys go in "
                                 f"{specs_dir}/{paper}/tables.yaml")
            specs[paper][table] = {**specs[paper][table], **ref}
    return specs


def _records_for(paper: str, table: str, spec: dict, by_table: dict) -> tuple[list[dict], list[str]]:
    """A table's runs and the record folders they come from.

    A table may read another table's runs: `records_table` (associated-learning Table 5 = the runs of
    Table 6), and `borrow` cells whose config is the same run (abstracted-gradients Table 4's n = 6 column
    = Table 2's runs): `borrow: [{table: table2, columns: {multi30k: n6}}]` relabels those columns; an
    optional `rows: [...]` borrows only those rows (a one-row table borrowing a three-row table's runs).
    """
    source = spec.get("records_table", table)
    recs, sources = list(by_table.get((paper, source), [])), [source]
    for b in spec.get("borrow", []):
        sources.append(b["table"])
        rows = b.get("rows")
        recs += [{**r, "column": b["columns"][r["column"]]}
                 for r in by_table.get((paper, b["table"]), [])
                 if r["column"] in b["columns"] and (rows is None or r["row"] in rows)]
    return recs, sources


def render_all(records_dir="results/records", reference=DEFAULT_REFERENCE, out_dir="results/tables",
               plots: bool = True, specs_dir=DEFAULT_SPECS) -> list[Path]:
    ref = load_specs(specs_dir, reference)
    records = [r for r in read_records(records_dir) if r["paper"] != "adhoc"]
    by_table: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by_table[(r["paper"], r["table"])].append(r)
    keys = {(p, t) for p, tables in ref.items() for t in tables} | set(by_table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for paper, table in sorted(keys):
        spec = ref.get(paper, {}).get(table) or DEFAULT_SPEC
        recs, sources = _records_for(paper, table, spec, by_table)
        df = build_table(paper, table, spec, recs)
        stem = out / f"{paper}__{table}"
        with atomic.replacing(stem.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
        ran = [r for r in recs if r["status"] != "unavailable"]
        n_runs = len(ran)
        missing = len(recs) - n_runs
        scales = sorted({r["scale"] for r in ran}) or ["none"]
        header = [
            f"# {paper} / {table}",
            "",
            spec.get("title", ""),
            "",
            f"Generated by `make tables` from {n_runs} run record(s) under "
            + ", ".join(f"{records_dir}/{paper}/{t}/" for t in sources)
            + (f" (and {missing} of sweep jobs whose data was not available)" if missing else "") + "; "
            f"scale(s): {', '.join(scales)}. Ours: mean ± sample std over seeds ({spec.get('select', 'best')} "
            "over epochs). Paper: the paper's reported figure (results/reference.yaml"
            + (f"; {spec['source']}" if spec.get("source") else "") + "), never our run. "
            "z = (ours - paper) / sqrt(std_ours² + std_paper²).",
            "",
            "",
        ]
        body = _markdown(df) if len(df) else "_no cells_"
        # the figures read the cells' records: status ok, one per seed (bpfree/plots.py)
        pngs = render_figures(paper, table, spec, [r for r in one_per_seed(ran)[0] if r["status"] == "ok"],
                              out) if plots else []
        figure = "\n" + "".join(f"\n![{_ALT.get(p.stem[len(stem.name):], p.stem[len(stem.name) + 2:])}]({p.name})\n"
                                 for p in pngs) if pngs else ""
        atomic.write_text(stem.with_suffix(".md"), "\n".join(header) + body + figure + "\n")
        written.append(stem.with_suffix(".md"))
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="results/records")
    ap.add_argument("--reference", default=DEFAULT_REFERENCE)
    ap.add_argument("--specs", default=DEFAULT_SPECS, help="folder of <paper>/tables.yaml table specs")
    ap.add_argument("--out", default="results/tables")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    for p in render_all(a.records, a.reference, a.out, plots=not a.no_plots, specs_dir=a.specs):
        print(p)


if __name__ == "__main__":
    main()
