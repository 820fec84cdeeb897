"""Slower checks (`make test-slow`): the full-size offline datasets, and every CPU-scale experiment end to
end for a few steps of its first sweep point. Not in `make test`."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bpfree.data import available, load_dataset
from bpfree.records import read_records
from run import run
from tests.conftest import CACHE, ROOT, compose_cfg, data_root

pytestmark = pytest.mark.slow

SIZES = {"mnist": (60000, 10000, 10), "fmnist": (60000, 10000, 10), "cifar10_jpeg": (50000, 10000, 10)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_full_datasets_decode_to_their_published_sizes(name):
    if not available(name, data_root()):
        pytest.skip(f"{name} is not under {data_root()}")
    s = load_dataset(name, root=str(data_root()), cache_dir=str(CACHE))
    n_train, n_test, classes = SIZES[name]
    assert (len(s.train), len(s.test)) == (n_train, n_test)
    assert set(s.train.y.unique().tolist()) == set(range(classes))
    # standardised with the training split's statistics: per-channel mean ~0, std ~1 on train
    assert abs(float(s.train.x.mean())) < 0.05 and abs(float(s.train.x.std()) - 1) < 0.05


def _cpu_experiments() -> list[str]:
    out = []
    for f in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        if (yaml.safe_load(f.read_text()) or {}).get("scale") == "cpu":
            out.append(f.stem)
    return out


def _first_point(stem: str) -> list[str]:
    params = ((yaml.safe_load((ROOT / "conf" / "experiment" / f"{stem}.yaml").read_text()) or {})
              .get("hydra", {}).get("sweeper", {}).get("params", {}))
    return [f"{k}={str(v).split(',')[0].strip()}" for k, v in params.items()]


@pytest.mark.parametrize("experiment", _cpu_experiments())
def test_every_cpu_experiment_runs_a_few_steps(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", *_first_point(experiment), "trainer.epochs=1",
                       "trainer.max_steps_per_epoch=3", "data.test_subset=64"], tmp_path)
    ds = cfg.dataset.name
    if not available(ds, data_root()):
        pytest.skip(f"{ds} is not available under {data_root()}")
    rec = run(cfg)
    assert rec["status"] == "ok" and rec["scale"] == "cpu"
    assert read_records(Path(tmp_path) / "records")
