"""Run records: one JSON per run, the single source of every table.

Path: <records_dir>/<paper>/<table>/<run_name>.json, written atomically (temp file + rename), so
an interrupted write never leaves a half record. Schema (version 1) is documented in the README.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

SCHEMA_VERSION = 1
REQUIRED = {
    "schema": int, "paper": str, "table": str, "row": str, "column": str, "name": str,
    "method": str, "model": str, "dataset": str, "seed": int, "scale": str, "status": str,
    "config": dict, "metrics": dict, "timing": dict, "env": dict, "params": dict,
}
STATUSES = ("ok", "diverged")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


def environment(device: torch.device) -> dict:
    def git(*args) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "num_threads": torch.get_num_threads(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }
