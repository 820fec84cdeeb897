"""The runner end to end on real MNIST: records, resume, divergence, CLI errors, multirun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bpfree.records import read_records, validate
from run import run
from tests.conftest import ROOT, data_root

SMALL = ["data.subset=1024", "data.test_subset=1000", "trainer.batch_size=64", "optim.lr=1e-3"]


def _metrics_without_timing(record):
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in record["metrics"]["per_epoch"]]


def test_short_run_writes_a_valid_record(compose_run, tmp_path):
    rec = run(compose_run([*SMALL, "trainer.epochs=2", "seed=3"]))
    path = tmp_path / "records" / "adhoc" / "adhoc" / "bp-mlp-mnist-paper-s3.json"  # the scale is in the name
    on_disk = validate(json.loads(path.read_text()))
    assert on_disk == json.loads(json.dumps(rec))
    assert on_disk["status"] == "ok" and on_disk["seed"] == 3 and on_disk["scale"] == "paper"
    assert (on_disk["method"], on_disk["model"], on_disk["dataset"]) == ("bp", "mlp", "mnist")
    epochs = on_disk["metrics"]["per_epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    acc = [e["test_acc"] for e in epochs]
    assert on_disk["metrics"]["best"]["test_acc"] == max(acc) and on_disk["metrics"]["final"]["test_acc"] == acc[-1]
    assert 0.6 < max(acc) <= 1.0, "test_acc is a fraction and 512 samples x 2 epochs must learn"
    assert on_disk["timing"]["samples_per_second"] > 0 and on_disk["env"]["torch"]
    assert on_disk["config"]["optim"]["lr"] == 1e-3  # the resolved config travels with the record
    assert not list(path.parent.glob("*.tmp")), "atomic write leaves no temp file"


def test_resumed_run_ends_with_the_same_record(compose_run, tmp_path):
    full = run(compose_run([*SMALL, "trainer.epochs=3", "checkpoint_dir=" + str(tmp_path / "a"),
                            "run_name=full"]))
    # interrupted after epoch 1 (a run that only got one epoch in), then resumed to 3
    run(compose_run([*SMALL, "trainer.epochs=1", "checkpoint_dir=" + str(tmp_path / "b"), "run_name=part"]))
    resumed = run(compose_run([*SMALL, "trainer.epochs=3", "trainer.resume=true",
                               "checkpoint_dir=" + str(tmp_path / "b"), "run_name=part"]))
    assert resumed["timing"]["resumed_from_epoch"] == 1
    assert _metrics_without_timing(resumed) == _metrics_without_timing(full)


def test_resume_refuses_a_checkpoint_from_another_config(compose_run, tmp_path):
    ck = "checkpoint_dir=" + str(tmp_path / "c")
    run(compose_run([*SMALL, "trainer.epochs=1", ck, "run_name=x"]))
    with pytest.raises(ValueError, match="trainer.resume=false"):
        # its own records_dir: the record guard (tests/test_reliability.py) would refuse first otherwise
        run(compose_run([*SMALL, "trainer.epochs=2", "trainer.resume=true", ck, "run_name=x", "optim.lr=3e-3",
                         f"records_dir={tmp_path / 'other'}"]))


def test_nan_loss_ends_as_diverged_record_not_a_crash(compose_run):
    rec = run(compose_run([*SMALL, "trainer.epochs=2", "optim.lr=1e30", "trainer.check_every=1"]))
    assert rec["status"] == "diverged" and "optim.lr" in rec["message"]
    assert rec["metrics"]["per_epoch"] == []


def _cli(args, tmp_path, env_extra=None):
    env = {**os.environ, "BPFREE_DATA": str(data_root()), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "run.py", *[a for a in args if a.startswith("-")], f"records_dir={tmp_path / 'rec'}",
         f"checkpoint_dir={tmp_path / 'ck'}", f"hydra.run.dir={tmp_path / 'out'}", f"hydra.sweep.dir={tmp_path / 'multi'}",
         *[a for a in args if not a.startswith("-")]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_unknown_method_exits_nonzero_listing_valid_options(tmp_path):
    p = _cli(["method=no_such_rule"], tmp_path)
    assert p.returncode != 0
    assert "no_such_rule" in p.stderr and "bp" in p.stderr  # hydra lists the available options


def test_missing_dataset_exits_nonzero_naming_path_and_fix(tmp_path):
    p = _cli(["dataset=emnist", f"data.root={tmp_path / 'nowhere'}"], tmp_path)
    assert p.returncode != 0
    assert str(tmp_path / "nowhere" / "EMNIST") in p.stderr and "BPFREE_DATA" in p.stderr
    assert "Traceback" not in p.stderr


def test_label_count_mismatch_is_a_clear_error(tmp_path):
    p = _cli(["dataset.num_classes=5", "data.subset=64"], tmp_path)
    assert p.returncode != 0 and "num_classes" in p.stderr and "Traceback" not in p.stderr


def test_multirun_sweep_writes_one_record_per_job_and_skips_missing_data(tmp_path):
    p = _cli(["-m", "seed=0,1", "dataset=mnist,emnist", "data.subset=128", "data.test_subset=500",
              "trainer.epochs=1", "trainer.progress=false"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    every = read_records(tmp_path / "rec")
    recs = [r for r in every if r["status"] == "ok"]
    assert sorted((r["dataset"], r["seed"]) for r in recs) == [("mnist", 0), ("mnist", 1)]
    # the skipped jobs leave records saying so (their table cells read the same on any machine)
    assert sorted((r["dataset"], r["seed"], r["status"]) for r in every if r["status"] != "ok") == [
        ("emnist", 0, "unavailable"), ("emnist", 1, "unavailable")]
    assert p.stderr.count("skipped: dataset 'emnist' not found") == 2
    assert recs[0]["metrics"]["per_epoch"] != recs[1]["metrics"]["per_epoch"]  # seeds differ
