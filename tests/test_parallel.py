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
    # for the same reason it reports no task `loss` (eq. 8), only `local_loss`, the local objectives' sum
    assert curve(thr, drop=("train_local_loss",)) == curve(seq, drop=("train_acc", "train_loss"))
    assert "train_acc" not in thr["metrics"]["final"] and "train_loss" not in thr["metrics"]["final"]
    per_thr, per_seq = thr["metrics"]["per_epoch"][-1], seq["metrics"]["per_epoch"][-1]
    assert per_thr["train_local_loss"] >= per_thr["train_assoc1"] + per_thr["train_ae1"]  # a sum of objectives
    assert per_thr["train_local_loss"] != per_seq["train_loss"]  # ... which is not the task loss
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


# ---- the synthetic-gradient family and local_supervised (bpfree/rules/synthetic.py: stage_defs)
SG = ["model=mlp_depth", "model.depth=3", "model.width=32", "data.subset=640", "data.test_subset=300",
      "trainer.epochs=2", "trainer.batch_size=64", "optim=adam", "optim.lr=1e-3", "trainer.num_threads=1",
      "trainer.check_every=4"]  # a staged epoch passes the loop's NaN check and progress bar


def _sg(compose_run, tmp_path, name, method, extra):
    import torch as t

    rec = run(compose_run([*SG, *method, f"run_name={name}", f"checkpoint_dir={tmp_path / name}", *extra]))
    return rec, t.load(tmp_path / name / "last.pt", weights_only=False)["rule"]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _curve(r, drop=("sg_staleness",)):
    return [{k: v for k, v in e.items() if "seconds" not in k and not k.startswith(tuple(f"train_{d}" for d in drop))}
            for e in r["metrics"]["per_epoch"]]


@pytest.mark.parametrize("method", [
    ["method=sg_linear", "method.split=[l1,l2]", "method.alpha_gs=1.0"],         # bp carried inside stage 2
    ["method=sg_linear", "method.split=[l1,l2]", "method.target=bootstrap"],
    ["method=vfbn", "method.split=l2"],
], ids=["sg_linear-bp", "sg_linear-bootstrap", "vfbn"])
def test_synthetic_gradients_staged(compose_run, tmp_path, method):
    """Staleness 0 in order reproduces the rule's synchronous train_step bit for bit (same weights, same
    per-epoch metrics); staleness 1 (the synthesizer's target one step late) gives the same weights
    whether the stages overlap in threads or run in order (the delay is fixed, not timing-dependent),
    differs from the synchronous weights, and the record says the staleness."""
    plain, w_plain = _sg(compose_run, tmp_path, "plain", method, [])
    seq0, w_seq0 = _sg(compose_run, tmp_path, "seq0", method, ["trainer.parallel=sequential"])
    _same(w_plain, w_seq0)
    assert _curve(plain) == _curve(seq0)
    thr, w_thr = _sg(compose_run, tmp_path, "thr", method, ["trainer.parallel=threads"])  # staleness 1
    seq1, w_seq1 = _sg(compose_run, tmp_path, "seq1", method, ["trainer.parallel=sequential", "trainer.staleness=1"])
    _same(w_thr, w_seq1)
    assert _curve(thr, drop=()) == _curve(seq1, drop=())
    assert any(not torch.equal(w_plain[k], w_thr[k]) for k in w_plain if k.startswith("synths"))
    stale = {k: v for k, v in thr["metrics"]["final"].items() if k.startswith("train_sg_staleness_steps/")}
    assert stale and set(stale.values()) == {1.0}, thr["metrics"]["final"]
    assert set(v for k, v in seq0["metrics"]["final"].items() if "staleness" in k) == {0.0}


def test_local_supervised_staged_equals_its_train_step(compose_run, tmp_path):
    """local_supervised's stages exchange forward messages only (each head learns from the labels at its
    split): sequential, threads and processes give the weights and metrics of its own train_step, bit for bit."""
    m = ["method=local_supervised", "method.split=[l1,l2]"]
    plain, w_plain = _sg(compose_run, tmp_path, "plain", m, [])
    seq, w_seq = _sg(compose_run, tmp_path, "seq", m, ["trainer.parallel=sequential"])
    thr, w_thr = _sg(compose_run, tmp_path, "thr", m, ["trainer.parallel=threads", "trainer.stages=3"])
    proc, w_proc = _sg(compose_run, tmp_path, "proc", m, ["trainer.parallel=processes"])
    _same(w_plain, w_seq)
    _same(w_plain, w_thr)
    _same(w_plain, w_proc)
    assert _curve(plain) == _curve(seq) == _curve(thr) == _curve(proc)
    with pytest.raises(CannotStage, match="predict_from=split"):
        run(compose_run([*SG, "method=bottom_half_bp", "method.split=l1", "trainer.parallel=threads"]))


def test_bp_targets_cannot_chain_through_a_late_middle_stage(compose_run):
    with pytest.raises(CannotStage, match="method.target=bootstrap"):  # the delays would add up
        run(compose_run([*SG, "method=sg_linear", "method.split=[l1,l2]", "trainer.parallel=threads",
                         "trainer.stages=3", "trainer.epochs=1"]))


MLP = ("mlp_depth", dict(depth=3, width=24, activation="relu", init="default"))
# maps: a 2-conv CNN (c1: 4 x 14 x 14, c2: 4 x 7 x 7), for the synthesizers with BatchNorm
CNN = ("cnn", dict(channels=[4, 4], fc=[16], pool_after=[1, 2], downsample="stride", activation="relu",
                   init="default"))


def _engine_weights(rule_kw, groups, backend, staleness, steps=12, seed=0, model_kw=MLP, batch=32):
    """A tiny SplitRule on real MNIST batches through the Engine with a chosen partition (or, groups=None,
    through the rule's own train_step), for partitions the cost balancing would not pick."""
    import copy

    import torch.nn.functional as F

    from bpfree.data import batches, load_dataset
    from bpfree.models import build_model
    from bpfree.parallel import Engine, StagedOptimizers
    from bpfree.rules import build_rule
    from tests.conftest import CACHE, data_root

    torch.manual_seed(seed)
    data = load_dataset("mnist", root=str(data_root()), cache_dir=str(CACHE), download=False, subset=steps * batch,
                        test_subset=10, val_split=None)
    model = build_model(model_kw[0], (1, 28, 28), 10, **model_kw[1])
    rule = build_rule(*rule_kw[:1], copy.deepcopy(model), lambda o, y: F.nll_loss(o, y), **rule_kw[1])
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    chosen = list(batches(data.train, batch, shuffle=True, seed=0, epoch=0))
    if groups is None:
        for x, y in chosen:
            rule.train_step(x, y, opt)
    else:
        stages = rule.stage_defs(len(groups), None, concurrent=backend == "threads", groups=groups)
        Engine(stages, StagedOptimizers(opt, stages), backend, staleness=staleness).run_epoch(
            (x, None, y) for x, y in chosen)
    return rule.state_dict()


SGK = dict(context=True, kernel=1, zero_init=True, alpha_gs=1.0)


@pytest.mark.parametrize("target,groups", [("bp", [[0, 1], [2, 3]]), ("bootstrap", [[0], [1, 2], [3]])],
                         ids=["bp-carried-inside-the-lower-stage", "bootstrap-3-stages"])
def test_synthetic_gradient_partitions(target, groups):
    """Partitions with inner splits in a lower stage (bp: the late target is carried down through it) and a
    middle stage (bootstrap: it sends its own input gradient down): staleness 0 in order = train_step, bit
    for bit; staleness 1 threads = staleness 1 in order; staleness 2 differs from staleness 1."""
    kw = ("sg_linear", dict(split=["l1", "l2", "l3"], target=target, **SGK))
    plain = _engine_weights(kw, None, None, None)
    _same(plain, _engine_weights(kw, groups, "sequential", 0))
    thr1 = _engine_weights(kw, groups, "threads", 1)
    _same(thr1, _engine_weights(kw, groups, "sequential", 1))
    thr2 = _engine_weights(kw, groups, "threads", 2)
    assert any(not torch.equal(thr1[k], thr2[k]) for k in thr1)
    assert any(not torch.equal(plain[k], thr1[k]) for k in plain)


@pytest.mark.parametrize("rule_kw", [
    ("sg_resnet", dict(split="c1", target="bp", context=True, width=8, zero_init=True, alpha_gs=1.0)),
    ("vfbn", dict(split="c1", target="bp", alpha_gs=1.0, hidden=[])),
], ids=["sg_resnet", "vfbn"])
def test_late_targets_on_maps_count_each_batch_once_in_batchnorm(rule_kw):
    """Synthesizers with BatchNorm (sg_resnet's, VFBN's virtual network on maps): a target one step late
    recomputes delta_hat on the stored h with the BN statistics frozen, so they count each batch once, as
    the synchronous rule's; threads = sequential at staleness 1; staleness 0 in order = train_step."""
    steps = 4
    kw = dict(steps=steps, model_kw=CNN, batch=16)
    plain = _engine_weights(rule_kw, None, None, None, **kw)
    _same(plain, _engine_weights(rule_kw, [[0], [1]], "sequential", 0, **kw))
    thr = _engine_weights(rule_kw, [[0], [1]], "threads", 1, **kw)
    _same(thr, _engine_weights(rule_kw, [[0], [1]], "sequential", 1, **kw))
    counts = {k: int(v) for k, v in thr.items() if k.startswith("synths") and k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {steps}, counts
    stats = [k for k in thr if k.startswith("synths") and k.endswith("running_mean")]
    assert any(not torch.equal(plain[k], thr[k]) for k in stats)  # the late targets did train differently


@pytest.mark.slow  # loads cifar10_jpeg (~15 s)
def test_measuring_stage_costs_leaves_the_random_stream_alone():
    """build_engine times the stages on a training batch; the ResNet's random training views draw from
    torch's generator, so without care a staged run would see other crops than its synchronous twin."""
    import torch.nn.functional as F

    from bpfree.data import load_dataset
    from bpfree.models import build_model
    from bpfree.parallel import build_engine
    from bpfree.rules import build_rule
    from tests.conftest import CACHE, data_root

    data = load_dataset("cifar10_jpeg", root=str(data_root()), cache_dir=str(CACHE), subset=8, test_subset=8)
    model = build_model("resnet14_vfbn", (3, 32, 32), 10)  # train_views: vfbn (random crops and flips)
    rule = build_rule("local_supervised", model, lambda o, y: F.nll_loss(o, y), split="s2b1")
    before = torch.get_rng_state()
    build_engine(rule, torch.optim.SGD(rule.parameters(), lr=0.1), "sequential", 2, (data.train.x, data.train.y))
    assert torch.equal(before, torch.get_rng_state())


def _openmp():
    """The OpenMP runtime torch loaded (ctypes), or None: torch.get_num_threads() cannot show a thread's own
    OpenMP setting, which is what its kernels use."""
    import ctypes
    import os

    try:
        maps = open("/proc/self/maps").read().split()
    except OSError:
        return None
    libs = sorted({p for p in maps if "libgomp" in p or "libiomp" in p})
    # other packages (scikit-learn) bring their own copy; torch's kernels use the one under torch/
    libs = [p for p in libs if p.startswith(os.path.dirname(torch.__file__))] or libs
    return ctypes.CDLL(libs[0]) if libs else None


def test_stage_threads_compute_at_the_callers_intra_op_thread_count():
    """torch's intra-op thread count is per thread in OpenMP: a new thread starts at the machine default,
    not at trainer.num_threads, even after torch ops. A stage thread must adopt the caller's; without that,
    threads and sequential schedules stopped giving the same weights bit for bit on a loaded machine."""
    import os

    from torch import nn

    from bpfree.parallel import Engine, StageDef, StagedOptimizers

    omp = _openmp()
    if omp is None:
        pytest.skip("no OpenMP runtime loaded by torch in this process")
    seen: list[int] = []
    lin = nn.Linear(2, 2)

    def forward_backward(inputs):
        seen.append(omp.omp_get_max_threads())
        return inputs, {}

    stages = [StageDef([lin.weight], forward_backward, "a"), StageDef([lin.bias], forward_backward, "b")]
    engine = Engine(stages, StagedOptimizers(torch.optim.SGD(lin.parameters(), lr=0.0), stages), "threads")
    before, wanted = torch.get_num_threads(), (os.cpu_count() or 1) + 1  # never a new thread's default
    try:
        torch.set_num_threads(wanted)
        engine.run_epoch([(torch.zeros(1, 2),)] * 3)
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 6 and set(seen) == {wanted}, seen
