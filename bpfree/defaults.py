"""The YAML owns every default: a rule's or model's settings come from conf/<group>/<option>.yaml, whose
Python constructor takes them without defaults. `yaml_defaults` reads that file (following `defaults:`
entries to other options of the same group) so that Python callers (tests, notebooks, the bench) get
exactly what `python run.py method=<option>` would: build_model / build_rule fill what a caller leaves out.
Interpolations (`${...}`) are left out: they only mean something inside a composed run config.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"


@lru_cache(maxsize=None)
def _load(group: str, option: str) -> dict:
    path = CONF / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    out: dict = {}
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
            out |= _load(group, entry)  # another option of the same group, e.g. abstraction_identity
    return out | {k: v for k, v in raw.items() if k not in ("defaults", "name")}


def yaml_defaults(group: str, option: str) -> dict:
    """conf/<group>/<option>.yaml's settings (without `name`), {} when there is no such file."""
    return {k: v for k, v in _load(group, option).items() if not (isinstance(v, str) and "${" in v)}
