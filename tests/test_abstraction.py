"""Abstracted gradients: the properties of abstracted-gradients §3.2-3.4."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bpfree.models import build_model
from bpfree.rules import UnsupportedModel, build_rule
from bpfree.rules.abstraction import Abstraction, derived_map


class Chain(nn.Module):
    """Minimal model obeying the addressing contract: blocks b1..bk applied in order."""

    def __init__(self, *mods):
        super().__init__()
        self.blocks = nn.ModuleDict({f"b{i}": m for i, m in enumerate(mods, start=1)})

    def forward(self, x):
        for b in self.blocks.values():
            x = b(x)
        return x


def _mse(out, y):
    return ((out - y) ** 2).sum()


def _grads(model, x, y, params):
    return torch.autograd.grad(_mse(model(x), y), params)


def test_derived_M_is_exact_for_a_linear_region():
    """Linear, bias-free region and a full-rank batch larger than its input width: the gradient the
    earlier layers get through the derived M equals backprop's."""
    torch.manual_seed(0)
    d = 12
    model = Chain(nn.Linear(d, d), nn.Linear(d, 10, bias=False), nn.Linear(10, 8, bias=False), nn.Linear(8, 3))
    model.double()
    x, y = torch.randn(64, d, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    first = list(model.blocks["b1"].parameters())
    want = _grads(model, x, y, first)
    control = Chain(*[m for m in copy.deepcopy(model).blocks.values()])
    Abstraction(model, _mse, "derived", regions=[["b2", "b3"]])
    got = _grads(model, x, y, first)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    # control: the skip is really in the graph, since a non-exact M changes the same gradient
    Abstraction(control, _mse, "block_identity", regions=[["b2", "b3"]])
    assert not torch.allclose(_grads(control, x, y, list(control.blocks["b1"].parameters()))[0], want[0])


def test_identity_M_over_an_identity_region_matches_backprop():
    torch.manual_seed(0)
    model = Chain(nn.Linear(6, 5), nn.Identity(), nn.Identity(), nn.Linear(5, 2))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    want = _grads(model, x, y, list(model.parameters()))
    Abstraction(model, _mse, "identity", regions=[["b2", "b3"]])
    got = _grads(model, x, y, list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mode", ["block_identity", "derived"])
def test_abstracted_layers_get_backprop_gradients_given_G_i(mode):
    """Inside the region nothing changes: its parameters' gradients equal backprop's, while the
    layers before it get a different (abstracted) gradient."""
    torch.manual_seed(1)
    model = build_model("mlp", (1, 28, 28), 10)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    inside = [p for n in ("l2", "l3", "l4") for p in model.blocks[n].parameters()]
    before = list(model.blocks["l1"].parameters())
    nll = nn.functional.nll_loss
    want = torch.autograd.grad(nll(model(x), y), inside + before)
    rule = build_rule(f"abstraction_{mode}", model, nll, regions=[["l2", "l4"]])
    got = torch.autograd.grad(nll(rule.model(x), y), inside + before)
    for g, w in zip(got[: len(inside)], want[: len(inside)]):
        torch.testing.assert_close(g, w)
    assert not torch.allclose(got[len(inside)], want[len(inside)])


def test_block_identity_pads_and_truncates():
    torch.manual_seed(0)
    model = Chain(nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(3, 2))
    Abstraction(model, _mse, "block_identity", regions=[["b2", "b2"]])
    h = torch.randn(5, 6, requires_grad=True)
    g_out = torch.randn(5, 3)
    out = model.blocks["b2"](h)
    (g_in,) = torch.autograd.grad(out, h, g_out)
    torch.testing.assert_close(g_in, torch.cat([g_out, torch.zeros(5, 3)], 1))


def test_derived_map_is_safe_when_the_batch_is_smaller_than_the_width():
    torch.manual_seed(0)
    h_in, h_out = torch.randn(64, 392), torch.randn(64, 49)  # the paper's batch 64 vs width 392
    a = derived_map(h_in, h_out)
    assert a.shape == (393, 49) and torch.isfinite(a).all()
    fit = torch.cat([h_in, torch.ones(64, 1)], 1) @ a
    torch.testing.assert_close(fit, h_out, rtol=1e-3, atol=1e-3)  # underdetermined: interpolates


def test_transformer_shaped_streams_use_all_positions():
    """(B, T, d) streams: M = I passes G_i unchanged; derived M is one map over all B*T positions."""
    torch.manual_seed(0)
    model = Chain(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    Abstraction(model, _mse, "identity", regions=[["b2", "b3"]])
    h = torch.randn(2, 5, 8, requires_grad=True)
    g = torch.randn(2, 5, 8)
    out = model.blocks["b3"](model.blocks["b2"](h))
    (g_in,) = torch.autograd.grad(out, h, g)
    torch.testing.assert_close(g_in, g)


def test_shape_errors_are_clear():
    model = build_model("mlp", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="no layer named 'l9'.*'l1', 'l2'"):
        build_rule("abstraction_derived", model, nn.functional.nll_loss, regions=[["l2", "l9"]])
    with pytest.raises(ValueError, match="regions overlap: l3"):
        build_rule("abstraction_derived", model, nn.functional.nll_loss, regions=[["l2", "l3"], ["l3", "l4"]])
    with pytest.raises(ValueError, match="reversed"):
        build_rule("abstraction_derived", model, nn.functional.nll_loss, regions=[["l4", "l2"]])
    rule = build_rule("abstraction_identity", model, nn.functional.nll_loss, regions=[["l2", "l4"]])
    opt = torch.optim.Adam(rule.parameters())
    with pytest.raises(UnsupportedModel, match="equal widths.*392.*49.*abstraction_block_identity"):
        rule.train_step(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), opt)


def test_diagnostics_measure_alignment_and_leave_no_trace():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)
    rule = build_rule("abstraction_derived", model, nn.functional.nll_loss, regions=[["l2", "l4"]])
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    before = [p.detach().clone() for p in rule.parameters()]
    d = rule.diagnostics(x, y)
    assert set(d) == {f"abs_{k}_l2-l4" for k in ("cos", "norm_ratio", "fit_residual", "heldout_residual")}
    assert -1 <= d["abs_cos_l2-l4"] <= 1 and d["abs_norm_ratio_l2-l4"] > 0
    assert d["abs_fit_residual_l2-l4"] < 1e-3 < d["abs_heldout_residual_l2-l4"]  # 128 rows < 393 unknowns
    assert all(torch.equal(a, b) for a, b in zip(before, rule.parameters()))
    assert all(p.grad is None for p in rule.parameters())
