"""bpfree/models/surgery.py (the one module-surgery helper) and alignment.grad_alignment (the one
gradient-alignment diagnostic): the properties the rules rely on."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.alignment import grad_alignment, layer_names, rule_and_true_grads
from bpfree.models import build_model, surgery
from bpfree.rules import build_rule
from bpfree.rules.dfa import DFALayer
from bpfree.rules.feedback import FeedbackLayer, exact_backward


def mlp(hidden=(8, 8, 8, 8)):
    torch.manual_seed(0)
    return build_model("mlp", (1, 4, 4), 3, hidden=list(hidden), activation="relu", init="default")


def batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 3


# ------------------------------------------------------------------------------------------ swap
def test_swap_by_predicate_replaces_exactly_the_selected_modules_in_module_order():
    m = mlp()
    x, _ = batch()
    seen = []
    new = surgery.swap(m, lambda mod: isinstance(mod, nn.ReLU), lambda mod: seen.append(mod) or nn.Tanh())
    assert list(new) == ["l1", "l2", "l3", "l4"]  # one activation per block: named by the block
    assert all(type(t) is nn.Tanh for t in new.values()) and len(seen) == 4
    assert [type(b[1]) for b in m.blocks.values()] == [nn.Tanh] * 4 + [nn.LogSoftmax]
    assert all(new[n] is m.blocks[n][1] for n in new)  # the returned modules are the ones in the model
    h = x.flatten(1)
    for b in m.blocks.values():
        h = b[1](b[0](h))
    assert torch.allclose(m(x), h)
    assert surgery.swap(m, lambda mod: isinstance(mod, nn.ReLU), lambda mod: nn.ReLU()) == {}  # none left


def test_swap_names_are_the_short_layer_names_and_keep_the_parameters():
    m = mlp()
    before = layer_names(m)
    weights = [lin.weight for lin in before.values()]
    new = surgery.swap(m, lambda mod: type(mod) is nn.Linear, lambda lin: FeedbackLayer(lin))
    assert list(new) == list(before) == ["l1", "l2", "l3", "l4", "l5"]
    assert [lay.weight for lay in new.values()] == weights  # the same Parameter objects


def test_swap_does_not_visit_the_children_of_a_selected_module():
    m = nn.Sequential(nn.Sequential(nn.ReLU(), nn.ReLU()), nn.ReLU())
    new = surgery.swap(m, lambda mod: isinstance(mod, nn.Sequential), lambda mod: nn.Identity())
    assert list(new) == ["0"] and isinstance(m[0], nn.Identity) and isinstance(m[1], nn.ReLU)


# ------------------------------------------------------------------------------------ blocks, spans
def test_span_and_regions_errors_name_the_valid_blocks():
    m = mlp()
    assert surgery.span(m, "l2", "l4") == ["l2", "l3", "l4"]
    with pytest.raises(ValueError, match=r"no layer named 'l9'.*\['l1', 'l2', 'l3', 'l4', 'l5'\]"):
        surgery.span(m, "l2", "l9")
    with pytest.raises(ValueError, match=r"reversed.*\['l1', 'l2', 'l3', 'l4', 'l5'\]"):
        surgery.span(m, "l4", "l2")
    with pytest.raises(ValueError, match=r"\[first, last\].*'l3'.*\['l1', 'l2', 'l3', 'l4', 'l5'\]"):
        surgery.regions(m, ["l3"])
    with pytest.raises(ValueError, match="regions overlap: l3"):
        surgery.regions(m, [["l2", "l3"], ["l3", "l4"]])
    assert surgery.regions(m, [["l1", "l1"], ("l3", "l4")]) == [("l1", "l1"), ("l3", "l4")]
    with pytest.raises(TypeError, match="does not expose `blocks`"):
        surgery.block_names(nn.Linear(2, 2))


def test_match_keeps_block_order():
    assert surgery.match(["s1b1", "s1b2", "s2b1", "head"], ["s2*", "s1b2"]) == ["s1b2", "s2b1"]


def test_entry_and_run_blocks_reproduce_the_forward():
    m = mlp()
    x, _ = batch()
    assert surgery.entry(m, x).shape == (12, 16)
    assert torch.equal(surgery.run_blocks(m, surgery.block_names(m), surgery.entry(m, x)), m(x))


def test_ablation_equals_the_model_without_those_blocks_and_is_undone():
    m = mlp()  # equal hidden widths: l2..l3 can be bypassed
    x, _ = batch()
    full = m(x)
    smaller = copy.deepcopy(m)
    del smaller.blocks["l2"], smaller.blocks["l3"]
    with surgery.ablated(m, [["l2", "l3"]]) as names:
        assert names == ["l2", "l3"]
        assert torch.equal(m(x), smaller(x))
    assert torch.equal(m(x), full)
    with pytest.raises(ValueError, match="its layers are"):
        with surgery.ablated(m, [["l2", "lx"]]):
            pass
    assert torch.equal(m(x), full)


def test_region_hooks_see_the_region_input_and_output():
    m = mlp()
    x, _ = batch()
    got = {}
    enter = lambda key: lambda mod, args: got.__setitem__(key + "/in", args[0])  # noqa: E731
    leave = lambda key: lambda mod, args, out: got.__setitem__(key + "/out", out)  # noqa: E731
    handles = surgery.region_hooks(m, [("l2", "l3")], enter, leave)
    m(x)
    h1 = m.blocks["l1"](x.flatten(1))
    assert torch.equal(got["l2-l3/in"], h1)
    assert torch.equal(got["l2-l3/out"], m.blocks["l3"](m.blocks["l2"](h1)))
    for h in handles:
        h.remove()
    got.clear()
    m(x)
    assert got == {}


def test_dfa_layers_are_feedback_layers_and_add_no_state():
    """DFA builds on FeedbackLayer: the weights are the model's own, no buffer is added (its B is drawn
    from a seed), so a dfa checkpoint has exactly the keys of the plain model."""
    m = mlp()
    keys = set(m.state_dict())
    rule = build_rule("dfa", m, F.nll_loss)
    assert all(isinstance(lay, DFALayer) and isinstance(lay, FeedbackLayer) for lay in rule.layers.values())
    assert {k.removeprefix("model.") for k in rule.state_dict()} == keys


# ---------------------------------------------------------------------------------- grad_alignment
def test_grad_alignment_metrics_and_errors():
    a = torch.tensor([1.0, 0.0])
    true = {"w": a}
    out = grad_alignment({"w": a, "extra": a}, true, {"ang/": "angle", "cos/": "cos", "r/": "norm_ratio"})
    assert out == {"ang/w": 0.0, "cos/w": 1.0, "r/w": 1.0}
    assert grad_alignment({"w": -2 * a}, true)["angle_grad/w"] == pytest.approx(180.0)
    assert grad_alignment({"w": torch.tensor([1.0, 1.0])}, true)["angle_grad/w"] == pytest.approx(45.0)
    assert grad_alignment({"w": 3 * a}, true, {"r/": "norm_ratio"})["r/w"] == pytest.approx(3.0)
    assert math.isinf(grad_alignment({"w": a}, {"w": 0 * a}, {"r/": "norm_ratio"})["r/w"])
    with pytest.raises(KeyError, match="no rule gradient for"):
        grad_alignment({}, true)
    with pytest.raises(ValueError, match="unknown alignment metric 'sine'; valid: angle"):
        grad_alignment(true, true, {"s/": "sine"})


@pytest.mark.parametrize("name, zero", [("bp", True), ("fa", False)])
def test_rule_and_true_grads_measure_without_touching_grad(name, zero):
    rule = build_rule(name, mlp(), F.nll_loss)
    x, y = batch()
    marker = [torch.full_like(p, 7.0) for p in rule.parameters()]
    for p, g in zip(rule.parameters(), marker):
        p.grad = g.clone()
    layers = getattr(rule, "layers", None) or layer_names(rule.model)  # fa: its swapped layers
    weights = {n: lay.weight for n, lay in layers.items()}
    exact = exact_backward(rule.layers.values()) if hasattr(rule, "layers") else None
    angles = grad_alignment(*rule_and_true_grads(rule, x, y, weights, exact=exact))
    assert all(torch.equal(p.grad, g) for p, g in zip(rule.parameters(), marker))
    assert list(angles) == [f"angle_grad/l{i}" for i in range(1, 6)]
    assert angles["angle_grad/l5"] == pytest.approx(0.0, abs=1e-3)  # the output layer's update is exact
    assert (max(angles.values()) < 1e-3) == zero  # bp: 0 everywhere; fa: the hidden layers are not
