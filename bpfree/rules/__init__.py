"""Learning rules. Each file registers its rules in `bpfree.registry.RULES` under the config name
(`method=bp` <-> conf/method/bp.yaml <-> @RULES.register("bp"))."""
from __future__ import annotations

import importlib
import pkgutil

from bpfree.registry import RULES
from bpfree.rules.base import LearningRule, UnsupportedModel


def build_rule(name: str, model, loss_fn, **kwargs) -> LearningRule:
    """`kwargs` override conf/method/<name>.yaml, which holds every default (bpfree/defaults.py)."""
    from bpfree.defaults import yaml_defaults

    ctor = RULES.get(name)
    return ctor(model, loss_fn, **{**yaml_defaults("method", name), **kwargs})


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["LearningRule", "UnsupportedModel", "build_rule", "RULES"]
