"""Every option of every config group composes and instantiates; every experiment composes."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bpfree.data import TEXT
from bpfree.data.nli import NLI
from bpfree.loggers import build_logger
from bpfree.models import blocks, build_model
from bpfree.rules import RULES, build_rule
from bpfree.tasks import Classification
from bpfree.train import make_optimizer
from tests.conftest import compose_cfg, config_options


def _kw(node) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}


@pytest.mark.parametrize("option", config_options("dataset"))
def test_dataset_option_composes(option):
    cfg = compose_cfg([f"dataset={option}"])
    assert cfg.dataset.name == option  # file name = option name = record name
    # images (C, H, W); translation pairs (2, max_len): source and target token ids
    assert cfg.dataset.num_classes > 1 and len(cfg.dataset.input_shape) == (2 if option in (*TEXT, *NLI) else 3)


# sequence models take token ids and emit (B, T, vocab); tests/test_translation.py covers them
SEQ_MODELS = {"transformer", "encoder"}  # encoder: token ids (N, 2, L) in; tests/test_encoder.py covers it


@pytest.mark.parametrize("option", [o for o in config_options("model") if o not in SEQ_MODELS])
def test_model_option_builds_and_exposes_blocks(option):
    cfg = compose_cfg([f"model={option}", "dataset=cifar10"])
    model = build_model(cfg.model.name, cfg.dataset.input_shape, cfg.dataset.num_classes, **_kw(cfg.model))
    assert len(blocks(model)) >= 2
    out = model(torch.randn(2, *cfg.dataset.input_shape))
    assert out.shape == (2, cfg.dataset.num_classes)
    assert torch.allclose(out.exp().sum(1), torch.ones(2), atol=1e-5)  # log-probabilities


@pytest.mark.parametrize("option", config_options("method"))
def test_method_option_builds_on_the_mlp(option):
    cfg = compose_cfg([f"method={option}"])
    assert cfg.method.name in RULES, f"conf/method/{option}.yaml names an unregistered rule"
    model = build_model("mlp", (1, 28, 28), 10)
    rule = build_rule(cfg.method.name, model, Classification(10).loss, **_kw(cfg.method))
    assert rule.param_counts()["total"] >= sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("option", config_options("optim"))
def test_optim_option_builds(option):
    cfg = compose_cfg([f"optim={option}", "model=transformer"])  # noam reads model.d_model
    opt, sched, _ = make_optimizer(torch.nn.Linear(2, 2).parameters(), cfg.optim.name, **_kw(cfg.optim))
    assert opt.param_groups[0]["initial_lr" if sched is not None else "lr"] == cfg.optim.lr


def test_multistep_scheduler_decays_at_milestones():
    opt, sched, interval = make_optimizer(torch.nn.Linear(2, 2).parameters(), "adam", lr=1.0,
                                          scheduler={"name": "multistep", "milestones": [2], "gamma": 0.1})
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert interval == "epoch" and lrs == pytest.approx([1.0, 1.0, 0.1])


@pytest.mark.parametrize("option", config_options("logger"))
def test_logger_option_composes(option):
    cfg = compose_cfg([f"logger={option}"])
    if option == "wandb":
        pytest.importorskip("wandb")
        assert cfg.logger.mode in ("offline", "online", "disabled")
        return
    build_logger(cfg.logger.name, {}, "x", **_kw(cfg.logger)).log({"a": 1.0}, 1)


@pytest.mark.parametrize("option", config_options("trainer"))
def test_trainer_option_composes(option):
    cfg = compose_cfg([f"trainer={option}"])
    assert cfg.trainer.epochs >= 1 and cfg.trainer.batch_size >= 1


@pytest.mark.parametrize("option", config_options("experiment"))
def test_experiment_composes_with_valid_sweep(option):
    cfg = compose_cfg([f"experiment={option}"], None)
    assert cfg.paper != "adhoc" and cfg.table != "adhoc", "an experiment must name its paper and table"
    assert cfg.scale in ("paper", "cpu")
    # every swept value of a config group must be an existing option of that group
    with open(f"conf/experiment/{option}.yaml") as f:
        params = (OmegaConf.load(f).get("hydra") or {}).get("sweeper", {}).get("params", {})
    for key, values in params.items():
        if key in ("dataset", "model", "method", "optim", "trainer", "logger"):
            for v in str(values).split(","):
                assert v.strip() in config_options(key), f"{option}: {key}={v} is not a conf/{key} option"
