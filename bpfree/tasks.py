"""What a run is scored on: the loss a rule trains against and the evaluation metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bpfree.data import TensorData, batches


class Classification:
    """Models emit log-probabilities (B, classes); loss = NLL, metrics = accuracy (a fraction)."""

    metrics = {"test_acc": "max", "test_loss": "min"}  # how 'best over epochs' is taken
    primary = "test_acc"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def check(self, data: TensorData, name: str) -> None:
        top = int(data.y.max())
        if top >= self.num_classes:
            raise ValueError(
                f"{name} has label {top} but dataset.num_classes={self.num_classes}; "
                "fix num_classes in the dataset config"
            )

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(output, y)

    @torch.no_grad()
    def evaluate(self, predict, data: TensorData, batch_size: int) -> dict[str, float]:
        correct, total_loss = 0, 0.0
        for x, y in batches(data, batch_size, shuffle=False):
            out = predict(x)
            correct += int((out.argmax(1) == y).sum())
            total_loss += float(F.nll_loss(out, y, reduction="sum"))
        n = len(data)
        return {"test_acc": correct / n, "test_loss": total_loss / n}


TASKS = {"classification": Classification}
