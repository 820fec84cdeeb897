"""The LearningRule contract, for every registered rule (a new rule is checked the day it is registered):
`train_step`'s `loss` is the task loss of the rule's own prediction for the batch (bpfree/rules/base.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import bpfree.rules  # noqa: F401 - fills RULES
from bpfree.models import build_model
from bpfree.registry import RULES
from bpfree.rules import build_rule
from tests.conftest import CONF

# float32 along different but equal-valued paths (a no-grad forward, a detached copy per segment, eq. 8's
# decode from the top bridge): equal to rounding, far below the change one step makes (~1e-2 here)
TOL = dict(rel=1e-5, abs=1e-6)


def tiny_rule(name):
    torch.manual_seed(0)
    # 5 blocks l1..l5 of equal hidden width: every rule's YAML defaults fit it (abstraction's regions
    # [[l2, l4]], AL's fold, the synthetic rules' middle split, the chain rules' MLP chain)
    model = build_model("mlp", (1, 4, 4), 3, hidden=[8, 8, 8, 8], activation="relu", init="default")
    return build_rule(name, model, F.nll_loss, **interpolated(name))


def interpolated(name) -> dict:
    """The YAML's interpolated keys (e.g. split: ${oc.select:synth_split,null}), which build_rule leaves
    to a composed run config, resolved as a run without that top-level key resolves them."""
    raw = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    keys = [k for k in raw if k not in ("name", "defaults") and OmegaConf.is_interpolation(raw, k)]
    return {k: OmegaConf.to_container(raw, resolve=True)[k] for k in keys}


@pytest.mark.parametrize("name", sorted(RULES.names()))
@pytest.mark.parametrize("lr", [0.0, 0.01])
def test_loss_is_the_task_loss_of_the_rules_prediction(name, lr):
    """Over three steps on one batch (so per-example state such as aux's Z, which has its own learning
    rate, has moved away from the forward pass): before each step, loss_fn(predict(x), y) in training
    mode; train_step's `loss` must equal it. A rule whose loss straddles the step (AL) is held to it at
    lr = 0, where the step leaves the weights as they were. A rule returning the sum of its local
    objectives (AL before) or the loss of its output block on auxiliary inputs (aux before) fails here."""
    rule = tiny_rule(name)
    if rule.loss_straddles_step and lr > 0:
        pytest.skip(f"{name}: loss measured partly after the step; checked at lr = 0")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 4, 4, generator=g), torch.arange(16) % 3
    opt = torch.optim.Adam(rule.optimizer_groups(), lr=lr)
    for _ in range(3):
        with torch.no_grad():
            expected = float(F.nll_loss(rule.predict(x), y))
        out = rule.train_step(x, y, opt)
        assert float(out["loss"]) == pytest.approx(expected, **TOL), (name, sorted(out))
    if lr > 0:
        with torch.no_grad():
            moved = float(F.nll_loss(rule.predict(x), y))
        assert moved != expected, f"{name}: the steps did not change the prediction; the check would be vacuous"
