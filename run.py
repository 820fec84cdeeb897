"""bpfree's entry point: compose the config, build data/model/rule/optimizer, fit, write the record.

    python run.py                                   # backprop, seed MLP, MNIST
    python run.py method=bp model=mlp dataset=fmnist trainer.epochs=3
    python run.py -m experiment=ag_table1           # a paper table's sweep (hydra multirun)

Only this file touches the DictConfig; everything below it takes plain arguments.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import sys
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bpfree.data import DatasetUnavailable, jitter, load_dataset
from bpfree.loggers import build_logger
from bpfree.models import build_model
from bpfree.records import SCHEMA_VERSION, environment, record_path, summarize, write_record
from bpfree.rules import build_rule
from bpfree.tasks import TASKS
from bpfree.train import fit, make_optimizer


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


# settings a resumed run may change without changing what it trains (more epochs; how it is watched)
RESUMABLE_TOP = ("logger", "records_dir", "checkpoint_dir")
RESUMABLE_TRAINER = ("epochs", "resume", "progress", "num_threads", "device")


def config_fingerprint(c: dict) -> str:
    """Hash of the resolved config minus the RESUMABLE_* keys: a checkpoint resumes only into its own config."""
    kept = {k: v for k, v in c.items() if k not in RESUMABLE_TOP}
    kept["trainer"] = {k: v for k, v in c["trainer"].items() if k not in RESUMABLE_TRAINER}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(cfg: DictConfig) -> dict:
    """Train one configuration and write its record; returns the record."""
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    tr, ds = c["trainer"], c["dataset"]
    if tr["num_threads"]:
        torch.set_num_threads(tr["num_threads"])
    seed_everything(c["seed"], tr["deterministic"])
    device = pick_device(tr["device"])

    # a dataset's own settings (text: languages, vocabulary) go to its loader; `eval` ones to its task
    options = {k: v for k, v in ds.items() if k not in ("name", "num_classes", "input_shape", "eval")}
    data = load_dataset(ds["name"], **{k: c["data"][k] for k in ("root", "cache_dir", "download", "subset", "test_subset", "val_split")},
                        **options)
    task = TASKS[data.task](ds["num_classes"], **data.extras, **(ds.get("eval") or {}))
    for split in (data.train, data.val, data.test):
        if split is not None:
            task.check(split, ds["name"])

    model_kw = {k: v for k, v in c["model"].items() if k != "name"}
    model = build_model(c["model"]["name"], ds["input_shape"], ds["num_classes"], **model_kw)
    method_kw = {k: v for k, v in c["method"].items() if k != "name"}
    rule = build_rule(c["method"]["name"], model, task.loss, **method_kw).to(device)
    optim_kw = {k: v for k, v in c["optim"].items() if k != "name"}
    optimizer, scheduler, interval = make_optimizer(rule.optimizer_groups(), c["optim"]["name"], **optim_kw)
    logger = build_logger(c["logger"]["name"], c, c["run_name"],
                          **{k: v for k, v in c["logger"].items() if k != "name"})
    augment = None
    if c["data"]["augment"] == "jitter":
        augment = lambda x: jitter(x, c["data"]["jitter"])  # noqa: E731
    elif c["data"]["augment"] is not None:
        raise ValueError(f"unknown data.augment {c['data']['augment']!r}; valid: null, jitter")

    started = time.time()
    result = fit(
        rule, task, data, optimizer, scheduler, scheduler_interval=interval,
        epochs=tr["epochs"], batch_size=tr["batch_size"], eval_batch_size=tr["eval_batch_size"],
        seed=c["seed"], device=device, checkpoint_path=c["checkpoint_dir"], resume=tr["resume"],
        fingerprint=config_fingerprint(c), progress=tr["progress"], check_every=tr["check_every"],
        probe_size=tr["probe_size"],
        max_steps_per_epoch=tr["max_steps_per_epoch"], augment=augment,
        on_epoch=lambda e: logger.log({k: v for k, v in e.items() if k != "epoch"}, e["epoch"]),
    )
    metrics = summarize(result.per_epoch, task.metrics)
    if result.status == "ok" and hasattr(task, "final"):
        # tasks scored once on a selected checkpoint (translation: decode + BLEU/METEOR/COMET) add
        # those scores to `final`; `selected` says which epoch they come from
        metrics["final"] |= task.final(rule, data, tr["eval_batch_size"])
        metrics["selected"] = result.extras
    record = {
        "schema": SCHEMA_VERSION,
        "paper": c["paper"], "table": c["table"], "row": str(c["row"]), "column": str(c["column"]),
        "name": c["run_name"], "method": c["method"]["name"], "model": c["model"]["name"],
        "dataset": ds["name"], "dataset_note": data.note, "seed": c["seed"], "scale": c["scale"],
        "status": result.status, "message": result.message,
        "config": c,
        "metrics": metrics,
        "params": rule.param_counts(),
        "timing": {
            "train_seconds": result.train_seconds,
            "samples_per_second": result.samples_seen / result.train_seconds if result.train_seconds else 0.0,
            "wall_seconds_this_process": time.time() - started,
            "resumed_from_epoch": result.resumed_from_epoch,
        },
        "env": environment(device),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_record(record, record_path(c["records_dir"], c["paper"], c["table"], c["run_name"]))
    logger.finish(record["metrics"]["best"])
    best = record["metrics"]["best"].get(task.primary, record["metrics"]["final"].get(task.primary))
    print(f"record: {path}")
    print(f"status: {result.status}; best {task.primary}: {best if best is None else f'{best:.4f}'}; "
          f"final {task.primary}: {record['metrics']['final'].get(task.primary)}")
    return record


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        run(cfg)
    except DatasetUnavailable as e:
        # In a sweep, a missing dataset skips that job (its table cell says so); alone, it is an error.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"skipped: {e}", file=sys.stderr)
            return
        raise SystemExit(f"error: {e}")
    except (KeyError, ValueError, TypeError) as e:
        # configuration mistakes (unknown option, shape mismatch) read best as one line; a bug
        # hiding behind the same types still shows its traceback with HYDRA_FULL_ERROR=1
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {e.args[0] if e.args else e}\n(set HYDRA_FULL_ERROR=1 for the traceback)")


if __name__ == "__main__":
    main()
