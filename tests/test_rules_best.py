"""Issue 12 ("every rule at its best"): the validation split used for tuning, and the rule options the
source settings need (TP/DTP inverse learning rate, LRA-E's update, KP without decay, RMSprop)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from bpfree.data import load_dataset
from bpfree.models import build_model
from bpfree.rules import build_rule
from bpfree.train import make_optimizer

ROOT = os.environ.get("BPFREE_DATA", "../shared/data")
CACHE = os.environ.get("BPFREE_CACHE", ".cache/bpfree")


def test_val_split_holds_out_the_last_fraction_of_the_training_set():
    full = load_dataset("mnist", ROOT, CACHE, subset=1000)
    split = load_dataset("mnist", ROOT, CACHE, subset=1000, val_split=0.1)
    assert len(split.train) == 900 and len(split.val) == 100
    torch.testing.assert_close(split.train.x, full.train.x[:900])
    torch.testing.assert_close(split.val.x, full.train.x[900:])
    assert torch.equal(split.val.y, full.train.y[900:])
    torch.testing.assert_close(split.test.x, full.test.x)  # the test set is never touched
    assert full.val is None  # default off


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_val_split_rejects_fractions_outside_0_1(bad):
    with pytest.raises(ValueError, match="data.val_split"):
        load_dataset("mnist", ROOT, CACHE, subset=100, val_split=bad)


def test_run_scores_the_validation_split_every_epoch(compose_run):
    from run import run
    rec = run(compose_run(["data.subset=600", "data.test_subset=200", "data.val_split=0.1", "trainer.epochs=1",
                           "trainer.max_steps_per_epoch=5", "trainer.num_threads=1"]))
    epoch = rec["metrics"]["per_epoch"][0]
    assert 0 <= epoch["val_acc"] <= 1 and "test_acc" in epoch
    assert rec["config"]["data"]["val_split"] == 0.1


def _mlp(hidden=(16, 16, 16), act="tanh", seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), 10, hidden=list(hidden), activation=act)


@pytest.mark.parametrize("method", ["tp", "dtp"])
def test_inverse_lr_puts_the_inverses_in_their_own_group(method):
    rule = build_rule(method, _mlp(), F.nll_loss, inverse_lr=0.005)
    opt, _, _ = make_optimizer(rule.optimizer_groups(), "rmsprop", lr=0.0149, alpha=0.95, eps=0.0316,
                               momentum=0.9, centered=True)
    inv = {id(p) for p in rule.inverses.parameters()}
    groups = [({id(p) for p in g["params"]}, g["lr"]) for g in opt.param_groups]
    assert [lr for _, lr in groups] == [0.0149, 0.005]
    assert groups[1][0] == inv and not (groups[0][0] & inv)
    assert groups[0][0] | groups[1][0] == {id(p) for p in rule.parameters()}  # every parameter, once
    # without inverse_lr: one group, the optimizer's lr
    plain = build_rule(method, _mlp(), F.nll_loss)
    opt, _, _ = make_optimizer(plain.optimizer_groups(), "adam", lr=1e-3)
    assert len(opt.param_groups) == 1


def test_lra_e_update_is_error_times_input_without_the_derivative():
    """derivative=False: hidden layer l's weight gradient is e_l h_{l-1}ᵀ / N (LRA-E's dW = eᵀh), with e_l
    its error unit; the output layer's is the task gradient; E gets exactly W's update (gamma = 1)."""
    rule = build_rule("lra", _mlp(), F.nll_loss, beta=0.1, error_std=1.0, derivative=False)
    x, y = torch.randn(7, 1, 8, 8), torch.randint(0, 10, (7,))
    pre, h = rule.forward_all(x)
    L = len(rule.pairs)
    # the error units by hand, top-down (float64 as the rule)
    e = (F.softmax(pre[-1], 1) - F.one_hot(y, 10)).double()
    errs = {}
    for l in range(L, 1, -1):
        E = rule.error_weights[rule.names[l - 1]].double()
        t = torch.tanh(pre[l - 2].double() - 0.1 * e @ E)
        e = h[l - 1].double() - t
        errs[l - 1] = e.float()
    rule.compute_grads(x, y)
    for l in range(1, L):
        lin, _ = rule.pairs[l - 1]
        torch.testing.assert_close(lin.weight.grad, errs[l].t() @ h[l - 1] / len(y), rtol=1e-4, atol=1e-6)
    for name, E in rule.error_weights.items():
        assert torch.equal(E.grad, rule.model.blocks[name][0].weight.grad)
    # derivative=True (the default) differs exactly by act'(a_l) = 1 - h_l² on the error
    rule.derivative = True
    rule.zero_grad(set_to_none=True)
    rule.compute_grads(x, y)
    lin, _ = rule.pairs[0]
    torch.testing.assert_close(lin.weight.grad, (errs[1] * (1 - h[1] ** 2)).t() @ h[0] / len(y), rtol=1e-4, atol=1e-6)


def test_lra_error_std_sets_the_scale_of_E_independently_of_W():
    rule = build_rule("lra", _mlp(hidden=(256, 256)), F.nll_loss, error_std=1.0)
    for name, E in rule.error_weights.items():
        w = rule.model.blocks[name][0].weight
        assert 0.9 < float(E.detach().std()) < 1.1 and float(E.detach().std()) > 10 * float(w.detach().std())
    same = build_rule("lra", _mlp(hidden=(256, 256)), F.nll_loss)  # null: each W's own std
    for name, E in same.error_weights.items():
        w = same.model.blocks[name][0].weight
        assert abs(float(E.detach().std()) / float(w.detach().std()) - 1) < 0.1


def test_kp_without_decay_keeps_B_minus_W_constant():
    """Akrout et al.'s MNIST KP (weight_decay factor 1): B and W get the same update, so B - W never moves,
    and B aligns with W only because W grows away from the initial mismatch."""
    torch.manual_seed(0)
    rule = build_rule("kp", build_model("mlp", (1, 8, 8), 10, hidden=[32]), F.nll_loss, decay=0.0)
    opt = torch.optim.SGD(rule.parameters(), lr=0.3)
    d0 = {n: (m.feedback - m.weight).detach().clone() for n, m in rule.layers.items()}
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    for _ in range(20):
        rule.train_step(x, y, opt)
    for n, m in rule.layers.items():
        torch.testing.assert_close(m.feedback - m.weight, d0[n], rtol=0, atol=1e-6)
