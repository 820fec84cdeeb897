"""Plain convolutional network; defaults are the vanilla CNN of associated-learning §5.2:
4 x conv3x3x32, 4 x conv3x3x64, FC 1280, 4 x FC 256, FC out (13 hidden layers + output)."""
from __future__ import annotations

import math

from torch import nn

from bpfree.models.mlp import ACTIVATIONS
from bpfree.registry import MODELS


@MODELS.register("cnn")
class CNN(nn.Module):
    """x (B, C, H, W) -> c1..cK (conv3x3 'same' + act, 2x2 max-pool after the indices in `pool_after`)
    -> f1..fM (flatten on entry, Linear + act) -> out (Linear + LogSoftmax)."""

    def __init__(self, input_shape, num_classes: int, channels=(32, 32, 32, 32, 64, 64, 64, 64),
                 fc=(1280, 256, 256, 256, 256), pool_after=(4, 8), activation: str = "relu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        c, h, w = input_shape
        self.blocks = nn.ModuleDict()
        for k, ch in enumerate(channels, start=1):
            layers = [nn.Conv2d(c, ch, 3, padding=1), act()]
            if k in pool_after:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.blocks[f"c{k}"] = nn.Sequential(*layers)
            c = ch
        width = c * h * w
        for k, f in enumerate(fc, start=1):
            pre = [nn.Flatten()] if k == 1 else []
            self.blocks[f"f{k}"] = nn.Sequential(*pre, nn.Linear(width, f), act())
            width = f
        pre = [] if fc else [nn.Flatten()]
        self.blocks["out"] = nn.Sequential(*pre, nn.Linear(width, num_classes), nn.LogSoftmax(dim=1))
        self.feature_shape = (c, h, w)  # shape entering the first FC block
        assert math.prod(self.feature_shape) > 0, f"input {input_shape} pooled away to nothing"

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return x  # (B, num_classes) log-probabilities
