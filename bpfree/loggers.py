"""Optional experiment loggers (`logger=none|wandb`). The record on disk is always written; a logger
is only a live view of the per-epoch metrics."""
from __future__ import annotations


class NoLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class WandbLogger:
    def __init__(self, config: dict, run_name: str, project: str = "bpfree", entity=None, mode: str = "offline"):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logger=wandb needs wandb: pip install -e '.[wandb]'") from e
        self._run = wandb.init(project=project, entity=entity, mode=mode, name=run_name, config=config)

    def log(self, metrics: dict, step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        self._run.summary.update(summary)
        self._run.finish()


def build_logger(name: str, config: dict, run_name: str, **kw):
    if name == "none":
        return NoLogger()
    if name == "wandb":
        return WandbLogger(config, run_name, **kw)
    raise ValueError(f"unknown logger {name!r}; valid: ['none', 'wandb']")
