"""House rules that a grep can check: each value lives in one place; names are compared only where they
are defined."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import bpfree.models  # noqa: F401 - fills MODELS
import bpfree.rules  # noqa: F401 - fills RULES
from bpfree.registry import MODELS, RULES
from tests.conftest import CONF, ROOT


def _own_keys(path: Path) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in cfg.items() if k not in ("name", "defaults")}


def _duplicated(group: str, registry) -> list[str]:
    assert len(registry.names()) > 3, "the registry was not filled: the check would pass vacuously"
    out = []
    for f in sorted((CONF / group).glob("*.yaml")):
        name = OmegaConf.load(f).get("name")
        if name not in registry:
            continue
        params = inspect.signature(registry.get(name)).parameters
        for k in _own_keys(f):
            p = params.get(k)
            if p is not None and p.default is not inspect.Parameter.empty:
                out.append(f"conf/{group}/{f.name}: {k} (YAML {_own_keys(f)[k]!r}, Python {p.default!r})")
    return out


@pytest.mark.parametrize("group, registry", [("method", RULES), ("model", MODELS)])
def test_no_default_lives_both_in_a_yaml_and_in_its_constructor(group, registry):
    """A setting a conf/<group>/*.yaml sets has no default in the Python signature it is passed to: the
    YAML owns it (the two could only ever disagree, as cnn.py's downsample once did)."""
    assert _duplicated(group, registry) == []


def test_no_method_or_table_name_is_compared_to_a_string_outside_its_own_file():
    """The loop, the runner, the tables and the scripts never branch on a rule's or a table's name."""
    names = set(RULES.names()) | {"depth", "mnist_rules", "rules_source", "rules_tuned"}
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](%s)["']""" % "|".join(map(re.escape, sorted(names))))
    offenders = []
    for f in [ROOT / "run.py", *(ROOT / "bpfree").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line) and "# name-ok" not in line:
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def _library_lines():
    for f in [ROOT / "run.py", *sorted((ROOT / "bpfree").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            yield f.relative_to(ROOT).as_posix(), i, line


@pytest.mark.parametrize("home, pattern, what", [
    ("bpfree/models/surgery.py", r"\.named_children\(|\.forward\s*=[^=]",
     "module surgery (swapping children, bypassing a block's forward)"),
    ("bpfree/alignment.py", r"\btrue_gradients\(|cosine_similarity\(|\bacos\(",
     "gradient-alignment measurement (true gradients, cosines, angles)"),
])
def test_one_home_for_module_surgery_and_gradient_alignment(home, pattern, what):
    """Module swaps and ablation live in bpfree/models/surgery.py, gradient-alignment measurements in
    bpfree/alignment.py (rules call `surgery.swap`, `grad_alignment`): nothing else re-implements them."""
    rx = re.compile(pattern)
    hits = [(f, i, line) for f, i, line in _library_lines() if rx.search(line)]
    assert any(f == home for f, _, _ in hits), f"the check found nothing in {home}: it would pass vacuously"
    offenders = [f"{f}:{i}: {line.strip()}" for f, i, line in hits if f != home]
    assert offenders == [], f"{what} outside {home}"
