"""build(c): a resolved run config (plain dict) -> everything a run needs. The one place that turns a
config into objects, used by run.py, scripts/bench.py and the figure code, so none of them re-creates a
model by hand (and none can drift from the YAML)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bpfree.config_check import check
from bpfree.data import AUGMENTS, Splits, load_dataset
from bpfree.models import build_model
from bpfree.rules import LearningRule, build_rule
from bpfree.tasks import TASKS
from bpfree.train import OPTIMIZERS, make_optimizer

# keys of the `dataset` node that describe it rather than configure its loader
DATASET_META = ("name", "num_classes", "input_shape", "eval")
# keys of the `data` node that the loader takes (the rest configure batching/augmentation)
LOADER_KEYS = ("root", "cache_dir", "download", "subset", "test_subset", "val_split")


@dataclass
class Built:
    data: Splits
    task: object
    rule: LearningRule
    optimizer: torch.optim.Optimizer
    scheduler: object
    scheduler_interval: str
    augment: Callable | None
    device: torch.device
    engine: object = None       # bpfree.parallel.Engine when trainer.parallel is set


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validate(c: dict) -> None:
    """Refuse a bad setting before any data is loaded (bpfree/config_check.py)."""
    check(c, augments=AUGMENTS, optimizers=OPTIMIZERS)


def build_rule_for(c: dict, input_shape, num_classes: int, loss_fn, device) -> LearningRule:
    model_kw = {k: v for k, v in c["model"].items() if k != "name"}
    model = build_model(c["model"]["name"], input_shape, num_classes, **model_kw)
    method_kw = {k: v for k, v in c["method"].items() if k != "name"}
    return build_rule(c["method"]["name"], model, loss_fn, **method_kw).to(device)


def build(c: dict, data: Splits | None = None) -> Built:
    """Seed, load the data (unless given), and build task, model, rule and optimizer from config `c`."""
    validate(c)
    tr, ds = c["trainer"], c["dataset"]
    if tr["num_threads"]:
        torch.set_num_threads(tr["num_threads"])
    torch.set_flush_denormal(tr["flush_denormal"])  # process-wide; conf/trainer/default.yaml says why
    seed_everything(c["seed"], tr["deterministic"])
    device = pick_device(tr["device"])
    if data is None:
        # a dataset's own settings (text: languages, vocabulary) go to its loader; `eval` ones to its task
        options = {k: v for k, v in ds.items() if k not in DATASET_META}
        data = load_dataset(ds["name"], **{k: c["data"][k] for k in LOADER_KEYS}, **options)
    task = TASKS[data.task](ds["num_classes"], **data.extras, **(ds.get("eval") or {}))
    for split in (data.train, data.val, data.test):
        if split is not None:
            task.check(split, ds["name"])
    rule = build_rule_for(c, ds["input_shape"], ds["num_classes"], task.loss, device)
    optim_kw = {k: v for k, v in c["optim"].items() if k != "name"}
    optimizer, scheduler, interval = make_optimizer(rule.optimizer_groups(), c["optim"]["name"], **optim_kw)
    aug = c["data"]["augment"]
    augment = AUGMENTS[aug](c["data"]) if aug is not None else None
    engine = None
    if tr["parallel"] is not None:
        from bpfree.parallel import CannotStage, build_engine

        if scheduler is not None:
            raise CannotStage("trainer.parallel does not support optim.scheduler yet; use a constant lr")
        n = min(tr["batch_size"], len(data.train))
        sample = (data.train.x[:n].to(device), data.train.y[:n].to(device))
        engine = build_engine(rule, optimizer, tr["parallel"], tr["stages"], sample, tr["staleness"])
        optimizer = engine.optimizers  # the loop zeroes, checkpoints and resumes the stages' optimizers
    return Built(data, task, rule, optimizer, scheduler, interval, augment, device, engine)
