"""Run records: one JSON per run, the single source of every table.

Path: <records_dir>/<paper>/<table>/<run_name>.json, written atomically (temp file + rename), so
an interrupted write never leaves a half record. Schema (version 1) is documented in the README.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bpfree import atomic

SCHEMA_VERSION = 1
REQUIRED = {
    "schema": int, "paper": str, "table": str, "row": str, "column": str, "name": str,
    "method": str, "model": str, "dataset": str, "seed": int, "scale": str, "status": str,
    "config": dict, "metrics": dict, "timing": dict, "env": dict, "params": dict,
}
# unavailable: a sweep job whose dataset was not there; its record says so, so a table's empty cell reads
# the same on every machine (it never looks at the renderer's filesystem)
STATUSES = ("ok", "diverged", "unavailable")


def record_path(records_dir, paper: str, table: str, name: str) -> Path:
    return Path(records_dir) / paper / table / f"{name}.json"


def validate(record: dict) -> dict:
    problems = [f"missing {k!r}" for k in REQUIRED if k not in record]
    problems += [
        f"{k!r} should be {t.__name__}, got {type(record[k]).__name__}"
        for k, t in REQUIRED.items() if k in record and not isinstance(record[k], t)
    ]
    if not problems:
        if record["status"] not in STATUSES:
            problems.append(f"status {record['status']!r} not in {STATUSES}")
        m = record["metrics"]
        for k in ("final", "best", "per_epoch"):
            if k not in m:
                problems.append(f"metrics.{k} missing")
        for k in ("train_seconds", "samples_per_second"):
            if k not in record["timing"]:
                problems.append(f"timing.{k} missing")
        for k in ("torch", "device", "git_commit"):
            if k not in record["env"]:
                problems.append(f"env.{k} missing")
    if problems:
        raise ValueError(f"invalid run record {record.get('name', '?')}: " + "; ".join(problems))
    return record


def write_record(record: dict, path: Path) -> Path:
    validate(record)
    path = Path(path)
    with atomic.replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash then leaves the old record or the new
    return path


def read_records(records_dir) -> list[dict]:
    out = []
    for p in sorted(Path(records_dir).rglob("*.json")):
        with open(p) as f:
            out.append(validate(json.load(f)))
    return out


def summarize(per_epoch: list[dict], directions: dict[str, str]) -> dict:
    """final = last epoch's values; best = max/min over epochs for the task's metrics."""
    if not per_epoch:
        return {"final": {}, "best": {}, "per_epoch": []}
    final = {k: v for k, v in per_epoch[-1].items() if k != "epoch"}
    best = {}
    for k, how in directions.items():
        vals = [e[k] for e in per_epoch if k in e]
        if vals:
            best[k] = max(vals) if how == "max" else min(vals)
    return {"final": final, "best": best, "per_epoch": per_epoch}


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# The code a run executes is the code this process imported, so the commit is read once, at import (a
# record written hours later, after the checkout moved on, must still name the commit that ran).
_CODE = {"git_commit": _git("rev-parse", "HEAD"),
         "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "num_threads": torch.get_num_threads(),
        **_CODE,
    }


# --- Which run a record belongs to: its name, where it goes, when it may replace another -------------

# Settings a run may change without changing what it trains: how long (a resumed run continues with more
# epochs), how it is watched, and where it writes. They are left out of a record's name, of the resume
# fingerprint and of the "same configuration?" test below. BUDGET is the part that says how long.
BUDGET = ("trainer.epochs", "scales")  # scales: an experiment's budget per scale (conf/scale/)
# trainer.flush_denormal is how the CPU computes (as num_threads and device are): it only zeroes values
# below 1.2e-38, so a run started before it existed resumes with it and keeps its name
RESUMABLE = (*BUDGET, "trainer.resume", "trainer.progress", "trainer.num_threads", "trainer.device",
             "trainer.flush_denormal",
             "trainer.keep_checkpoints", "logger", "records_dir", "checkpoint_dir", "run_name",
             # where the (checksummed) data is read from and cached, not what it is
             "data.root", "data.cache_dir", "data.download")
# keys shown by the base name itself (conf/config.yaml run_name) or naming the experiment
NAMED = ("method", "model", "dataset", "seed", "scale", "experiment")


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def _excluded(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE) or key == "hydra" or key.startswith("hydra.")


# Settings added to the suite after checkpoints were written, with the value every run had before they
# existed (the behaviour they name, not a second copy of the YAML's default): at that value they are left
# out of the fingerprint, so a run started before they were added still resumes.
ADDED_LATER = {"trainer.staleness": None, "trainer.dist_backend": "auto"}


def config_fingerprint(c: dict) -> str:
    """Hash of the resolved config minus the RESUMABLE keys: a checkpoint resumes only into its own config."""
    kept = {k: v for k, v in _flat(c).items()
            if not _excluded(k) and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting the two resolved configs both have and set differently,
    RESUMABLE keys (the budget among them) aside. Keys only one side has are settings added to the suite
    after the older record was written; they are not compared."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if not _excluded(k) and a[k] != b[k]]


def _override_key(o: str) -> tuple[str, str]:
    key, _, value = o.lstrip("+~").partition("=")
    return key, value


def _same_value(a: str, b: str) -> bool:
    """Hydra's sweeper renders each swept number its own way (`1e-4` in the YAML reaches the job as
    `method.decay=0.0001`), so numbers compare by value; anything else by its text."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _in_grid(value: str, grid) -> bool:
    """Whether a swept value is one of a sweeper's `params` entry (a comma list such as 'bp,fa,kp')."""
    options = [str(g).strip() for g in grid] if isinstance(grid, (list, tuple)) else str(grid).split(",")
    return any(_same_value(value.strip(), o.strip()) for o in options)


@dataclass
class Identity:
    """What the command line says about a run: the overrides its name must show, and whether it is an
    experiment at its own settings (the only runs that may write the committed results/records)."""
    suffix: str = ""          # appended to the base run name; "" when nothing beyond the name was changed
    official: bool = False
    why_not: list[str] = field(default_factory=list)  # what made it ad hoc (for the message)


def identify(overrides: list[str], sweep_params: dict | None, scales: tuple[str, ...] = ()) -> Identity:
    """`overrides`: the job's command-line overrides (Hydra's `hydra.overrides.task`, which in a multirun
    include the swept values); `sweep_params`: the experiment's own `hydra.sweeper.params`.

    - The name gets every override that neither the base name shows (NAMED) nor the experiment sweeps
      (its run_name shows those; tests/test_reliability.py checks every experiment's grid has unique
      names), nor is RESUMABLE; so two configurations never share a record or a checkpoint.
    - Official = an experiment was chosen and every other override is one of its own sweep values, a seed,
      or RESUMABLE other than the budget (`trainer.epochs=1` on an experiment is a smoke run), or a
      `scale=` the experiment declares a budget for (`scales`: the keys of its `scales:` node).
    """
    sweep_params = dict(sweep_params or {})
    keys = [_override_key(o) for o in overrides]
    shown, why_not = [], []
    experiment = any(k == "experiment" for k, _ in keys)
    if not experiment:
        why_not.append("no experiment= was chosen")
    for (k, v), raw in zip(keys, overrides):
        if k in BUDGET:  # not in the name (a longer run continues the same one), but not the experiment's
            why_not.append(f"{raw} changes the experiment's budget")
            continue
        if k.startswith("hydra.") or _excluded(k):
            continue
        if k in sweep_params:
            if not _in_grid(v, sweep_params[k]):
                why_not.append(f"{k}={v} is outside the experiment's sweep ({sweep_params[k]})")
                shown.append(raw)
            continue
        if k == "scale" and v in scales:  # the experiment's own budget at that scale
            continue
        if k in NAMED:
            if k not in ("seed", "experiment") and experiment:
                why_not.append(f"{raw} changes the experiment's {k}")
            continue
        shown.append(raw)
        why_not.append(f"{raw} is not one of the experiment's settings")
    suffix = ""
    if shown and not any(k == "run_name" for k, _ in keys):  # a name the user chose is used as given
        text = ",".join(sorted(shown))
        readable = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")[:60]
        # the hash keeps names distinct where the readable part is cut or two values map to one spelling
        suffix = f"{readable}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
    return Identity(suffix, experiment and not why_not, why_not)


class RecordConflict(ValueError):
    """A record for a different configuration is already at the path this run would write."""


def holds_a_run(path: Path) -> bool:
    """Whether the record at `path` is of a run that trained (ok or diverged): an 'unavailable' record
    must never replace it (a sweep on a machine without the data would erase the results)."""
    try:
        with open(path) as f:
            return json.load(f).get("status") in ("ok", "diverged")
    except (OSError, json.JSONDecodeError):
        return False


def check_replaceable(path: Path, c: dict) -> None:
    """Refuse to overwrite a record of another configuration (before training, so no compute is lost).
    The same configuration with another budget (more epochs) may replace it: that is a longer run of the
    same cell, not a different one."""
    path = Path(path)
    if not path.exists():
        return
    try:
        with open(path) as f:
            held = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordConflict(f"{path} exists but cannot be read ({e}); move it away before rerunning") from e
    if held.get("status") == "unavailable":
        return  # a note that the data was missing holds no results: any run may take its place
    diff = config_differences(held.get("config") or {}, c)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise RecordConflict(
            f"{path} holds the record of a different configuration ({shown}). It is never overwritten: "
            f"give this run its own run_name=..., or records_dir=runs/records, or move that record away")


def make_record(c: dict, *, note: str, status: str, message: str, metrics: dict, params: dict,
                timing: dict, device) -> dict:
    """The schema-1 record of a run of resolved config `c` (README "Run records" documents each key)."""
    import datetime as dt

    return {
        "schema": SCHEMA_VERSION,
        "paper": c["paper"], "table": c["table"], "row": str(c["row"]), "column": str(c["column"]),
        "name": c["run_name"], "method": c["method"]["name"], "model": c["model"]["name"],
        "dataset": c["dataset"]["name"], "dataset_note": note, "seed": c["seed"], "scale": c["scale"],
        "status": status, "message": message,
        "config": c,
        "metrics": metrics,
        "params": params,
        "timing": timing,
        "env": environment(device),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
