"""The learning-rule interface: how a model learns.

The training loop knows only `train_step`, `predict`, `diagnostics`, `param_counts` and the
nn.Module protocol (state_dict, .to, .train/.eval). It never asks which rule it is running.

- Rules that only change how gradients flow (feedback alignment, Kolen-Pollack, abstraction
  matrices) keep the default step and rewire the backward pass at construction (autograd Functions,
  hooks on `model.blocks`).
- Rules with local losses or extra modules (target propagation, associated learning, synthetic
  gradients, auxiliary activations) override `compute_grads` (and `predict` where inference
  differs; `train_step` only to add work around the fixed sequence) and hold their extra modules as
  submodules, so `.to(device)`, `state_dict()` and checkpoints cover them.

The `loss` contract: `train_step` returns `loss` = the TASK loss, `loss_fn(predict(x), y)`, of the
rule's own prediction for this batch, in training mode, with the weights before the step (a rule
that measures it partly after the step sets `loss_straddles_step`; tests/test_contracts.py checks it
for every registered rule). Local objectives (layer, inverse,
associated, auxiliary, synthesizer losses) go under keys of their own (`layer_loss`, `local_loss`, `assoc{i}`, `hidden_loss`, ...), so
`train_loss` and the loop's NaN check mean the same for every rule.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class UnsupportedModel(TypeError):
    """Raised at construction by a rule that cannot train the given model; the message names the
    model and what the rule needs (e.g. 'tp needs a model whose blocks are Linear layers')."""


class LearningRule(nn.Module):
    # Rules with per-example state (auxiliary activations) set this: the loop then batches with each
    # example's index and calls train_step(x, y, optimizer, idx=idx), idx (B,) int64 rows of the train split.
    wants_indices: bool = False
    # True: train_step's `loss` is measured partly with the weights the step has just updated (AL: eq. 8
    # through the step's own top-bridge output and the updated decoders, all a pipelined step can
    # measure); it equals loss_fn(predict(x), y) exactly when the step leaves the weights unchanged
    loss_straddles_step: bool = False

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """One update on a mini-batch: zero_grad -> compute_grads -> optimizer.step -> after_step.
        Returns detached scalars; 'loss' is required, is the TASK loss (what the loop reports as
        train_loss and checks for NaN/inf), and a rule's local objectives get keys of their own. A rule
        overrides the part that differs (usually compute_grads), rarely the whole sequence."""
        optimizer.zero_grad(set_to_none=True)
        out = self.compute_grads(x, y)
        optimizer.step()
        self.after_step()
        return out

    def compute_grads(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fill each parameter's .grad for this batch; default: ordinary autograd of the task loss."""
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return {"loss": loss.detach()}

    def after_step(self) -> None:
        """Work after the optimizer step (e.g. a weight decay on feedback matrices); default: none."""

    def optimizer_groups(self):
        """What the optimizer is built over (bpfree/build.py): all parameters by default; a rule whose
        source trains some of its modules at another learning rate returns torch param groups, e.g.
        [{"params": forward}, {"params": inverses, "lr": 0.005}] (a group's own lr wins)."""
        return self.parameters()

    def prepare(self, train, test) -> None:
        """Called once by the loop before training, and before a resume loads the state, with the
        device-resident TensorData splits: rules with per-example state size it here. Default: nothing."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The inference function scored at evaluation (called under torch.no_grad, in eval mode)."""
        return self.model(x)

    def decode(self, src: torch.Tensor, beam_size: int, max_len: int, length_penalty: float) -> torch.Tensor:
        """Sequence inference for translation: src (B, S) ids -> (B, T) hypothesis ids (beam search of
        the model). A rule whose inference differs from its model's overrides this, as it does predict."""
        return self.model.beam(src, beam_size, max_len, length_penalty)

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Per-epoch measurements on a fixed held-out batch (e.g. alignment with the true gradient).
        Must leave parameters and .grad as it found them."""
        return {}

    def param_counts(self) -> dict[str, int]:
        """Parameter counts reported in the record. 'total' counts every trainable parameter the
        rule owns; rules with parameters outside the inference path also report 'effective' (by
        default: those of the model, when the rule owns more, e.g. inverses or error weights)."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        model = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"total": total} if total == model else {"total": total, "effective": model}
