"""Slower checks (`make test-slow`): the full-size offline datasets, and a full epoch at full size. Not in
`make test`."""
from __future__ import annotations

from pathlib import Path

import pytest
from bpfree.data import available, load_dataset
from bpfree.records import read_records
from run import run
from tests.conftest import CACHE, compose_cfg, data_root

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


def test_a_full_epoch_on_full_mnist_learns(tmp_path):
    """One full epoch of the seed MLP on all 60000 training images (the fast suite uses subsets; every
    experiment's two-step run is tests/test_experiments.py)."""
    rec = run(compose_cfg(["trainer.epochs=1", "optim.lr=1e-3"], tmp_path))
    assert rec["status"] == "ok" and rec["metrics"]["best"]["test_acc"] > 0.95
    assert rec["timing"]["samples_per_second"] > 0 and read_records(Path(tmp_path) / "records")
