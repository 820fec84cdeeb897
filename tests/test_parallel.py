"""Depth-parallel training (bpfree/parallel.py): a pipelined epoch of a rule whose stages exchange only
forward messages computes exactly what the sequential one does."""
from __future__ import annotations

import pytest
import torch

from bpfree.parallel import CannotStage, balance
from run import run

AL = ["method=al", "model=mlp1024", "model.hidden=[48,48,160,48,48]", "data.subset=768", "data.test_subset=300",
      "trainer.epochs=2", "trainer.batch_size=64", "optim.lr=1e-3", "trainer.num_threads=1"]


def _weights(compose_run, tmp_path, name, extra):
    import torch as t

    rec = run(compose_run([*AL, f"run_name={name}", f"checkpoint_dir={tmp_path / name}", *extra]))
    state = t.load(tmp_path / name / "last.pt", weights_only=False)["rule"]
    return rec, state


def test_pipelined_al_equals_sequential_al_bit_for_bit(compose_run, tmp_path):
    """Threads (2 stages, bounded queues) vs the same stages in order vs AL's own one-optimizer step:
    identical weights and identical per-epoch metrics (tolerance: none; the same float ops run)."""
    plain, w_plain = _weights(compose_run, tmp_path, "plain", [])
    seq, w_seq = _weights(compose_run, tmp_path, "seq", ["trainer.parallel=sequential", "trainer.stages=2"])
    thr, w_thr = _weights(compose_run, tmp_path, "thr", ["trainer.parallel=threads", "trainer.stages=2"])
    assert w_plain.keys() == w_seq.keys() == w_thr.keys()
    for k in w_plain:
        assert torch.equal(w_plain[k], w_seq[k]), k
        assert torch.equal(w_seq[k], w_thr[k]), k

    def curve(r, drop=()):
        return [{k: v for k, v in e.items() if "seconds" not in k and k not in drop} for e in r["metrics"]["per_epoch"]]
    assert curve(plain) == curve(seq)
    # concurrently, AL's training-batch accuracy would decode through decoders other stages are moving:
    # the threads backend leaves it out rather than report a timing-dependent figure (bpfree/parallel.py);
    # for the same reason its `loss` is the sum of the local objectives, not eq. 8's task loss (al's stage_defs)
    assert curve(thr, drop=("train_loss",)) == curve(seq, drop=("train_acc", "train_loss"))
    assert "train_acc" not in thr["metrics"]["final"]
    assert thr["config"]["trainer"]["parallel"] == "threads"


def test_staged_run_resumes_to_the_same_weights(compose_run, tmp_path):
    full, w_full = _weights(compose_run, tmp_path, "full", ["trainer.parallel=threads"])
    extra = ["trainer.parallel=threads", f"records_dir={tmp_path / 'r2'}"]
    run(compose_run([*AL, "run_name=part", f"checkpoint_dir={tmp_path / 'part'}", "trainer.epochs=1", *extra]))
    _, w_res = _weights(compose_run, tmp_path, "part", [*extra, "trainer.resume=true"])
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_stages_are_balanced_by_cost_and_bad_requests_are_refused(compose_run):
    assert balance([5.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3]]  # by cost, not by count
    assert balance([1.0, 1.0, 1.0, 1.0], 2) == [[0, 1], [2, 3]]
    with pytest.raises(CannotStage, match="trainer.stages=3 but the rule has 2"):
        run(compose_run([*AL, "trainer.parallel=threads", "trainer.stages=3"]))
    with pytest.raises(CannotStage, match="bp.*no stages|Backprop.*no stages|has no stages"):
        run(compose_run(["trainer.parallel=threads", "data.subset=64", "trainer.epochs=1"]))
