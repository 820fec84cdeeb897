"""trainer.parallel=processes (bpfree/distributed.py): one process per stage over torch.distributed (gloo
here), spawned by run.py or launched by torchrun. For AL a pipelined epoch computes what the sequential one
does, so the weights and the records must be equal (tolerance: none; the same float ops run in the same
order, one intra-op thread each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpfree.parallel import CannotStage
from run import run
from tests.conftest import CACHE, ROOT, data_root

# AL's MNIST MLP at a tenth of its width, folded into 2 components: 11 steps of 64 and a last one of 36
# per epoch (the short batch travels with its own header)
AL = ["method=al", "model=mlp1024", "model.hidden=[48,48,160,48,48]", "data.subset=740", "data.test_subset=300",
      "trainer.epochs=2", "trainer.batch_size=64", "optim.lr=1e-3", "trainer.num_threads=1"]
PROC = ["trainer.parallel=processes", "trainer.stages=2"]


def _run(compose_run, tmp_path, name, extra):
    rec = run(compose_run([*AL, f"run_name={name}", f"checkpoint_dir={tmp_path / name}", *extra]))
    return rec, torch.load(tmp_path / name / "last.pt", weights_only=False)["rule"]


def _curve(rec, drop=("train_acc", "train_loss", "train_local_loss")):
    # eq. 8 decodes through every component, and a stage process holds only its own up to date: like the
    # threads backend, the processes backend leaves out AL's training-batch accuracy and task loss, and
    # reports `local_loss`, the sum of the local objectives, instead (al's stage_defs, concurrent)
    return [{k: v for k, v in e.items() if "seconds" not in k and k not in drop} for e in rec["metrics"]["per_epoch"]]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_processes_al_equals_sequential_al_and_resumes(compose_run, tmp_path):
    """2 stage processes (spawned, gloo) vs the same stages in order: identical weights and per-epoch metrics;
    1 epoch then a resume to 2 ends on the same weights as 2 straight epochs."""
    seq, w_seq = _run(compose_run, tmp_path, "seq", ["trainer.parallel=sequential", "trainer.stages=2"])
    thr, _ = _run(compose_run, tmp_path, "thr", ["trainer.parallel=threads", "trainer.stages=2"])
    proc, w_proc = _run(compose_run, tmp_path, "proc", PROC)
    _same(w_seq, w_proc)
    assert _curve(proc) == _curve(seq) and "train_acc" not in proc["metrics"]["final"]
    assert _curve(proc, drop=()) == _curve(thr, drop=())  # the other concurrent schedule: every metric
    par = proc["timing"]["parallel"]
    assert {k: par[k] for k in ("backend", "stages", "world_size", "parts", "dist_backend")} == {
        "backend": "processes", "stages": 2, "world_size": 2, "parts": [[0], [1]], "dist_backend": "gloo"}
    assert len(par["peak_mb_per_stage"]) == 2 and all(b > 0 for b in par["last_epoch_stage_busy_s"])
    assert proc["config"]["trainer"]["parallel"] == "processes"

    extra = [*PROC, f"records_dir={tmp_path / 'r2'}"]
    run(compose_run([*AL, "run_name=part", f"checkpoint_dir={tmp_path / 'part'}", "trainer.epochs=1", *extra]))
    res, w_res = _run(compose_run, tmp_path, "part", [*extra, "trainer.resume=true"])
    assert res["timing"]["resumed_from_epoch"] == 1
    _same(w_seq, w_res)
    assert _curve(res, drop=()) == _curve(proc, drop=())


def test_processes_refuse_what_cannot_run(compose_run, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(CannotStage, match="dist_backend=nccl needs CUDA"):
            run(compose_run([*AL, *PROC, "trainer.dist_backend=nccl"]))
    # under torchrun the world size is torchrun's: it must be one process per stage
    with monkeypatch.context() as m:
        for k, v in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
            m.setenv(k, v)
        with pytest.raises(CannotStage, match="torchrun started 3 processes .* trainer.stages=2"):
            run(compose_run([*AL, *PROC]))
    # refused on rank 0 once the stage processes are up; they are ended, rank 0's error is the one raised
    with pytest.raises(CannotStage, match="trainer.stages=3 but the rule has 2"):
        run(compose_run([*AL, "trainer.parallel=processes", "trainer.stages=3"]))
    with pytest.raises(CannotStage, match="has no stages"):
        run(compose_run(["data.subset=64", "trainer.epochs=1", "trainer.parallel=processes", "trainer.stages=1"]))


def test_torchrun_world_size_2(compose_run, tmp_path):
    """The same run launched by torchrun (--standalone, 2 processes on this machine: its rendezvous, env://)
    joins torchrun's group instead of spawning, and ends on the sequential run's weights."""
    _, w_seq = _run(compose_run, tmp_path, "seq", ["trainer.parallel=sequential", "trainer.stages=2"])
    env = {**os.environ, "BPFREE_DATA": str(data_root()), "BPFREE_CACHE": str(CACHE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "run.py", *AL, *PROC,
           "run_name=tr", f"records_dir={tmp_path / 'records'}", f"checkpoint_dir={tmp_path / 'tr'}",
           "trainer.progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _same(w_seq, torch.load(tmp_path / "tr" / "last.pt", weights_only=False)["rule"])
    records = list(Path(tmp_path / "records").rglob("tr.json"))
    assert len(records) == 1  # rank 1 serves its stage and writes nothing
    assert json.loads(records[0].read_text())["timing"]["parallel"]["world_size"] == 2


@pytest.mark.slow
def test_three_stage_processes_pass_messages_through_a_middle_rank(compose_run, tmp_path):
    """AL folded into 3 components on 3 processes: rank 1 receives from rank 0 and sends on to rank 2."""
    three = ["model.hidden=[48,48,48,160,48,48,48]", "data.subset=300", "trainer.epochs=1", "trainer.stages=3"]
    seq, w_seq = _run(compose_run, tmp_path, "seq3", [*three, "trainer.parallel=sequential"])
    proc, w_proc = _run(compose_run, tmp_path, "proc3", [*three, "trainer.parallel=processes"])
    assert proc["timing"]["parallel"]["world_size"] == 3 and proc["timing"]["parallel"]["parts"] == [[0], [1], [2]]
    _same(w_seq, w_proc)
    assert _curve(proc) == _curve(seq)


# ---- stages with backward messages (synthetic gradients: StageDef.send_back / receive_back, trainer.staleness)
SG = ["model=mlp_depth", "model.depth=3", "model.width=32", "data.subset=620", "data.test_subset=300",
      "trainer.epochs=2", "trainer.batch_size=64", "optim=adam", "optim.lr=1e-3", "trainer.num_threads=1",
      "trainer.check_every=4"]


def _staged_sg_rules() -> bool:
    from bpfree.registry import RULES

    return "sg_linear" in RULES and hasattr(RULES.get("sg_linear"), "stage_defs")


@pytest.mark.parametrize("method, stages", [
    pytest.param(["method=sg_linear", "method.split=[l1,l2]", "method.target=bootstrap"], 3,  # a middle rank
                 marks=pytest.mark.slow),                                                   # sends down too
    (["method=vfbn", "method.split=l2"], 2),
], ids=["sg_linear-bootstrap-3", "vfbn-2"])
def test_processes_carry_backward_messages_with_the_same_staleness(compose_run, tmp_path, method, stages):
    """Each stage's synthesizer learns from the true gradient the stage above sends down (rank k+1 -> k). At
    staleness 1 (the processes default) the weights and per-epoch metrics equal the sequential schedule's at
    staleness 1 (the delay is fixed, not timing-dependent); at staleness 0 they equal the rule's synchronous
    train_step (lock-step)."""
    import bpfree.rules  # noqa: F401 - fills RULES

    if not _staged_sg_rules():
        pytest.skip("the synthetic-gradient rules declare no stages on this branch (bpfree/rules/synthetic.py)")
    k = [f"trainer.stages={stages}"]

    def go(name, extra):
        rec = run(compose_run([*SG, *method, *k, f"run_name={name}", f"checkpoint_dir={tmp_path / name}", *extra]))
        return rec, torch.load(tmp_path / name / "last.pt", weights_only=False)["rule"]

    def curve(rec):
        return [{k: v for k, v in e.items() if "seconds" not in k} for e in rec["metrics"]["per_epoch"]]

    seq1, w_seq1 = go("seq1", ["trainer.parallel=sequential", "trainer.staleness=1"])
    proc1, w_proc1 = go("proc1", ["trainer.parallel=processes"])
    _same(w_seq1, w_proc1)
    assert curve(proc1) == curve(seq1)
    assert {v for kk, v in proc1["metrics"]["final"].items() if kk.startswith("train_sg_staleness_steps/")} == {1.0}
    plain, w_plain = go("plain", [])
    proc0, w_proc0 = go("proc0", ["trainer.parallel=processes", "trainer.staleness=0"])
    _same(w_plain, w_proc0)
