"""Hydra launcher plugins (the `launchers` extra, also in `dev`): a joblib sweep runs its jobs in parallel
local processes and writes one record each; the Slurm launcher's config composes (no cluster here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import CACHE, ROOT, data_root


def _run_py(args, tmp_path):
    env = {**os.environ, "BPFREE_DATA": str(data_root()), "BPFREE_CACHE": str(CACHE)}
    p = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_joblib_launcher_runs_two_jobs_in_parallel_processes(tmp_path):
    """Two jobs at once in joblib's (loky) worker processes; one of them spawns its own stage process
    (trainer.parallel=processes) from inside its worker."""
    out = _run_py(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.parallel=null,processes",
                   "method=al", "model=mlp1024", "model.hidden=[48,48,160,48,48]", "data.subset=128",
                   "data.test_subset=100", "trainer.epochs=1", "trainer.num_threads=1", "trainer.progress=false",
                   f"records_dir={tmp_path / 'records'}", f"checkpoint_dir={tmp_path / 'ckpt'}/${{trainer.parallel}}",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path)
    assert "Joblib.Parallel(n_jobs=2" in out  # the plugin, not the basic launcher, ran the sweep
    records = sorted((tmp_path / "records").rglob("*.json"))
    assert len(records) == 2
    recs = [json.loads(r.read_text()) for r in records]
    assert all(r["status"] == "ok" for r in recs)
    assert sorted(str(r["timing"].get("parallel", {}).get("world_size")) for r in recs) == ["2", "None"]


def test_slurm_launcher_config_composes(tmp_path):
    out = _run_py(["--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                   "hydra.launcher.timeout_min=30"], tmp_path)
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 30  # overrides reach sbatch's settings
    assert launcher["gpus_per_node"] >= 1 and launcher["tasks_per_node"] == 1
