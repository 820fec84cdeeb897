"""Associated learning (method=al): the properties the paper's claims and the pipelining plan rest on."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bpfree.data import load_dataset
from bpfree.models import build_model
from bpfree.rules import UnsupportedModel, build_rule

CONF = str(Path(__file__).resolve().parents[1] / "conf")
DATA = os.environ.get("BPFREE_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def small_mlp_al(components=None, seed=0):
    """784 -> 32 -> 32 -> 64 -> 32 -> 32 -> 10: two components, 2-layer top bridge (the paper's shape, shrunk)."""
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 28, 28), 10, hidden=[32, 32, 64, 32, 32], init="he_normal")
    return build_rule("al", model, F.nll_loss, components=components)


def small_cnn_al():
    torch.manual_seed(0)
    model = build_model("cnn", (3, 16, 16), 10, channels=[4, 4, 8, 8], fc=[24, 12, 12, 12],
                        pool_after=[2, 4], downsample="stride")
    return build_rule("al", model, F.nll_loss, components=[["c1"], ["c2"], ["c3"], ["c4"]])


def chained_local_losses(rule, x, y):
    """The per-component losses exactly as train_step chains them (outputs of i feed i+1)."""
    s, t, losses = rule._entry(x), rule._targets(y), []
    for i in range(1, len(rule.fold) + 1):
        assoc, ae, s, t, _ = rule.local_objective(i, s, t)
        losses.append(assoc + ae)
    return losses


@pytest.mark.parametrize("make, shape", [(small_mlp_al, (1, 28, 28)), (small_cnn_al, (3, 16, 16))])
def test_no_gradient_crosses_a_component_boundary(make, shape):
    rule = make()
    torch.manual_seed(1)
    x, y = torch.randn(6, *shape), torch.randint(0, 10, (6,))
    losses = chained_local_losses(rule, x, y)
    params = list(rule.parameters())
    L = len(rule.fold)
    for i, loss in enumerate(losses, start=1):
        own = {id(p) for p in rule.component_parameters(i)}
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if id(p) in own:
                continue
            assert g is None or torch.count_nonzero(g) == 0, f"component {i}'s loss reaches a foreign parameter"
        own_grads = [g for p, g in zip(params, grads) if id(p) in own and g is not None]
        assert sum(float(g.abs().sum()) for g in own_grads) > 0, f"component {i} gets no gradient at all"
    # the components partition the rule's parameters: nothing trained by nobody, nothing shared
    ids = [id(p) for i in range(1, L + 1) for p in rule.component_parameters(i)]
    assert len(ids) == len(set(ids)) == len(params)


def test_train_step_gradient_equals_each_components_own_gradient():
    """One backward of the summed objective = every component's backward of its own loss alone."""
    rule = small_mlp_al()
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    total = sum(chained_local_losses(rule, x, y))
    total.backward()
    for i in range(1, len(rule.fold) + 1):
        own = rule.component_parameters(i)
        local = chained_local_losses(rule, x, y)[i - 1]
        expected = torch.autograd.grad(local, own)
        for p, g in zip(own, expected):
            torch.testing.assert_close(p.grad, g)


def test_inference_is_eq8_composition_by_hand():
    rule = small_mlp_al().eval()
    b = rule.model.blocks
    lin = lambda blk, z: blk[0](z)  # noqa: E731  the Linear of a Linear+activation block
    x = torch.randn(7, 1, 28, 28)
    z = x.flatten(1)
    s1 = F.elu(lin(b.l1, z))                          # f_1
    s2 = F.elu(lin(b.l2, s1))                         # f_2
    t2 = torch.sigmoid(lin(b.l4, torch.sigmoid(lin(b.l3, s2))))  # b_2 (2-layer top bridge)
    t1 = torch.sigmoid(lin(b.l5, t2))                 # h_2
    y_hat = torch.sigmoid(lin(b.l6, t1))              # h_1
    with torch.no_grad():
        got = rule.predict(x)
    torch.testing.assert_close(got, torch.log(y_hat / y_hat.sum(1, keepdim=True)).detach())
    assert rule.fold == [["l1"], ["l2"]] and rule.top_bridge == ["l3", "l4"] and rule.decoders == ["l6", "l5"]


def test_al_lowers_every_local_loss_on_a_fixed_mnist_batch():
    data = load_dataset("mnist", DATA, os.environ.get("BPFREE_CACHE", ".cache/bpfree"), subset=128)
    x, y = data.train.x, data.train.y
    rule = small_mlp_al(seed=3)
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    with torch.no_grad():
        before = [float(v) for v in chained_local_losses(rule, x, y)]
    for _ in range(40):
        rule.train_step(x, y, opt)
    with torch.no_grad():
        after = [float(v) for v in chained_local_losses(rule, x, y)]
    for i, (a, b) in enumerate(zip(before, after), start=1):
        assert b < 0.7 * a, f"component {i}: local loss {a:.4f} -> {b:.4f}"


def test_stepping_one_component_moves_only_its_parameters():
    rule = small_cnn_al()
    opt = torch.optim.Adam(rule.parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in rule.parameters()]
    times = rule.component_step_times(x, y, opt, repeats=1)
    assert len(times) == len(rule.fold) and all(t > 0 for t in times)
    # every component was stepped on its own: all parameters moved, each by its own component's step
    moved = [not torch.equal(a, p) for a, p in zip(before, rule.parameters())]
    assert all(moved)
    s, t = rule._entry(x), rule._targets(y)
    assoc, ae, *_ = rule.local_objective(1, s, t)
    snap = [p.detach().clone() for p in rule.parameters()]
    opt.zero_grad(set_to_none=True)
    (assoc + ae).backward()
    opt.step()
    own = {id(p) for p in rule.component_parameters(1)}
    for a, p in zip(snap, rule.parameters()):
        assert torch.equal(a, p) != (id(p) in own)


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def _build(c):
    kw = {k: v for k, v in c["model"].items() if k != "name"}
    model = build_model(c["model"]["name"], c["dataset"]["input_shape"], c["dataset"]["num_classes"], **kw)
    mkw = {k: v for k, v in c["method"].items() if k != "name"}
    return build_rule(c["method"]["name"], model, F.nll_loss, **mkw)


@pytest.mark.parametrize("model", ["mlp1024", "cnn", "vgg", "resnet20fc", "resnet32fc"])
def test_al_and_its_bp_baseline_have_identical_parameter_counts(model):
    ds = "mnist" if model == "mlp1024" else "cifar10_jpeg"
    # bridge_pool only shrinks the affiliated (training-only) bridges so the test stays light
    al = _build(_compose("method=al", f"model={model}", f"dataset={ds}", "method.bridge_pool=2"))
    bp = _build(_compose("method=bp", f"model={model}", f"dataset={ds}"))
    counts = al.param_counts()
    assert counts["effective"] == bp.param_counts()["total"]
    assert counts["total"] == counts["effective"] + counts["affiliated"] > counts["effective"]
    assert sum(v for k, v in counts.items() if k.startswith("component")) == counts["total"]


def test_al_on_a_resnet_without_fc_layers_says_what_it_needs():
    with pytest.raises(UnsupportedModel, match="resnet20fc"):
        _build(_compose("method=al", "model=resnet20", "dataset=cifar10_jpeg", "model.fc=[]"))
    with pytest.raises(UnsupportedModel, match="method.components"):  # conv blocks: no guessing
        _build(_compose("method=al", "model=resnet20", "dataset=cifar10_jpeg", "method.components=null"))


def test_al_on_plain_resnet20_gets_the_fc_stack_of_its_bp_twin():
    al = _build(_compose("method=al", "model=resnet20", "dataset=cifar10_jpeg", "method.bridge_pool=2"))
    bp = _build(_compose("method=bp", "model=resnet20fc", "dataset=cifar10_jpeg"))
    assert al.param_counts()["effective"] == bp.param_counts()["total"]


def test_paper_mlp_folds_as_section_5_2():
    rule = _build(_compose("method=al", "model=mlp1024", "dataset=mnist"))
    assert rule.fold == [["l1"], ["l2"]] and rule.top_bridge == ["l3", "l4"]
    assert rule.t_widths == [10, 1024, 1024]
    assert rule.model.blocks.l3[0].out_features == 5120  # the top bridge's 5120 neurons


def _fake_cifar100(root: Path, n_train=40, n_test=20):
    """Tiny files in CIFAR-100's real python-pickle format (the real dataset is not available offline)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        blob = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": list(rng.integers(0, 100, n)), b"coarse_labels": [0] * n}
        with open(d / split, "wb") as f:
            pickle.dump(blob, f)


@pytest.mark.parametrize("model", ["mlp1024", "cnn"])
def test_cifar100_configs_compose_and_train_on_generated_files(tmp_path, model):
    _fake_cifar100(tmp_path)
    c = _compose("method=al", f"model={model}", "dataset=cifar100", f"data.root={tmp_path}",
                 "method.bridge_pool=2", "experiment=al_table4")
    assert c["paper"] == "associated-learning" and c["table"] == "table4"
    data = load_dataset("cifar100", str(tmp_path), str(tmp_path / "cache"))
    rule = _build(c)
    assert rule.t_widths[0] == 100
    opt = torch.optim.Adam(rule.parameters(), lr=1e-4)
    out = rule.train_step(data.train.x[:8], data.train.y[:8], opt)
    assert torch.isfinite(out["loss"])
    assert rule.predict(data.test.x).shape == (20, 100)


def test_class_distances_match_their_definition():
    class_distances = _figures().class_distances

    # two classes, two points each: class 0 at (0,0),(0,2); class 1 at (10,0),(10,2)
    z = np.array([[0, 0], [0, 2], [10, 0], [10, 2]], dtype=float)
    d = class_distances(z, np.array([0, 0, 1, 1]))
    assert d["inter"] == pytest.approx(10.0)   # centroids (0,1) and (10,1)
    assert d["intra"] == pytest.approx(2.0)    # mean pairwise distance inside each class
    assert d["ratio"] == pytest.approx(5.0)


def test_table7_describes_the_networks_table3_shows(tmp_path):
    """figures.py --table3 MODEL extracts, per method, the run Table 3 keeps for the seed (the longest),
    so Table 7's distances belong to the same networks as the accuracies beside them; Table 7 has BP and
    AL rows only, and other models and seeds are left alone."""
    from bpfree.records import write_record
    from tests.test_tables import _rec

    def rec(method, model, seed, epochs, name):
        r = _rec(seed, 0.5, row=model, column=method)
        r.update(paper="associated-learning", table="table3", method=method, model=model, name=name)
        r["metrics"]["per_epoch"] = [{"epoch": e + 1, "test_acc": 0.5} for e in range(epochs)]
        return write_record(r, tmp_path / "associated-learning" / "table3" / f"{name}.json")

    long_bp, _, long_al = rec("bp", "cnn", 0, 20, "bp-new"), rec("bp", "cnn", 0, 3, "bp-old"), rec("al", "cnn", 0, 20, "al-new")
    rec("al", "cnn", 0, 3, "al-old"), rec("dtp", "cnn", 0, 50, "dtp"), rec("bp", "cnn", 1, 30, "bp-s1")
    rec("bp", "mlp", 0, 60, "bp-mlp")
    assert sorted(_figures().shown_in_table3("cnn", 0, tmp_path)) == sorted([long_bp, long_al])
    with pytest.raises(SystemExit, match="no finished Table 3 record of model 'vgg'"):
        _figures().shown_in_table3("vgg", 0, tmp_path)


# ---- issue 12: AL on ResNet-20 predicted a constant (0.1000) -------------------------------------
def _class_spread(rule) -> list[float]:
    """Per target level t_1..t_L: std over the classes (mean over units) of the encoders' codes."""
    t, out = F.one_hot(torch.arange(rule.num_classes), rule.num_classes).float(), []
    with torch.no_grad():
        for g in rule.encoders:
            t = g(t)
            out.append(float(t.std(0).mean()))
    return out


def test_optimizer_weight_decay_on_the_autoencoders_is_refused():
    """Adam's coupled L2 on g_i, h_i collapses AL's targets (their ae gradients are tiny), so the rule
    refuses it and says to use method.l2 instead."""
    rule = small_mlp_al()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="method.l2"):
        rule.train_step(x, y, torch.optim.Adam(rule.parameters(), lr=1e-3, weight_decay=1e-4))
    t_ids = {id(p) for p in rule.t_side_parameters()}
    f_side = [p for p in rule.parameters() if id(p) not in t_ids]
    ok = torch.optim.Adam([{"params": f_side, "weight_decay": 1e-4},
                           {"params": rule.t_side_parameters(), "weight_decay": 0.0}], lr=1e-3)
    rule.train_step(x, y, ok)  # decaying only the f side is what the authors do: accepted


def test_method_l2_reaches_f_side_and_bridge_kernels_only():
    """method.l2 adds l2 * W to the gradient of every f-block and bridge kernel and nothing to the
    autoencoders, biases or anything else (the authors' kernel_regularizer)."""
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    grads = []
    for l2 in (0.0, 0.1):
        rule = small_mlp_al(seed=2)
        rule.l2 = l2
        opt = torch.optim.SGD(rule.parameters(), lr=0.0)  # lr 0: only the gradients matter
        rule.train_step(x, y, opt)
        grads.append({n: p.grad.clone() for n, p in rule.named_parameters()})
        params = dict(rule.named_parameters())
    t_ids = {id(p) for p in rule.t_side_parameters()}
    kernels = {id(m.weight) for L in range(1, len(rule.fold) + 1) for mod in rule.component_modules(L)
               for m in mod.modules() if isinstance(m, torch.nn.Linear)} - t_ids
    for n, p in params.items():
        diff = grads[1][n] - grads[0][n]
        if id(p) in kernels:
            torch.testing.assert_close(diff, 0.1 * p.detach(), msg=f"{n}: l2 gradient is not l2 * W")
        else:
            assert torch.count_nonzero(diff) == 0, f"{n} ({'autoencoder' if id(p) in t_ids else 'bias'}) is penalised"


def test_targets_spread_apart_under_the_resnet_settings():
    """The collapse behind the constant prediction, on synthetic inputs: at the ResNet settings (Adam lr
    1e-3, L2 1e-4 as method.l2) the encoders' codes of the 10 classes must move apart at every level
    within 600 steps (measured: top level x4). With Adam's weight_decay 1e-4 on every parameter instead
    (the old config; the guard must be bypassed to run it) the top level stayed at x1.0 (0.0105 -> 0.0102)."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=[32, 32, 32, 160, 32, 32, 32], init="he_normal")
    rule = build_rule("al", model, F.nll_loss, components=3, l2=1e-4)
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 10
    before = _class_spread(rule)
    for _ in range(600):
        rule.train_step(x, y, opt)
    after = _class_spread(rule)
    assert all(a > 1.3 * b for a, b in zip(after, before)), f"class spread of t_1..t_L: {before} -> {after}"
    assert after[-1] > 2 * before[-1], f"top-level targets barely separate: {before[-1]:.4f} -> {after[-1]:.4f}"


@pytest.mark.slow
def test_al_resnet20_beats_chance_on_5000_cifar10_jpeg_images():
    """Issue 12 acceptance: the committed AL ResNet-20 config (conf/method_model/al_resnet20fc.yaml, lower
    bridges pooled to 4x4 as the CPU runs) learns within a few hundred steps (measured: 0.25 at 450 steps;
    with Adam's weight_decay 1e-4 on everything, the old config, 0.095-0.10 at 300 steps, a constant)."""
    c = _compose("method=al", "model=resnet20fc", "dataset=cifar10_jpeg", "method.bridge_pool=4")
    assert c["optim"]["weight_decay"] == 0 and c["method"]["l2"] == 1e-4
    data = load_dataset("cifar10_jpeg", DATA, os.environ.get("BPFREE_CACHE", ".cache/bpfree"), subset=5000,
                        test_subset=1000)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rule = _build(c)
    opt = torch.optim.Adam(rule.parameters(), lr=c["optim"]["lr"], weight_decay=c["optim"]["weight_decay"])
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        idx = torch.randint(0, len(data.train.y), (32,), generator=g)
        rule.train_step(data.train.x[idx], data.train.y[idx], opt)
    rule.eval()
    with torch.no_grad():
        pred = rule.predict(data.test.x).argmax(1)
    acc = float((pred == data.test.y).float().mean())
    assert len(pred.unique()) > 3, "eq. 8 predicts (nearly) one class for every image"
    assert acc > 0.17, f"AL ResNet-20 test accuracy after 500 steps: {acc:.4f} (chance 0.10)"


def _figures():
    """experiments/associated-learning/figures.py (the paper's own figure code lives with its tables)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "associated-learning" / "figures.py"
    spec = importlib.util.spec_from_file_location("al_figures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
