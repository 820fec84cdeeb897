"""Every experiment file trains for a couple of steps and writes a valid record (lightning-hydra-template's
`experiment=glob(*)` smoke test), with each swept parameter at its first value."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from bpfree.data import TEXT, available
from bpfree.records import validate
from run import run
from tests.conftest import CONF, compose_cfg, config_options, data_root

SMOKE = ["data.subset=64", "data.test_subset=64", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
         "trainer.eval_batch_size=64", "trainer.probe_size=32"]


TEXT_SMOKE = ["dataset.vocab_size=300", "dataset.eval.beam_size=1", "dataset.eval.max_len_a=0.5",
              "model.d_model=32", "model.heads=2", "model.ff=64"]


@pytest.mark.parametrize("option", config_options("experiment"))
def test_experiment_runs_two_steps(option, tmp_path):
    params = (OmegaConf.load(CONF / "experiment" / f"{option}.yaml").get("hydra") or {}).get("sweeper", {})
    first = [f"{k}={str(v).split(',')[0].strip()}" for k, v in (params.get("params") or {}).items()]
    cfg = compose_cfg([f"experiment={option}", *first, *SMOKE], tmp_path)
    if cfg.dataset.name in TEXT:  # a paper-size transformer decoding with beam 5 takes minutes on CPU
        cfg = compose_cfg([f"experiment={option}", *first, *SMOKE, *TEXT_SMOKE], tmp_path)
    if not available(cfg.dataset.name, data_root()):
        pytest.skip(f"{cfg.dataset.name} is not available offline (its loader is tested on generated files)")
    rec = validate(run(cfg))
    assert rec["paper"] == cfg.paper and rec["status"] in ("ok", "diverged")
