"""Shared fixtures: the offline data root and composing the real Hydra config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def data_root() -> Path:
    root = Path(os.environ.get("BPFREE_DATA", ROOT.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found under {root}: set BPFREE_DATA to the offline data folder "
                    "(../shared/data beside the checkout)")
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    return data_root()


def compose_cfg(overrides: list[str], tmp: Path | None = None):
    """The real config composed from conf/, with outputs redirected under `tmp`."""
    extra = []
    if tmp is not None:
        extra = [f"records_dir={tmp / 'records'}", f"checkpoint_dir={tmp / 'ckpt'}",
                 f"data.root={data_root()}", f"data.cache_dir={tmp / 'cache'}", "trainer.progress=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


@pytest.fixture
def compose_run(tmp_path):
    return lambda overrides: compose_cfg(overrides, tmp_path)


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))
