"""A new rule is one Python file and one YAML, and nothing else: proved with a toy rule written to a
temporary folder, registered, composed by Hydra, trained for a step, diagnosed and recorded."""
from __future__ import annotations

import importlib.util
import sys
import textwrap

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from bpfree.registry import MODELS, RULES
from tests.conftest import CACHE, CONF, data_root

RULE = '''
"""A toy rule: backprop whose gradients are scaled by `gain` (the one file a new rule needs)."""
import torch

from bpfree.registry import RULES
from bpfree.rules.base import LearningRule


@RULES.register("toy_scaled")
class ToyScaled(LearningRule):
    def __init__(self, model, loss_fn, *, gain):
        super().__init__(model, loss_fn)
        self.gain = gain

    def compute_grads(self, x, y):
        out = super().compute_grads(x, y)
        for p in self.model.parameters():
            p.grad.mul_(self.gain)
        return out

    def diagnostics(self, x, y):
        return {"toy/gain": float(self.gain)}
'''


def test_a_new_rule_is_one_file_and_one_yaml(tmp_path):
    (tmp_path / "toy_scaled.py").write_text(textwrap.dedent(RULE))
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy_scaled.yaml").write_text("name: toy_scaled\ngain: 0.5   # the default lives here\n")
    spec = importlib.util.spec_from_file_location("toy_scaled", tmp_path / "toy_scaled.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_scaled"] = module
    spec.loader.exec_module(module)  # what bpfree.rules' auto-import does for a file in bpfree/rules/
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "method=toy_scaled", "data.subset=128",
                "data.test_subset=100", "trainer.epochs=1", "trainer.progress=false",
                f"records_dir={tmp_path / 'rec'}", f"checkpoint_dir={tmp_path / 'ck'}",
                f"data.root={data_root()}", f"data.cache_dir={CACHE}"])
        from run import run

        rec = run(cfg)
        assert rec["status"] == "ok" and rec["method"] == "toy_scaled"
        assert rec["config"]["method"] == {"name": "toy_scaled", "gain": 0.5}
        assert rec["metrics"]["final"]["toy/gain"] == 0.5  # its diagnostics reached the record
        assert OmegaConf.select(cfg, "method.gain") == 0.5
    finally:
        RULES._items.pop("toy_scaled", None)
        sys.modules.pop("toy_scaled", None)


def test_every_registered_rule_and_model_has_its_yaml_and_back():
    methods = {p.stem for p in (CONF / "method").glob("*.yaml")}
    models = {OmegaConf.load(p).name for p in (CONF / "model").glob("*.yaml")}
    assert set(RULES.names()) <= methods | {"toy_scaled"}, set(RULES.names()) - methods
    for m in methods:
        assert OmegaConf.load(CONF / "method" / f"{m}.yaml").name in RULES, f"conf/method/{m}.yaml names no rule"
    assert models <= set(MODELS.names()), models - set(MODELS.names())


def test_default_step_is_zero_grad_compute_step_after(tmp_path):
    from bpfree.models import build_model
    from bpfree.rules import build_rule

    calls = []
    rule = build_rule("bp", build_model("mlp", (1, 4, 4), 3, hidden=[5], activation="relu", init="default"),
                      torch.nn.functional.cross_entropy)
    rule.after_step = lambda: calls.append("after")
    opt = torch.optim.SGD(rule.parameters(), lr=0.1)
    before = [p.detach().clone() for p in rule.parameters()]
    out = rule.train_step(torch.randn(8, 1, 4, 4), torch.arange(8) % 3, opt)
    assert calls == ["after"] and set(out) == {"loss"}
    assert all(not torch.equal(a, b) for a, b in zip(before, rule.parameters()))
