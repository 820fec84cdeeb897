"""Properties of the weight-transport-free and target-propagation rules (fa, dfa, usf, kp, wm, tp,
dtp, lra) and of the alignment diagnostics. Real MNIST where data is needed."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.alignment import angle, layer_names
from bpfree.data import load_dataset
from bpfree.models import build_model
from bpfree.rules import UnsupportedModel, build_rule

FEEDBACK = ["fa", "usf", "kp", "wm"]
ALL = ["bp", "fa", "dfa", "usf", "kp", "wm", "tp", "dtp", "lra"]


@pytest.fixture(scope="module")
def mnist():
    root = os.environ.get("BPFREE_DATA", "../shared/data")
    cache = os.environ.get("BPFREE_CACHE", ".cache/bpfree")
    return load_dataset("mnist", root, cache, subset=2048)


class TinyAttention(nn.Module):
    """Single-head self-attention + classifier, projections as plain nn.Linear (nanoGPT style)."""

    def __init__(self, d=8, t=5, classes=3):
        super().__init__()
        self.blocks = nn.ModuleDict({"q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d),
                                     "o": nn.Linear(d, d), "head": nn.Linear(d * t, classes)})

    def forward(self, x):  # (B, T, d)
        b = self.blocks
        att = torch.softmax(b["q"](x) @ b["k"](x).transpose(1, 2) / 8**0.5, dim=-1)  # (B, T, T)
        h = x + b["o"](att @ b["v"](x))
        return F.log_softmax(b["head"](h.flatten(1)), dim=1)


class Convs(nn.Module):
    """Convolutions with stride, groups, dilation and no bias: the corner cases of the conv backward."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "c1": nn.Conv2d(3, 4, 3, stride=2, padding=1),
            "c2": nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
            "out": nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5))})

    def forward(self, x):
        x = torch.relu(self.blocks["c1"](x))
        x = torch.tanh(self.blocks["c2"](x))
        return F.log_softmax(self.blocks["out"](x), dim=1)


def _cases():
    torch.manual_seed(0)
    return {
        "mlp": (build_model("mlp", (1, 8, 8), 10, hidden=[16, 12]), torch.randn(6, 1, 8, 8), 10),
        "cnn": (build_model("cnn", (3, 16, 16), 10, channels=[4, 4], fc=[8], pool_after=[1]),
                torch.randn(6, 3, 16, 16), 10),
        "resnet20": (build_model("resnet20", (3, 8, 8), 10, width=4), torch.randn(6, 3, 8, 8), 10),
        "convs": (Convs(), torch.randn(6, 3, 16, 16), 5),
        "attention": (TinyAttention(), torch.randn(6, 5, 8), 3),
    }


@pytest.mark.parametrize("case", ["mlp", "cnn", "resnet20", "convs", "attention"])
def test_fa_with_B_equal_W_matches_backprop(case):
    model, x, classes = _cases()[case]
    y = torch.arange(len(x)) % classes
    ref = copy.deepcopy(model)
    rule = build_rule("fa", model, F.nll_loss)
    for layer in rule.layers.values():
        layer.feedback.data.copy_(layer.weight)
    F.nll_loss(model(x), y).backward()
    F.nll_loss(ref(x), y).backward()
    got = {n: p.grad for n, p in model.named_parameters() if not n.endswith("feedback")}
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7), n
    assert len(rule.layers) == len(layer_names(ref))


def test_fa_with_random_B_differs_from_backprop_below_the_top():
    model, x, _ = _cases()["mlp"]
    y = torch.arange(len(x)) % 10
    ref = copy.deepcopy(model)
    build_rule("fa", model, F.nll_loss)
    F.nll_loss(model(x), y).backward()
    F.nll_loss(ref(x), y).backward()
    top, low = model.blocks["l3"][0].weight.grad, model.blocks["l1"][0].weight.grad
    assert torch.allclose(top, ref.blocks["l3"][0].weight.grad)  # the output layer's own gradient is exact
    assert angle(low, ref.blocks["l1"][0].weight.grad) > 20


def test_dfa_sends_the_output_error_through_a_fixed_random_matrix():
    torch.manual_seed(1)
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16, 12])
    _rule = build_rule("dfa", model, F.nll_loss)  # kept alive: its hooks do the work
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    seen = {}
    model.blocks["l2"][0].register_full_backward_hook(lambda m, gin, gout: seen.update(gin=gin[0]))
    model.blocks["l3"][0].register_full_backward_hook(lambda m, gin, gout: seen.update(e=gout[0]))
    F.nll_loss(model(x), y).backward()
    B = model.blocks["l2"][0].projection(10, torch.Size([16]), seen["e"])  # (classes, in of l2)
    assert torch.allclose(seen["gin"], seen["e"] @ B, atol=1e-7)


def test_kp_aligns_feedback_with_forward_weights(mnist):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, hidden=[64, 32])
    rule = build_rule("kp", model, F.nll_loss, decay=0.05)
    start = {n: angle(m.feedback, m.weight) for n, m in rule.layers.items()}
    assert min(start.values()) > 60
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    x, y = mnist.train.x, mnist.train.y
    for step in range(100):
        i = (step * 64) % 2048
        rule.train_step(x[i:i + 64], y[i:i + 64], opt)
    end = {n: angle(m.feedback, m.weight) for n, m in rule.layers.items()}
    assert max(end.values()) < 10, end


def test_kp_feedback_gets_the_weight_update_and_decay():
    """KP's B moves exactly as W does, both shrunk by (1 - decay): B - W contracts by (1 - decay)."""
    model, x, classes = _cases()["convs"]
    rule = build_rule("kp", model, F.nll_loss, decay=0.1)
    opt = torch.optim.Adam(rule.parameters(), lr=1e-2)
    y = torch.arange(len(x)) % classes
    for _ in range(3):
        before = {n: (m.feedback - m.weight).detach().clone() for n, m in rule.layers.items()}
        w0 = {n: m.weight.detach().clone() for n, m in rule.layers.items()}
        rule.train_step(x, y, opt)
        for n, m in rule.layers.items():
            assert not torch.equal(m.weight, w0[n])  # W did move
            assert torch.allclose(m.feedback - m.weight, 0.9 * before[n], atol=1e-6), n


@pytest.mark.parametrize("case", ["mlp", "convs"])
def test_wm_mirror_phase_reduces_angle(case):
    model, _, _ = _cases()[case]
    rule = build_rule("wm", model, F.nll_loss, mirror_batch=256)
    before = {n: angle(m.feedback, m.weight) for n, m in rule.layers.items()}
    rule.mirror(60)
    after = {n: angle(m.feedback, m.weight) for n, m in rule.layers.items()}
    for n in before:
        assert after[n] < before[n] - 30, (n, before[n], after[n])
        assert after[n] < 30, (n, after[n])


def test_usf_feedback_is_the_sign_of_current_weights():
    model, x, _ = _cases()["cnn"]
    rule = build_rule("usf", model, F.nll_loss)
    opt = torch.optim.Adam(rule.parameters(), lr=1e-2)
    rule.train_step(x, torch.arange(len(x)), opt)
    for m in rule.layers.values():
        B = m.current_feedback()
        assert torch.equal(torch.sign(B), torch.sign(m.weight.detach()))
        assert B.abs().unique().numel() == 1  # uniform magnitude


def test_dtp_inverses_learn_to_reconstruct_held_out_layers(mnist):
    """g_l(f_l(h)) ~ h: train only the inverses (forward weights fixed, so h is a fixed target) and the
    reconstruction error on held-out images falls."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, hidden=[64, 48, 32])
    rule = build_rule("dtp", model, F.nll_loss, noise=0.1)
    held_out = mnist.test.x[:256]
    before = rule.reconstruction_error(held_out)
    opt = torch.optim.Adam(rule.inverses.parameters(), lr=3e-3)
    for step in range(100):
        i = (step * 64) % 2048
        rule.train_step(mnist.train.x[i:i + 64], mnist.train.y[i:i + 64], opt)
    after = rule.reconstruction_error(held_out)
    assert set(before) == {"l2", "l3"}
    for n in before:
        assert after[n] < 0.5 * before[n], (n, before[n], after[n])  # from 64-d to 48-d: not lossless


@pytest.mark.parametrize("method", ALL)
def test_every_rule_lowers_the_training_loss_on_a_fixed_batch(method, mnist):
    """60 Adam steps (lr 1e-3) on one batch of 128 MNIST images. Feedback rules on a one-hidden-layer
    MLP (Akrout et al.'s setting); with two hidden layers FA-like rules first RAISE the loss at this lr
    while W aligns with B, which is the known alignment phase, not what this test is about. Target rules
    need two hidden layers (one inverse). TP's ReLU hidden layers die under targets from untrained
    inverses (the failure DTP's difference correction fixes), leaving only the output layer learning,
    so a smaller drop is required of it."""
    torch.manual_seed(0)
    hidden = [64, 32] if method in ("tp", "dtp", "lra") else [64]
    model = build_model("mlp", (1, 28, 28), 10, hidden=hidden)
    rule = build_rule(method, model, F.nll_loss)
    x, y = mnist.train.x[:128], mnist.train.y[:128]
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    losses = [float(rule.train_step(x, y, opt)["loss"]) for _ in range(60)]
    bar = losses[0] - 0.03 if method == "tp" else 0.9 * losses[0]
    assert min(losses[-20:]) < bar, losses[::6]


@pytest.mark.parametrize("method", ALL[1:])
def test_diagnostics_report_angles_and_leave_grads_alone(method, mnist):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, hidden=[32, 16])
    rule = build_rule(method, model, F.nll_loss)
    x, y = mnist.train.x[:64], mnist.train.y[:64]
    rule.train_step(x, y, torch.optim.SGD(rule.parameters(), lr=0.0))
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in rule.named_parameters()}
    weights = {n: p.detach().clone() for n, p in rule.named_parameters()}
    diag = rule.diagnostics(mnist.test.x[:64], mnist.test.y[:64])
    for n, p in rule.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
        assert torch.equal(p.detach(), weights[n]), n
    angles = {k: v for k, v in diag.items() if k.startswith("angle_grad/")}
    assert set(angles) == {"angle_grad/l1", "angle_grad/l2", "angle_grad/l3"}
    assert all(0 <= v <= 180 for v in diag.values() if isinstance(v, float))
    assert angles["angle_grad/l3"] < 1e-3  # the output layer is trained on the true loss by every rule
    if method in FEEDBACK:
        assert {f"angle_B/l{i}" for i in (1, 2, 3)} <= set(diag)


def test_angle_is_zero_for_bp_equivalent_feedback():
    model, x, _ = _cases()["mlp"]
    rule = build_rule("fa", model, F.nll_loss)
    for layer in rule.layers.values():
        layer.feedback.data.copy_(layer.weight)
    diag = rule.diagnostics(x, torch.arange(len(x)) % 10)
    assert max(diag.values()) < 1e-3


@pytest.mark.parametrize("method", ["tp", "dtp", "lra"])
def test_target_rules_reject_non_mlps(method):
    model = build_model("cnn", (3, 16, 16), 10, channels=[4], fc=[8], pool_after=[1])
    with pytest.raises(UnsupportedModel, match="MLP"):
        build_rule(method, model, F.nll_loss)


def test_feedback_rules_reject_multihead_attention():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"att": nn.MultiheadAttention(8, 2), "out": nn.Linear(8, 2)})

    with pytest.raises(UnsupportedModel, match="nn.Linear projections"):
        build_rule("fa", M(), F.nll_loss)


def test_kp_and_wm_keep_the_model_checkpointable():
    model, x, _ = _cases()["cnn"]
    rule = build_rule("kp", model, F.nll_loss)
    state = rule.state_dict()
    twin = build_rule("kp", copy.deepcopy(_cases()["cnn"][0]), F.nll_loss)
    twin.load_state_dict(state)
    for (n, a), (_, b) in zip(rule.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n
