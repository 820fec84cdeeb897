"""bpfree's entry point: compose the config, build data/model/rule/optimizer, fit, write the record.

    python run.py                                   # backprop, seed MLP, MNIST
    python run.py method=bp model=mlp dataset=fmnist trainer.epochs=3
    python run.py -m experiment=ag_table1           # a paper table's sweep (hydra multirun)

Only this file touches Hydra and the DictConfig; everything below it takes plain arguments.
Where a record goes (README "Run records"): an experiment at its own settings writes the committed
results/records/; any other run (a smoke run, an override, no experiment) writes the ignored runs/.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from bpfree.build import build, pick_device, validate
from bpfree.data import DatasetUnavailable
from bpfree.distributed import in_stage_group, serve_stage, stage_processes
from bpfree.loggers import build_logger
from bpfree.records import (Identity, check_replaceable, config_fingerprint, holds_a_run, identify, make_record,
                            record_path, summarize, write_record)
from bpfree.train import fit

COMMITTED, ADHOC = "results", "runs"  # results/records (tables read it) vs runs/records (ignored)


def place(c: dict, ident: Identity) -> None:
    """Fill in run_name, records_dir and checkpoint_dir where the config leaves them null."""
    c["run_name"] = c["run_name"] + (f"-{ident.suffix}" if ident.suffix else "")
    base = COMMITTED if ident.official else ADHOC
    if c["records_dir"] is None:
        c["records_dir"] = f"{base}/records"
    if c["checkpoint_dir"] is None:
        c["checkpoint_dir"] = str(Path("checkpoints" if ident.official else f"{ADHOC}/checkpoints")
                                  / c["paper"] / c["table"] / c["run_name"])


def record_unavailable(c: dict, path: Path, error: DatasetUnavailable) -> None:
    """A sweep job whose data is missing leaves a record saying so (status 'unavailable'), so its table
    cell reads the same wherever the table is rendered; it never replaces a record of a run that trained."""
    if holds_a_run(path):
        return
    name = c["dataset"]["name"]
    write_record(make_record(
        c, note="", status="unavailable", device=pick_device("cpu"), params={},
        message=f"dataset {name!r} was not available where this sweep ran (offline here: see README 'Datasets')",
        metrics={"final": {}, "best": {}, "per_epoch": []},
        timing={"train_seconds": 0.0, "samples_per_second": 0.0}), path)


def run(cfg: DictConfig, ident: Identity | None = None, in_sweep: bool = False) -> dict:
    """Train one configuration and write its record; returns the record. `ident` is what the command
    line said (main() derives it from Hydra); without it the run is ad hoc and keeps its given name.
    In a sweep (`in_sweep`), missing data writes an 'unavailable' record before DatasetUnavailable rises."""
    scales = cfg.get("scales")
    if scales is not None and cfg.scale not in scales:
        raise ValueError(f"scale={cfg.scale!r}: this experiment declares budgets for {', '.join(scales)} only "
                         f"(its `scales:` node); pick one of those, or give the budget (trainer.epochs=N)")
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    ident = ident or Identity()
    place(c, ident)
    validate(c)  # before anything is loaded: a bad setting costs nothing
    path = record_path(c["records_dir"], c["paper"], c["table"], c["run_name"])
    check_replaceable(path, c)  # before training: a conflict costs no compute
    if c["trainer"]["parallel"] == "processes" and not in_stage_group():
        with stage_processes(c) as rank:  # one process per stage: spawned here, or joined under torchrun
            return run(cfg, ident, in_sweep) if rank == 0 else serve_stage(c)  # rank 0 trains and records
    if not ident.official and Path(c["records_dir"]).parts[:1] == (COMMITTED,):
        print(f"note: writing an ad-hoc run into {c['records_dir']} because records_dir says so")
    elif not ident.official and ident.why_not:
        print(f"ad-hoc run ({'; '.join(ident.why_not[:3])}): record -> {path}")
    tr = c["trainer"]
    try:
        b = build(c)
    except DatasetUnavailable as e:
        if in_sweep:
            record_unavailable(c, path, e)
        raise
    logger = build_logger(c["logger"]["name"], c, c["run_name"],
                          **{k: v for k, v in c["logger"].items() if k != "name"})
    started = time.time()
    result = fit(
        b.rule, b.task, b.data, b.optimizer, b.scheduler, scheduler_interval=b.scheduler_interval,
        epochs=tr["epochs"], batch_size=tr["batch_size"], eval_batch_size=tr["eval_batch_size"],
        seed=c["seed"], device=b.device, checkpoint_path=c["checkpoint_dir"], resume=tr["resume"],
        fingerprint=config_fingerprint(c), progress=tr["progress"], check_every=tr["check_every"],
        probe_size=tr["probe_size"],
        max_steps_per_epoch=tr["max_steps_per_epoch"], augment=b.augment,
        on_epoch=lambda e: logger.log({k: v for k, v in e.items() if k != "epoch"}, e["epoch"]),
        engine=b.engine,
    )
    metrics = summarize(result.per_epoch, b.task.metrics)
    if result.status == "ok":
        # tasks scored once on a selected checkpoint (translation: decode + BLEU/METEOR/COMET) add
        # those scores to `final`; `selected` says which epoch they come from
        metrics["final"] |= b.task.final(b.rule, b.data, tr["eval_batch_size"])
        if result.extras:
            metrics["selected"] = result.extras
    record = make_record(
        c, note=b.data.note, status=result.status, message=result.message, metrics=metrics,
        params=b.rule.param_counts(), device=b.device,
        timing={
            "train_seconds": result.train_seconds,
            "samples_per_second": result.samples_seen / result.train_seconds if result.train_seconds else 0.0,
            "wall_seconds_this_process": time.time() - started,
            "resumed_from_epoch": result.resumed_from_epoch,
            **({"parallel": b.engine.describe()} if b.engine is not None else {}),  # backend, stages, world size
        })
    path = write_record(record, path)
    logger.finish(record["metrics"]["best"])
    if result.status == "ok" and not tr["keep_checkpoints"] and c["checkpoint_dir"]:
        shutil.rmtree(c["checkpoint_dir"], ignore_errors=True)  # the record is written; resume is moot
    primary = b.task.primary
    best = record["metrics"]["best"].get(primary, record["metrics"]["final"].get(primary))
    print(f"record: {path}")
    print(f"status: {result.status}; best {primary}: {best if best is None else f'{best:.4f}'}; "
          f"final {primary}: {record['metrics']['final'].get(primary)}")
    return record


def _identity(cfg: DictConfig) -> Identity:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    params = OmegaConf.to_container(hc.sweeper.params, resolve=False) if hc.sweeper.get("params") else {}
    return identify(list(hc.overrides.task), params, scales=tuple(cfg.get("scales") or ()))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return {"status": run(cfg, _identity(cfg), in_sweep=multirun)["status"]}
    except DatasetUnavailable as e:
        # In a sweep, a missing dataset skips that job (its table cell says so); alone, it is an error.
        if multirun:
            print(f"skipped: {e}", file=sys.stderr)
            return {"status": "skipped", "message": str(e)}
        raise SystemExit(f"error: {e}")
    except (KeyError, ValueError, TypeError) as e:
        # configuration mistakes (unknown option, shape mismatch) read best as one line; a bug
        # hiding behind the same types still shows its traceback with HYDRA_FULL_ERROR=1
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {e.args[0] if e.args else e}\n(set HYDRA_FULL_ERROR=1 for the traceback)")


if __name__ == "__main__":
    main()
