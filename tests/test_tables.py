"""Tables are derived from records, the table specs (experiments/<paper>/tables.yaml) and the papers'
numbers (the reference file), and say why a cell is empty."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from bpfree.records import read_records, validate, write_record
from bpfree.tables import render_all

BASE = {
    "schema": 1, "paper": "p", "table": "t1", "row": "bp", "column": "mnist", "name": "x", "method": "bp",
    "model": "mlp", "dataset": "mnist", "seed": 0, "scale": "cpu", "status": "ok", "config": {},
    "metrics": {"final": {}, "best": {}, "per_epoch": []}, "params": {"total": 1},
    "timing": {"train_seconds": 1.0, "samples_per_second": 1.0}, "env": {"torch": "x", "device": "cpu", "git_commit": None},
}


def _rec(seed, acc, status="ok", row="bp", column="mnist"):
    r = copy.deepcopy(BASE)
    r.update(seed=seed, name=f"{row}-{column}-s{seed}", status=status, row=row, column=column)
    r["config"] = {"trainer": {"epochs": 2}, "data": {"subset": None}}
    r["metrics"] = {"final": {"test_acc": acc - 0.01}, "best": {"test_acc": acc},
                    "per_epoch": [{"epoch": 1, "test_acc": acc - 0.01}, {"epoch": 2, "test_acc": acc}]}
    return r


def _write_tables(tmp_path, combined: dict):
    """Write {paper: {table: spec + reported}} the way the repository keeps it: layouts in
    <specs>/<paper>/tables.yaml, the papers' numbers alone in reference.yaml. Returns the reference path."""
    ref = {}
    for paper, tables in combined.items():
        d = tmp_path / "specs" / paper
        d.mkdir(parents=True, exist_ok=True)
        layout = {t: {k: v for k, v in spec.items() if k not in ("reported", "source")} for t, spec in tables.items()}
        (d / "tables.yaml").write_text(yaml.safe_dump(layout))
        for t, spec in tables.items():
            if "reported" in spec:
                ref.setdefault(paper, {})[t] = {"reported": spec["reported"]}
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(ref))
    return path


def _render(recs, ref, out, **kw):
    return render_all(recs, ref, out, specs_dir=ref.parent / "specs", **kw)


@pytest.fixture
def layout(tmp_path):
    recs = tmp_path / "records"
    for i, acc in enumerate([0.96, 0.97, 0.98]):
        write_record(_rec(i, acc), recs / "p" / "t1" / f"s{i}.json")
    write_record(_rec(9, 0.5, status="diverged"), recs / "p" / "t1" / "div.json")
    ref = _write_tables(tmp_path, {"p": {"t1": {
        "title": "T", "metrics": ["test_acc"], "select": "best", "rows": ["bp", "fa"],
        "columns": ["mnist", "emnist"], "labels": {"bp": "baseline"},
        "reported": {"bp": {"mnist": [0.9763, 0.002], "emnist": [0.9022, 0.002]}, "fa": {"mnist": [0.9]}}}}})
    return recs, ref


def test_cells_are_mean_std_of_records_beside_the_paper(layout, tmp_path):
    recs, ref = layout
    (md,) = _render(recs, ref, tmp_path / "out", plots=False)
    text = md.read_text()
    # mean 0.97, sample std 0.01, n=3, beside the paper's 0.9763 and the difference
    assert "| baseline | mnist | test_acc | cpu | 0.9700 ± 0.0100 | 3 | 0.9763 ± 0.0020 | -0.0063 |" in text
    assert "1 run(s) diverged (excluded); 2 epochs |" in text  # how long the cell trained
    csv = (tmp_path / "out" / "p__t1.csv").read_text()
    assert "0.9700 ± 0.0100" in csv


def test_empty_cells_say_why_and_are_never_filled_from_the_paper(layout, tmp_path):
    """Why a cell is empty comes from the committed records (a skipped sweep job's 'unavailable' record),
    never from the filesystem of the machine that renders the table."""
    recs, ref = layout
    gone = _rec(0, 0.0, status="unavailable", column="emnist")
    gone["message"] = "dataset 'emnist' was not available where this sweep ran (not available offline)"
    gone["metrics"] = {"final": {}, "best": {}, "per_epoch": []}
    write_record(gone, recs / "p" / "t1" / "emnist.json")
    (md,) = _render(recs, ref, tmp_path / "out", plots=False)
    lines = md.read_text().splitlines()
    emnist = next(line for line in lines if "| baseline | emnist |" in line)
    assert "not available offline" in emnist and "0.9022" in emnist  # paper shown in the paper column only
    assert emnist.split("|")[5].strip().startswith("no records")
    fa = next(line for line in lines if "| fa | mnist |" in line)
    assert "not run yet" in fa and fa.split("|")[6].strip() == "0"


def test_records_round_trip_and_invalid_records_are_rejected(tmp_path):
    path = write_record(_rec(0, 0.9), tmp_path / "a" / "r.json")
    assert read_records(tmp_path) == [json.loads(path.read_text())]
    bad = _rec(0, 0.9)
    del bad["scale"]
    with pytest.raises(ValueError, match="scale"):
        validate(bad)
    with pytest.raises(ValueError, match="status"):
        write_record({**_rec(0, 0.9), "status": "maybe"}, tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()


def test_committed_records_are_valid_and_tables_render(tmp_path):
    """The committed results/ render without training (what `make tables` does)."""
    written = render_all("results/records", "results/reference.yaml", tmp_path, plots=False)
    assert any(p.name == "abstracted-gradients__table1.md" for p in written)


def test_reference_file_rejects_duplicate_blocks(tmp_path):
    from bpfree.tables import load_reference

    load_reference("results/reference.yaml")  # the committed file has no repeated paper/table
    dup = tmp_path / "ref.yaml"
    dup.write_text("p:\n  t1: {metrics: [a]}\np:\n  t2: {metrics: [b]}\n")
    with pytest.raises(ValueError, match="duplicate key 'p'"):
        load_reference(dup)


def test_borrowed_cells_relabel_another_tables_runs(tmp_path):
    # abstracted-gradients Table 4's n = 6 column is Table 2's runs (the same config): borrowed, not re-run
    recs = tmp_path / "records"
    write_record(_rec(0, 0.30, column="multi30k") | {"table": "t2"}, recs / "p" / "t2" / "a.json")
    write_record(_rec(0, 0.20, column="n3") | {"table": "t4"}, recs / "p" / "t4" / "b.json")
    ref = _write_tables(tmp_path, {"p": {
        "t2": {"metrics": ["test_acc"], "select": "best", "rows": ["bp"], "columns": ["multi30k"]},
        "t4": {"metrics": ["test_acc"], "select": "best", "rows": ["bp"], "columns": ["n6", "n3"],
               "borrow": [{"table": "t2", "columns": {"multi30k": "n6"}}]}}})
    out = _render(recs, ref, tmp_path / "out", plots=False)
    t4 = next(p for p in out if p.name == "p__t4.md").read_text()
    assert "| bp | n6 | test_acc | cpu | 0.3000 | 1 |" in t4 and "| bp | n3 | test_acc | cpu | 0.2000 | 1 |" in t4
    assert "2 run record(s) under" in t4 and "/p/t2/" in t4
    t2 = next(p for p in out if p.name == "p__t2.md").read_text()
    assert "| bp | multi30k | test_acc | cpu | 0.3000 | 1 |" in t2  # the lender's own table is unchanged


def test_a_borrow_may_take_only_some_rows(tmp_path):
    # abstracted-gradients table2_budget: the 4-epoch bp cell is Table 2's bp runs, not its other rows
    recs = tmp_path / "records"
    write_record(_rec(0, 0.30, column="multi30k") | {"table": "t2"}, recs / "p" / "t2" / "a.json")
    write_record(_rec(0, 0.25, row="fa", column="multi30k") | {"table": "t2"}, recs / "p" / "t2" / "fa.json")
    ref = _write_tables(tmp_path, {"p": {
        "t2": {"metrics": ["test_acc"], "select": "best", "rows": ["bp", "fa"], "columns": ["multi30k"]},
        "tb": {"metrics": ["test_acc"], "select": "best", "rows": ["bp"], "columns": ["e4", "e12"],
               "borrow": [{"table": "t2", "columns": {"multi30k": "e4"}, "rows": ["bp"]}]}}})
    out = _render(recs, ref, tmp_path / "out", plots=False)
    tb = next(p for p in out if p.name == "p__tb.md").read_text()
    assert "| bp | e4 | test_acc | cpu | 0.3000 | 1 |" in tb
    assert "| fa |" not in tb and "0.2500" not in tb


def test_cells_left_out_on_purpose_say_why(layout, tmp_path):
    recs, ref = layout
    specs = tmp_path / "specs" / "p" / "tables.yaml"
    spec = yaml.safe_load(specs.read_text())
    spec["t1"]["not_run"] = {"fa/emnist": "paper has no such cell", "fa": "needs a GPU"}
    specs.write_text(yaml.safe_dump(spec))
    (md,) = _render(recs, ref, tmp_path / "out", plots=False)
    cells = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[5].strip()
             for line in md.read_text().splitlines() if line.startswith("| ")}
    assert cells[("fa", "emnist")] == "no records: paper has no such cell"  # row/column beats row
    assert cells[("fa", "mnist")] == "no records: needs a GPU"
    assert cells[("baseline", "mnist")] == "0.9700 ± 0.0100"  # a cell with runs is never replaced


def test_reference_file_holds_only_the_papers_numbers(tmp_path):
    """Layout keys in the reference file, or numbers for a table no spec lays out, are refused by name."""
    from bpfree.tables import load_specs

    specs = load_specs("experiments", "results/reference.yaml")  # the committed pair is consistent
    assert specs["abstracted-gradients"]["table1"]["reported"]["bp"]["mnist"] == [0.9763, 0.002]
    ref = _write_tables(tmp_path, {"p": {"t1": {"metrics": ["test_acc"], "reported": {"bp": {"mnist": [0.9]}}}}})
    ref.write_text(yaml.safe_dump({"p": {"t1": {"rows": ["bp"], "reported": {}}}}))
    with pytest.raises(ValueError, match=r"\['rows'\].*tables.yaml"):
        load_specs(tmp_path / "specs", ref)
    ref.write_text(yaml.safe_dump({"p": {"t9": {"reported": {}}}}))
    with pytest.raises(ValueError, match="p/t9.*add its spec"):
        load_specs(tmp_path / "specs", ref)


def test_a_cell_keeps_one_record_per_seed_the_longest_trained(layout, tmp_path):
    recs, ref = layout
    again = _rec(0, 0.99)  # seed 0 again, trained longer (3 epochs): replaces the 2-epoch seed-0 run
    again["metrics"]["per_epoch"].append({"epoch": 3, "test_acc": 0.99})
    write_record(again, recs / "p" / "t1" / "s0-renamed.json")
    (md,) = _render(recs, ref, tmp_path / "out", plots=False)
    line = next(x for x in md.read_text().splitlines() if "| baseline | mnist |" in x)
    assert "| 0.9800 ± 0.0100 | 3 |" in line and "1 shorter or older run(s) of the same seed superseded" in line
