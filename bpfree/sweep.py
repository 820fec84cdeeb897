"""Hydra callback: a multirun ends with a one-line summary, and a non-zero exit when no job trained.

Jobs return {"status": "ok" | "diverged" | "skipped", "message": ...} (run.py). Hydra hands each job's
return value to `on_job_end` in the process that ran it: with the basic (sequential) launcher and
joblib's default backend that is this one; a launcher that runs jobs elsewhere (submitit) reports none,
and then nothing is summarised.
"""
from __future__ import annotations

import sys
from collections import Counter

from hydra.experimental.callback import Callback


class MultirunSummary(Callback):
    def __init__(self) -> None:
        self.statuses: Counter = Counter()
        self.skips: list[str] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, dict) and "status" in value:
            self.statuses[value["status"]] += 1
            if value["status"] == "skipped":
                self.skips.append(value.get("message", "").split(":")[0])
        elif value is None:
            self.statuses["failed"] += 1

    def on_multirun_end(self, config, **kwargs) -> None:
        total = sum(self.statuses.values())
        if not total:
            return
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        print(f"multirun: {total} jobs: {parts}", file=sys.stderr)
        if self.statuses["skipped"] == total:
            reasons = "; ".join(sorted(set(self.skips)))
            print(f"{total} of {total} jobs skipped: {reasons}. Nothing was trained: point data.root (env "
                  "BPFREE_DATA) at the datasets' folder", file=sys.stderr)
            sys.exit(3)
