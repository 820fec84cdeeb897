"""Synthetic-gradient rules (bpfree/rules/synthetic.py) and the VFBN ResNet (bpfree/models/resnet_vfbn.py):
properties that can fail. MLP tests run on real MNIST batches; the ResNet tests check shapes and wiring."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.data import load_dataset
from bpfree.data.augment import TEST_VIEWS
from bpfree.models import build_model
from bpfree.rules import LearningRule, build_rule
from bpfree.tasks import Classification
from tests.conftest import CACHE

LOSS = Classification(10).loss
SG = dict(alpha_gs=1.0, target="bp")
VFBN_KW = dict(stem_width=16, widths=[32, 64, 64], image_size=24, big_crop=28, train_views="vfbn",
               test_views="center_flip")


@pytest.fixture(scope="module")
def mnist(real_root):
    d = load_dataset("mnist", str(real_root), str(CACHE), subset=512)
    return [(d.train.x[i:i + 64], d.train.y[i:i + 64]) for i in range(0, 256, 64)]


def mlp(seed=0, hidden=(64, 48, 32)):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 28, 28), 10, hidden=list(hidden))


class Oracle(nn.Module):
    """A 'synthesizer' that returns the true per-sample-scale gradient at h: B * d loss(upper(h)) / dh,
    through the model's own blocks above `split` (held in a plain list: not a submodule)."""

    def __init__(self, model, split):
        super().__init__()
        names = list(model.blocks)
        self.upper = [model.blocks[n] for n in names[names.index(split) + 1:]]

    def forward(self, h, y):
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            z = h
            for b in self.upper:
                z = b(z)
            (g,) = torch.autograd.grad(LOSS(z, y) * len(y), h)
        return g


def params(m: nn.Module):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("splits", [["l2"], ["l1", "l3"]])
def test_true_gradient_synthesizer_trains_exactly_as_bp(mnist, splits):
    base = mlp()
    bp = LearningRule(copy.deepcopy(base), LOSS)
    sg = build_rule("sg_linear", copy.deepcopy(base), LOSS, split=splits, context=True, kernel=1,
                    zero_init=True, **SG)
    sg.synths = nn.ModuleList([Oracle(sg.model, s) for s in sg.splits])  # replaces the linear synthesizers
    opt_bp = torch.optim.Adam(bp.parameters(), 1e-3)
    opt_sg = torch.optim.Adam(sg.model.parameters(), 1e-3)
    for x, y in mnist:
        l_bp, l_sg = bp.train_step(x, y, opt_bp)["loss"], sg.train_step(x, y, opt_sg)["loss"]
        assert torch.allclose(l_bp, l_sg, atol=1e-6)
    a, b = params(bp.model), params(sg.model)
    moved = max(float((a[n] - base.state_dict()[n]).abs().max()) for n in a)
    assert moved > 1e-3  # the steps did something
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


def test_synthesizer_loss_never_reaches_the_base_model(mnist):
    x, y = mnist[0]
    r1 = build_rule("sg_resnet", mlp(), LOSS, split="l2", context=True, width=32, zero_init=False, **SG)
    r0 = copy.deepcopy(r1)
    r0.alpha_gs = 0.0
    for r in (r1, r0):
        r.train_step(x, y, torch.optim.SGD(r.parameters(), lr=0.0))
    for (n, p1), p0 in zip(r1.model.named_parameters(), r0.model.parameters()):
        assert p1.grad is not None and torch.equal(p1.grad, p0.grad), n
    assert all(p.grad is None for p in r0.synths.parameters())
    assert sum(float(p.grad.abs().sum()) for p in r1.synths.parameters()) > 0  # its loss did train it


def test_nothing_from_above_the_split_reaches_below(mnist):
    x, y = mnist[0]
    r = build_rule("sg_linear", mlp(), LOSS, split="l2", context=True, kernel=1, zero_init=False, **SG)
    r2 = copy.deepcopy(r)
    with torch.no_grad():  # a different network above the split
        for n in ("l3", "l4"):
            for p in r2.model.blocks[n].parameters():
                p.mul_(3.0).add_(0.1)
    for rr in (r, r2):
        rr.train_step(x, y, torch.optim.SGD(rr.parameters(), lr=0.0))
    for n in ("l1", "l2"):
        for p, q in zip(r.model.blocks[n].parameters(), r2.model.blocks[n].parameters()):
            assert p.grad.abs().sum() > 0 and torch.equal(p.grad, q.grad), n
    top = [(p.grad - q.grad).abs().max() for p, q in zip(r.model.blocks["l4"].parameters(),
                                                          r2.model.blocks["l4"].parameters())]
    assert max(top) > 0  # the upper part did see its own change


@pytest.mark.parametrize("alpha", [0.0, 1.0e-3])
def test_vfbn_alpha0_leaves_vf_unchanged_and_alpha_positive_trains_it(mnist, alpha):
    r = build_rule("vfbn", mlp(), LOSS, split="l2", alpha_gs=alpha, target="bp", hidden=[16])
    vf0, low0 = params(r.synths), params(r.model.blocks["l1"])
    opt = torch.optim.Adam(r.parameters(), 1e-3)
    for x, y in mnist:
        r.train_step(x, y, opt)
    vf_moved = max(float((p - vf0[n]).abs().max()) for n, p in params(r.synths).items())
    low_moved = max(float((p - low0[n]).abs().max()) for n, p in params(r.model.blocks["l1"]).items())
    assert low_moved > 1e-4  # the lower part learns from v_f's gradient either way
    assert (vf_moved == 0.0) if alpha == 0 else (vf_moved > 1e-4)


def test_linear_vf_delta_is_eq8_by_hand(mnist):
    r = build_rule("vfbn", mlp(), LOSS, split="l2", alpha_gs=0.0, target="bp", hidden=[])
    x, y = mnist[1]
    h = r.model.blocks["l2"](r.model.blocks["l1"](x.flatten(1))).detach()  # (B, 48)
    W, b = r.synths[0].vf.classifier.weight, r.synths[0].vf.classifier.bias  # (10, 48), (10,)
    onehot = F.one_hot(y, 10).float()
    # eq. 8 is d log-likelihood / dh = W^T (y - softmax(W h)); the NLL we minimise has the opposite sign
    by_hand = -(onehot - torch.softmax(h @ W.T + b, 1)) @ W
    assert torch.allclose(r.synths[0](h, y), by_hand, atol=1e-6)


def test_one_hidden_layer_vf_delta_is_eq9_by_hand(mnist):
    r = build_rule("vfbn", mlp(), LOSS, split="l2", alpha_gs=0.0, target="bp", hidden=[20])
    x, y = mnist[2]
    h = r.model.blocks["l2"](r.model.blocks["l1"](x.flatten(1))).detach()
    l1, l2 = r.synths[0].vf.body[0], r.synths[0].vf.classifier
    a = h @ l1.weight.T + l1.bias  # (B, 20)
    err = F.one_hot(y, 10).float() - torch.softmax(F.relu(a) @ l2.weight.T + l2.bias, 1)
    by_hand = -((err @ l2.weight) * (a > 0).float()) @ l1.weight  # W1^T f'(W1 h) W2^T (y - softmax)
    assert torch.allclose(r.synths[0](h, y), by_hand, atol=1e-6)


def test_unknown_or_last_split_is_refused_with_the_block_names():
    for bad in ("s9b9", "l4"):
        with pytest.raises(ValueError, match=r"valid block names: \['l1', 'l2', 'l3'\]"):
            build_rule("vfbn", mlp(), LOSS, split=bad, alpha_gs=0.0, target="bp", hidden=[])


def test_synthesizer_of_the_wrong_shape_is_refused_at_construction():
    model = build_model("resnet14_vfbn", (3, 32, 32), 10, **VFBN_KW)
    with pytest.raises(ValueError, match=r"emits \(B, 64, 12, 12\) but h there is \(B, 64, 11, 11\).*valid block "
                                         r"names: \['view', 'stem', 's1b1'"):
        build_rule("sg_linear", model, LOSS, split="s2b1", context=True, kernel=4, zero_init=True, **SG)


def test_resnet_vfbn_shapes_and_default_split():
    m = build_model("resnet110_vfbn", (3, 32, 32), 10, **VFBN_KW)
    assert len([n for n in m.blocks if n.startswith("s1")]) * 2 == 36 and m.default_split == "s2b9"
    z = torch.randn(2, 3, 32, 32)
    m.eval()
    shapes = {}
    with torch.no_grad():
        for n, b in m.blocks.items():
            z = b(z)
            shapes[n] = tuple(z.shape[1:])
    assert shapes["stem"] == (16, 22, 22) and shapes["s1b18"] == (32, 22, 22)
    assert shapes["s2b9"] == (64, 11, 11) and shapes["s3b18"] == (64, 6, 6) and shapes["head"] == (10,)


def test_eval_prediction_is_the_mean_probability_over_the_test_views():
    torch.manual_seed(0)
    m = build_model("resnet14_vfbn", (3, 32, 32), 10, **{**VFBN_KW, "test_views": "grid36"}).eval()
    x = torch.randn(3, 3, 32, 32)
    views = TEST_VIEWS["grid36"](x)
    assert views.shape == (36, 3, 3, 24, 24)
    with torch.no_grad():
        single = torch.stack([m._blocks_forward(v).exp() for v in views])  # (36, B, 10)
        assert torch.allclose(m(x).exp(), single.mean(0), atol=1e-5)
        assert not torch.allclose(single[0], single[-1])  # the views differ
    m.train()
    assert m.blocks["view"](x).shape == (3, 3, 24, 24)


@pytest.mark.parametrize("method,kw", [
    ("sg_linear", dict(context=True, kernel=5, zero_init=True, **SG)),
    ("sg_resnet", dict(context=True, width=16, zero_init=True, **SG)),
    ("vfbn", dict(hidden=[], **SG)),
    ("local_supervised", dict(target="bp", predict_from="top")),
    ("bottom_half_bp", dict()),
])
def test_every_rule_steps_on_the_vfbn_resnet_with_finite_diagnostics(method, kw):
    torch.manual_seed(0)
    r = build_rule(method, build_model("resnet14_vfbn", (3, 32, 32), 10, **VFBN_KW), LOSS, split=None, **kw)
    assert r.splits == ["s2b1"]
    top0 = params(r.model.blocks["s3b2"])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = r.train_step(x, y, torch.optim.SGD(r.parameters(), lr=0.1))
    assert all(math.isfinite(float(v)) for v in out.values())
    r.eval()
    with torch.no_grad():
        assert r.predict(x).shape == (8, 10)
    diag = r.diagnostics(x, y)
    assert all(math.isfinite(v) for v in diag.values())
    assert (diag == {}) if method == "bottom_half_bp" else ("sg_cos/s2b1" in diag)
    top_moved = any(not torch.equal(p, top0[n]) for n, p in params(r.model.blocks["s3b2"]).items())
    assert top_moved != (method == "bottom_half_bp")  # the bottom half trains alone
