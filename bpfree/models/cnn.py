"""Plain convolutional network; defaults are the vanilla CNN of associated-learning §5.2:
4 x conv3x3x32, 4 x conv3x3x64, FC 1280, 4 x FC 256, FC out (13 hidden layers + output)."""
from __future__ import annotations

import math

from torch import nn

from bpfree.models.init import apply_init
from bpfree.models.mlp import ACTIVATIONS
from bpfree.registry import MODELS


@MODELS.register("cnn")
class CNN(nn.Module):
    """x (B, C, H, W) -> c1..cK (conv3x3 'same' + act, halving H and W at the indices in `pool_after`)
    -> f1..fM (flatten on entry, Linear + act) -> out (Linear + LogSoftmax).

    downsample: 'maxpool' = a 2x2 max-pool after the conv; 'stride' = the conv itself has stride 2
    (what the associated-learning authors' CNN does, github.com/SamYWK/Associated_Learning
    CIFAR10/models.py: the 4th and 8th conv use strides=2). Same parameters either way.
    """

    def __init__(self, input_shape, num_classes: int, *, channels, fc, pool_after, activation: str,
                 downsample: str, init: str):
        super().__init__()
        if downsample not in ("maxpool", "stride"):
            raise ValueError(f"unknown cnn downsample {downsample!r}; valid: maxpool, stride")
        act = ACTIVATIONS[activation]
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        self.blocks = nn.ModuleDict()
        for k, ch in enumerate(channels, start=1):
            down = k in pool_after
            stride = 2 if down and downsample == "stride" else 1
            layers = [nn.Conv2d(c, ch, 3, stride=stride, padding=1), act()]
            if down and downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
            if down:  # 'same' padding: stride 2 gives ceil(h/2), max-pool floor(h/2); equal for even sizes
                h, w = (h // 2, w // 2) if downsample == "maxpool" else ((h + 1) // 2, (w + 1) // 2)
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
        apply_init(self, init)

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return x  # (B, num_classes) log-probabilities
