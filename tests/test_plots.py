"""bpfree/plots.py: the figures a table spec declares are drawn from the records' numbers, the same
records give byte-identical PNGs, and a spec naming what does not exist fails naming what does."""
from __future__ import annotations

import copy
import math
from collections import defaultdict

import numpy as np
import pytest

from bpfree import plots
from bpfree.plots import FigureSpecError, render
from bpfree.records import read_records
from bpfree.tables import one_per_seed, _records_for, load_specs

BASE = {"paper": "p", "table": "t", "scale": "cpu", "status": "ok", "name": "x", "seed": 0,
        "metrics": {"final": {}, "best": {}, "per_epoch": []}}


def _rec(row, column, seed, accs, angles=None):
    """accs: test_acc per epoch; angles: {layer: angle per epoch} -> per-epoch angle_grad/<layer>."""
    r = copy.deepcopy(BASE)
    r.update(row=row, column=column, seed=seed, name=f"{row}-{column}-s{seed}")
    r["metrics"]["per_epoch"] = [
        {"epoch": t + 1, "test_acc": a, **{f"angle_grad/{k}": v[t] for k, v in (angles or {}).items()}}
        for t, a in enumerate(accs)]
    r["metrics"]["best"] = {"test_acc": max(accs)}
    r["metrics"]["final"] = {"test_acc": accs[-1]}
    return r


SPEC = {"metrics": ["test_acc"], "select": "best", "rows": ["bp", "fa"], "columns": ["1", "2"],
        "labels": {"fa": "feedback alignment"}}


def _records():
    return [_rec("bp", "1", 0, [0.5, 0.7]), _rec("bp", "1", 1, [0.6, 0.9]),
            _rec("fa", "1", 0, [0.4, 0.6], {"L1.q": [80, 70], "L1.k": [60, 50], "L2.q": [40, 30]}),
            _rec("fa", "2", 0, [0.3, 0.5], {"L1.q": [85, 75], "L1.k": [65, 55], "L2.q": [45, 35]}),
            _rec("fa", "2", 1, [0.2, 0.7], {"L1.q": [95, 85], "L1.k": [75, 65], "L2.q": [55, 45]})]


def _lines(grid):
    return {(p["title"], ln["label"]): ln for row in grid for p in row if p for ln in p["lines"]}


def test_curves_are_the_mean_over_seeds_per_epoch():
    fig = {"kind": "curves", "name": "c", "keys": ["test_acc"], "lines": ["row", "column"]}
    lines = _lines(plots._line_data(fig, SPEC, _records(), "here"))
    bp = lines[("", "bp / 1")]
    assert bp["x"] == [1, 2] and bp["y"] == pytest.approx([0.55, 0.8]) and bp["n"] == 2
    assert lines[("", "feedback alignment / 2")]["y"] == pytest.approx([0.25, 0.6])  # the table's labels


def test_versus_draws_mean_and_sample_std_over_seeds_against_the_numeric_column():
    fig = {"kind": "versus", "name": "v", "metric": "test_acc", "percent": True}
    (fa,) = [ln for (_, label), ln in _lines(plots._line_data(fig, SPEC, _records(), "here")).items()
             if label == "feedback alignment"]
    assert fa["x"] == [1.0, 2.0]
    assert fa["y"] == pytest.approx([60.0, 60.0])            # best epoch: 0.6; mean(0.5, 0.7)
    assert fa["err"] == pytest.approx([0.0, 100 * math.sqrt(0.02)])  # sample std of 0.5, 0.7


def test_groups_average_their_layers_and_block_is_the_layer_index():
    groups = {"Q": "q", "K": "k"}
    by_col = {"kind": "versus", "name": "a", "keys": ["angle_grad/"], "groups": groups, "panels": ["group"],
              "lines": ["row"]}
    lines = _lines(plots._line_data(by_col, SPEC, _records(), "here"))
    # Q at the last epoch: column 1 mean(70, 30) = 50; column 2 seeds mean(75, 35) = 55, mean(85, 45) = 65
    assert lines[("Q", "feedback alignment")]["y"] == pytest.approx([50.0, 60.0])
    assert lines[("K", "feedback alignment")]["y"] == pytest.approx([50.0, 60.0])  # 50; mean(55, 65)
    per_block = {**by_col, "x": "block", "columns": "last", "panels": ["row"], "lines": ["group"]}
    lines = _lines(plots._line_data(per_block, SPEC, plots._select(per_block, SPEC, _records(), "here"), "here"))
    assert lines[("feedback alignment", "Q")]["x"] == [1, 2]
    assert lines[("feedback alignment", "Q")]["y"] == pytest.approx([80.0, 40.0])  # only column 2 (the last)
    assert lines[("feedback alignment", "K")]["x"] == [1]


def test_same_records_give_byte_identical_pngs_written_atomically(tmp_path):
    spec = {**SPEC, "diagnostics": ["angle_grad/"], "figures": [
        {"kind": "versus", "name": "acc", "metric": "test_acc", "hline": 0.1, "hline_label": "chance"},
        {"kind": "curves", "name": "align", "keys": ["angle_grad/"], "columns": "last", "panels": ["row"],
         "lines": ["layer"], "hline": 90, "ylim": [0, 180]}]}
    a = render("p", "t", spec, _records(), tmp_path / "a")
    b = render("p", "t", spec, _records(), tmp_path / "b")
    again = render("p", "t", spec, _records(), tmp_path / "a")  # over the existing files
    assert [p.name for p in a] == ["p__t.png", "p__t__diagnostics.png", "p__t__acc.png", "p__t__align.png"]
    for x, y, z in zip(a, b, again):
        assert x.read_bytes() == y.read_bytes() == z.read_bytes(), x.name
        assert b"Matplotlib" not in x.read_bytes()  # no version stamp to change with the library
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in a)  # no .tmp left


def test_scatter_draws_each_rows_embedding_in_the_tables_row_order(tmp_path):
    rng = np.random.default_rng(0)
    recs = []
    for row in ("al", "bp"):
        f = tmp_path / f"{row}.npz"
        np.savez(f, y=rng.integers(0, 10, 50).astype(np.int8), layers=np.array(["raw", "l2"]),
                 emb_raw=rng.normal(size=(50, 2)), emb_l2=rng.normal(size=(50, 2)))
        recs.append({**copy.deepcopy(BASE), "row": row, "column": "mlp", "name": row, "features": str(f)})
    spec = {"metrics": ["inter"], "select": "final", "rows": ["bp", "al"], "columns": ["mlp"],
            "figures": [{"kind": "scatter", "name": "tsne", "labels": {"raw": "raw input"}}]}
    grid = plots._scatter_data(spec["figures"][0], spec, recs, "here")
    assert [[p["title"] for p in row] for row in grid] == [["bp: raw input", "bp: l2"], ["al: raw input", "al: l2"]]
    np.testing.assert_allclose(grid[0][1]["xy"], np.load(tmp_path / "bp.npz")["emb_l2"], rtol=1e-6)
    (png,) = render("p", "t7", spec, recs, tmp_path / "out")
    assert png.name == "p__t7__tsne.png" and png.stat().st_size > 1000


@pytest.mark.parametrize("fig, message", [
    ({"kind": "histogram", "name": "h"}, "unknown figure kind 'histogram'; valid kinds: curves, scatter, versus"),
    ({"kind": "versus", "name": "v", "metric": "test_accuracy"}, "the records' best metrics: test_acc"),
    ({"kind": "curves", "name": "c", "keys": ["angle_B/"]}, "per-epoch keys: angle_grad/, epoch, test_acc"),
    ({"kind": "curves", "name": "c", "keys": ["test_acc"], "rows": ["kp"]}, r"unknown row\(s\) \['kp'\]; the table's rows: bp, fa"),
    ({"kind": "curves", "name": "c", "keys": ["test_acc"], "columns": ["9"]}, "the table's columns: 1, 2"),
    ({"kind": "curves", "name": "c", "keys": ["test_acc"], "lines": ["seed"]}, "valid dims: row, column, scale, key"),
    ({"kind": "curves", "name": "c", "keys": ["test_acc"], "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"kind": "versus", "name": "v", "keys": ["angle_grad/"], "x": "epoch"}, "x 'epoch' is not one of: column, block"),
])
def test_a_figure_naming_what_does_not_exist_fails_naming_what_does(fig, message, tmp_path):
    with pytest.raises(FigureSpecError, match=message) as e:
        render("p", "t", {**SPEC, "figures": [fig]}, _records(), tmp_path)
    assert "experiments/p/tables.yaml: t:" in str(e.value)  # where to fix it
    assert not list(tmp_path.iterdir())  # a bad spec fails before the table's other figures are drawn


def test_figures_must_be_a_list():
    with pytest.raises(FigureSpecError, match="must be a list"):
        render("p", "t", {**SPEC, "figures": {"vs_column": {"xlabel": "x"}}}, _records(), "unused")


def _committed():
    specs = load_specs()
    by_table = defaultdict(list)
    for r in read_records("results/records"):
        by_table[(r["paper"], r["table"])].append(r)
    for paper, tables in sorted(specs.items()):
        for table, spec in sorted(tables.items()):
            recs, _ = _records_for(paper, table, spec, by_table)
            ok = [r for r in one_per_seed([r for r in recs if r["status"] != "unavailable"])[0] if r["status"] == "ok"]
            yield paper, table, spec, ok


def test_every_committed_figure_spec_finds_its_data(tmp_path):
    """Each declared figure of a table with records gathers data from the committed records (no drawing:
    `make tables` draws them; the slow test below renders them all)."""
    declared = 0
    for paper, table, spec, ok in _committed():
        would = render(paper, table, spec, ok, tmp_path, draw=False)
        names = [p.name for p in would]
        for fig in spec.get("figures", []):
            if plots._select(fig, spec, ok, ""):
                declared += 1
                assert f"{paper}__{table}__{fig['name']}.png" in names
    assert declared >= 15 and not list(tmp_path.iterdir())


def test_committed_tsne_figure_renders_twice_identically(tmp_path):
    """The committed t-SNE data (results/figures_data) drawn through the table7 spec, twice."""
    ((paper, table, spec, ok),) = [c for c in _committed() if any(f["kind"] == "scatter" for f in c[2].get("figures", []))]
    spec = {**spec, "figures": [f for f in spec["figures"] if f["kind"] == "scatter"][:1]}
    a, b = render(paper, table, spec, ok, tmp_path / "a"), render(paper, table, spec, ok, tmp_path / "b")
    assert len(a) == 1 and a[0].read_bytes() == b[0].read_bytes()


@pytest.mark.slow
def test_make_tables_twice_gives_byte_identical_files(tmp_path):
    from bpfree.tables import render_all

    render_all("results/records", "results/reference.yaml", tmp_path / "a")
    render_all("results/records", "results/reference.yaml", tmp_path / "b")
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and sum(p.suffix == ".png" for p in a) > 40
    assert [p.name for p in a if p.read_bytes() != (tmp_path / "b" / p.name).read_bytes()] == []
