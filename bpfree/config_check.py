"""One validation step for a resolved run config, before any data is loaded.

Hydra composes whatever it is given: `trainer.epochs=abc` arrives as the string 'abc', `+trainer.epoch=1`
(Hydra's own hint for a misspelled key) adds a key nothing reads, `trainer.batch_size=0` fails much later
inside the loop. `check(c)` refuses all of these up front, naming the key's full name, the value given and
what is allowed. The YAML files own every default; this module owns only types and ranges, and takes the
keys a method/model/optimizer accepts from its constructor's signature, so it never repeats a value.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A setting the run cannot use; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Int:
    min: int | None = None
    null: bool = False

    def ok(self, v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and (self.min is None or v >= self.min)

    def allowed(self) -> str:
        return "an integer" + (f" >= {self.min}" if self.min is not None else "")


@dataclass(frozen=True)
class Float:
    positive: bool = False
    min: float | None = None
    null: bool = False

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (not self.positive or v > 0) and (self.min is None or v >= self.min)

    def allowed(self) -> str:
        return "a number" + (" > 0" if self.positive else "") + (f" >= {self.min}" if self.min is not None else "")


@dataclass(frozen=True)
class Bool:
    null: bool = False

    def ok(self, v) -> bool:
        return isinstance(v, bool)

    def allowed(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Str:
    null: bool = False

    def ok(self, v) -> bool:
        return isinstance(v, str) and v != ""

    def allowed(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class Choice:
    options: tuple
    null: bool = False

    def ok(self, v) -> bool:
        return v in self.options

    def allowed(self) -> str:
        return "one of " + ", ".join(map(str, self.options))


@dataclass(frozen=True)
class Any_:
    null: bool = True

    def ok(self, v) -> bool:
        return True

    def allowed(self) -> str:
        return "anything"


# Every key of the `trainer` and `data` nodes and the top level (a key not listed here is refused, so a
# misspelling never passes silently). Groups whose keys depend on the option chosen (method, model,
# optim, dataset) are checked against their constructors below.
TOP: dict[str, Any] = {
    "seed": Int(min=0), "scale": Choice(("paper", "cpu")), "paper": Str(), "table": Str(),
    "row": Any_(null=False), "column": Any_(null=False), "run_name": Str(null=True),
    "records_dir": Str(null=True), "checkpoint_dir": Str(null=True),
    "scales": Any_(null=False),  # an experiment's budget per scale: {paper: {...}, cpu: {...}} (conf/scale/)
}
TRAINER: dict[str, Any] = {
    "epochs": Int(min=1), "batch_size": Int(min=1), "eval_batch_size": Int(min=1),
    "staleness": Int(min=0, null=True),  # trainer.parallel: steps a backward message is late
    "device": Str(), "resume": Bool(), "deterministic": Bool(), "num_threads": Int(min=1, null=True),
    "flush_denormal": Bool(),
    "progress": Bool(), "check_every": Int(min=1), "probe_size": Int(min=1),
    "max_steps_per_epoch": Int(min=1, null=True), "keep_checkpoints": Bool(),
    "parallel": Choice(("sequential", "threads", "processes"), null=True), "stages": Int(min=1),
    "dist_backend": Choice(("auto", "gloo", "nccl")),
}
DATA: dict[str, Any] = {
    "root": Str(), "cache_dir": Str(), "download": Bool(), "subset": Int(min=1, null=True),
    "test_subset": Int(min=1, null=True), "augment": Str(null=True), "jitter": Int(min=0),
    "val_split": Float(positive=True, null=True),  # fraction in (0, 1); load_dataset checks < 1
}
# top-level keys that experiments add for their own interpolations (e.g. `abstracted: [[E4, E6]]`) are
# allowed as long as they are not a near-miss of a known key
GROUPS = ("trainer", "data", "method", "model", "optim", "dataset", "logger")


def _fail(key: str, value, allowed: str, hint: str = "") -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: expected {allowed}" + (f". {hint}" if hint else ""))


def _check_node(prefix: str, node: dict, schema: dict, *, closed: bool) -> None:
    for k, v in node.items():
        key = f"{prefix}{k}"
        if k not in schema:
            if closed:
                near = difflib.get_close_matches(str(k), list(schema), n=1)
                raise ConfigError(
                    f"unknown setting {key}" + (f" (did you mean {prefix}{near[0]}?)" if near else "")
                    + f"; valid {prefix.rstrip('.') or 'top-level'} keys: {', '.join(sorted(schema))}")
            continue
        rule = schema[k]
        if v is None and rule.null:
            continue
        if not rule.ok(v):
            raise _fail(key, v, rule.allowed() + (" or null" if rule.null else ""))


def _check_kwargs(group: str, option: str, kwargs: dict, fn: Callable, skip: tuple[str, ...]) -> None:
    """Keys of a group's YAML (or added with +) must be parameters of the constructor they are passed to."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n not in skip and p.kind != p.VAR_POSITIONAL]
    for k in kwargs:
        if k not in valid:
            near = difflib.get_close_matches(k, valid, n=1)
            raise ConfigError(
                f"unknown setting {group}.{k} for {group}={option}"
                + (f" (did you mean {group}.{near[0]}?)" if near else "")
                + f"; {option} accepts: {', '.join(valid) or 'no settings'}")


def check(c: dict, *, augments: dict, optimizers: dict) -> None:
    """Raise ConfigError for the first setting of the resolved config `c` the run cannot use."""
    from bpfree.registry import MODELS, RULES

    top = {k: v for k, v in c.items() if k not in GROUPS}
    for k in top:
        near = difflib.get_close_matches(k, [*TOP, *GROUPS], n=1, cutoff=0.85)
        if k not in TOP and near:
            raise ConfigError(f"unknown setting {k} (did you mean {near[0]}?)")
    _check_node("", {k: v for k, v in top.items() if k in TOP}, TOP, closed=True)
    _check_node("trainer.", c["trainer"], TRAINER, closed=True)
    _check_node("data.", c["data"], DATA, closed=True)
    aug = c["data"].get("augment")
    if aug is not None and aug not in augments:
        raise _fail("data.augment", aug, "null or one of " + ", ".join(sorted(augments)))

    optim = c["optim"]
    if optim.get("name") not in optimizers:
        raise _fail("optim.name", optim.get("name"), "one of " + ", ".join(sorted(optimizers)))
    if not Float(positive=True).ok(optim.get("lr")):
        raise _fail("optim.lr", optim.get("lr"), "a number > 0")
    _check_kwargs("optim", optim["name"], {k: v for k, v in optim.items() if k not in ("name", "scheduler")},
                  optimizers[optim["name"]], skip=("params",))
    for k in ("weight_decay", "momentum"):
        if k in optim and not Float(min=0).ok(optim[k]):
            raise _fail(f"optim.{k}", optim[k], "a number >= 0")

    for group, registry, skip in (("method", RULES, ("model", "loss_fn")),
                                  ("model", MODELS, ("input_shape", "num_classes"))):
        node = c[group]
        name = node.get("name")
        if name not in registry:
            raise _fail(f"{group}.name", name, "one of " + ", ".join(registry.names()))
        _check_kwargs(group, name, {k: v for k, v in node.items() if k != "name"}, registry.get(name), skip)
