"""fit(): the one training loop. It knows only the LearningRule interface, never the rule's name."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from bpfree import atomic
from bpfree.data import Splits
from bpfree.rules import LearningRule


@dataclass
class FitResult:
    status: str                 # "ok" | "diverged"
    per_epoch: list[dict]
    train_seconds: float        # optimisation time only (evaluation excluded)
    samples_seen: int
    message: str = ""
    resumed_from_epoch: int = 0
    extras: dict = field(default_factory=dict)


# optim.name options (conf/optim/*.yaml); their other keys are these constructors' keyword arguments
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "rmsprop": torch.optim.RMSprop}


def make_optimizer(params, name: str, lr: float, scheduler=None, **kw):
    """Returns (optimizer, scheduler or None, scheduler interval 'epoch'|'step')."""
    kinds = OPTIMIZERS
    if name not in kinds:
        raise ValueError(f"unknown optim.name {name!r}; valid: {sorted(kinds)}")
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    opt = kinds[name](params, lr=lr, **kw)
    if scheduler is None:
        return opt, None, "epoch"
    sched = dict(scheduler)
    kind = sched.pop("name")
    interval = sched.pop("interval", "epoch")
    if kind == "multistep":
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, **sched), interval
    if kind == "noam":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, noam(**sched)), interval
    raise ValueError(f"unknown optim.scheduler.name {kind!r}; valid: ['multistep', 'noam']")


def noam(d_model: int, warmup: int):
    """Vaswani et al. §5.3: lr = base_lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5); step it
    per batch (interval: step). base_lr (optim.lr) is OpenNMT's learning_rate factor (2.0)."""
    if warmup < 1:
        raise ValueError(f"noam warmup must be >= 1 step, got {warmup}")

    def factor(step: int) -> float:
        step = max(step, 1)  # LambdaLR asks for step 0 at construction
        return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)

    return factor


def _staged_epoch(engine, batches_iter, max_steps):
    """Adapt an engine epoch to the loop's (x, y) iteration: yields (None, (batch size, scalars))."""
    sizes = []

    def first_inputs():
        for x, y in batches_iter:
            sizes.append(len(y))
            yield (x, None, y)

    for n, scalars in zip(sizes, engine.run_epoch(first_inputs(), max_steps)):
        yield None, (n, scalars)


def fit(
    rule: LearningRule,
    task,
    data: Splits,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    scheduler_interval: str = "epoch",
    epochs: int,
    batch_size: int,
    eval_batch_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    fingerprint: str | None = None,
    progress: bool = True,
    check_every: int = 50,
    probe_size: int = 256,
    max_steps_per_epoch: int | None = None,
    augment: Callable | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    engine=None,
) -> FitResult:
    """`engine` (bpfree.parallel.Engine, trainer.parallel): run each epoch's steps through a staged rule's
    stages (the optimizer is then the engine's per-stage optimizers); otherwise rule.train_step per batch."""
    device = torch.device(device)
    train, test = data.train.to(device), data.test.to(device)
    val = data.val.to(device) if data.val is not None else None
    # tasks may batch their own way (translation: length buckets); bpfree.tasks.Task documents the contract
    batch_fn = task.batches
    # tasks that score one chosen epoch (translation: lowest validation loss) name the metric here
    select = task.select
    best_state, best_value, best_epoch = None, None, 0
    best_ckpt = Path(checkpoint_path) / "best.pt" if checkpoint_path else None
    # fixed held-out batch for the rule's per-epoch diagnostics (alignment with the true gradient, ...)
    probe_x, probe_y = test.x[:probe_size], test.y[:probe_size]
    history: list[dict] = []
    train_seconds, samples, start_epoch = 0.0, 0, 0
    ckpt = Path(checkpoint_path) / "last.pt" if checkpoint_path else None

    rule.prepare(train, test)  # per-example state is sized before a resume loads it
    want_idx = {"with_index": True} if rule.wants_indices else {}
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if fingerprint is not None and state.get("fingerprint") not in (None, fingerprint):
            # resuming another configuration's weights would write a record that no config produced
            raise ValueError(
                f"{ckpt} was written by a different configuration than this run's; delete it, or set "
                f"trainer.resume=false (start over) or another run_name / checkpoint_dir")
        rule.load_state_dict(state["rule"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        history, train_seconds, samples = state["history"], state["train_seconds"], state["samples"]
        start_epoch = state["epoch"]
        best_value, best_epoch = state.get("best_value"), state.get("best_epoch", 0)
        if best_epoch and best_epoch == start_epoch:  # the best weights are last.pt's own (no best.pt)
            best_state = {k: t.detach().to("cpu", copy=True) for k, t in state["rule"].items()}
        elif best_epoch and best_ckpt is not None and best_ckpt.exists():
            best_state = torch.load(best_ckpt, map_location="cpu", weights_only=False)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        print(f"resumed from {ckpt} at epoch {start_epoch}/{epochs}")

    for epoch in range(start_epoch, epochs):
        rule.train()
        sums: dict[str, torch.Tensor] = {}
        n_batches, bad = 0, None
        t0 = time.perf_counter()
        it = batch_fn(train, batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment, **want_idx)
        total = math.ceil(len(train) / batch_size)
        if max_steps_per_epoch:
            total = min(total, max_steps_per_epoch)
        bar = tqdm(it, total=total, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        steps = bar
        if engine is not None:
            # the whole epoch runs through the stages first (a pipeline has no per-step join); its steps'
            # scalars then pass through the same accounting and NaN checks
            steps = _staged_epoch(engine, bar, max_steps_per_epoch)
        for step, (x, y, *idx) in enumerate(steps):  # idx: each example's row, for rules that want it
            if max_steps_per_epoch and step >= max_steps_per_epoch:
                break
            out = y if engine is not None else (  # staged: (n, scalars)
                rule.train_step(x, y, optimizer, idx=idx[0]) if idx else rule.train_step(x, y, optimizer))
            if engine is not None:
                n_y, out = out
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            n_batches += 1
            samples += n_y if engine is not None else len(y)
            if scheduler is not None and scheduler_interval == "step":
                scheduler.step()
            if (step + 1) % check_every == 0:
                # the task `loss`, and any objective a rule reports beside it (`local_loss`, `hidden_loss`, ...;
                # a pipelined AL stage has no task loss mid-step)
                losses = {k: float(v) for k, v in out.items() if k == "loss" or k.endswith("_loss")}
                nonfinite = [k for k, v in losses.items() if not math.isfinite(v)]
                if nonfinite:
                    bad = f"{nonfinite[0]} became {losses[nonfinite[0]]} at epoch {epoch + 1}, step {step + 1}"
                    break
                if "loss" in losses:
                    bar.set_postfix(loss=f"{losses['loss']:.4f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        means = {f"train_{k}": float(v) / max(n_batches, 1) for k, v in sums.items()}
        mean_losses = {k: v for k, v in means.items() if k.endswith("_loss")}  # train_loss, train_local_loss, ...
        nonfinite = [k for k, v in mean_losses.items() if not math.isfinite(v)]
        if bad is None and nonfinite:
            bad = f"mean {nonfinite[0]} of epoch {epoch + 1} is {mean_losses[nonfinite[0]]}"
        if bad is not None:
            msg = (f"diverged: {bad}. Lower optim.lr, or check the inputs; "
                   "the epochs before it are kept in the record")
            print(msg)
            return FitResult("diverged", history, train_seconds, samples, msg, start_epoch)

        rule.eval()
        drop_best = False
        metrics = task.evaluate(rule.predict, test, eval_batch_size)
        if val is not None:
            metrics |= {"val_" + k.removeprefix("test_"): v
                        for k, v in task.evaluate(rule.predict, val, eval_batch_size).items()}
        if select is not None:
            key, how = select
            v = metrics[key]
            if best_value is None or (v < best_value if how == "min" else v > best_value):
                best_value, best_epoch = v, epoch + 1
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in rule.state_dict().items()}
                # last.pt (below) holds these very weights: a best.pt beside it would be a second copy
                # (a transformer's is hundreds of MB); it is written only once last.pt moves past the best,
                # and an older one is removed only after last.pt holds the new best (a kill in between
                # must not lose the best weights)
                drop_best = best_ckpt is not None and best_ckpt.exists()
            elif best_ckpt is not None and not best_ckpt.exists() and best_state is not None:
                atomic.torch_save(best_state, best_ckpt)
        diag = rule.diagnostics(probe_x, probe_y)
        entry = {"epoch": epoch + 1, **means, **metrics, **diag,
                 "epoch_train_seconds": time.perf_counter() - t0}
        history.append(entry)
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        shown = ", ".join(f"{k}={v:.4f}" for k, v in entry.items() if k != "epoch" and isinstance(v, float))
        print(f"epoch {epoch + 1}/{epochs}: {shown}", flush=True)
        if ckpt is not None:
            atomic.torch_save({
                "rule": rule.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch + 1, "history": history, "train_seconds": train_seconds,
                "samples": samples, "rng_cpu": torch.get_rng_state(),
                "best_value": best_value, "best_epoch": best_epoch,
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "fingerprint": fingerprint,
            }, ckpt)
            if drop_best:
                best_ckpt.unlink()
        if on_epoch is not None:
            on_epoch(entry)
    extras = {}
    if best_state is not None:  # score the selected epoch's weights, not the last ones
        rule.load_state_dict(best_state)
        extras = {"selected_epoch": best_epoch, f"selected_{select[0]}": best_value}
    return FitResult("ok", history, train_seconds, samples, "", start_epoch, extras)
