"""VGG-style CIFAR network: the one the associated-learning authors trained for their VGG row
(github.com/SamYWK/Associated_Learning, CIFAR10/models.py `VGG`/`VGG_AL`): six conv3x3+BN+act layers
128, 256, M, 256, 512, M, 512, M, 512, M (M = 2x2 max-pool) on 32x32 inputs, then fully connected
layers. We use it rather than VGG-11/16 because it is the network behind the paper's 92.3/92.6
(Table 3), and it is small enough to step on a CPU.

The default `fc` makes one network serve both rules with identical parameters (§5.1): AL folds it as
components [c1,c2] [c3,c4] [c5,c6] [f1,f2] (the authors' VGG_AL puts two 1024-wide dense layers in its
4th component), top bridge f3,f4 (1500 -> 300, the authors' 5n -> n with n = 300), decoders
f5, f6, f7, out. BP trains the same stack end to end (the authors' BP VGG lacks the two 1024 layers;
we keep them so the counts match exactly, as the paper says its comparisons do).
"""
from __future__ import annotations

from torch import nn

from bpfree.models.init import apply_init
from bpfree.models.mlp import ACTIVATIONS
from bpfree.registry import MODELS


@MODELS.register("vgg")
class VGG(nn.Module):
    """x (B, C, H, W) -> c1..cK (conv3x3 'same' [+BN] + act [+ 2x2 max-pool where cfg has 'M' next])
    -> f1..fM (flatten on entry, Linear + act) -> out (Linear + LogSoftmax)."""

    def __init__(self, input_shape, num_classes: int, *, cfg, fc, activation: str, batchnorm: bool, init: str):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        self.blocks = nn.ModuleDict()
        k = 0
        for i, v in enumerate(cfg):
            if v == "M":
                continue
            k += 1
            layers = [nn.Conv2d(c, v, 3, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(v)] if batchnorm else []
            layers.append(act())
            if i + 1 < len(cfg) and cfg[i + 1] == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.blocks[f"c{k}"] = nn.Sequential(*layers)
            c = v
        if h < 1 or w < 1:
            raise ValueError(f"vgg cfg {list(cfg)} pools input {list(input_shape)} away to nothing")
        width = c * h * w  # 512 * 2 * 2 on CIFAR
        for j, f in enumerate(fc, start=1):
            pre = [nn.Flatten()] if j == 1 else []
            self.blocks[f"f{j}"] = nn.Sequential(*pre, nn.Linear(width, f), act())
            width = f
        pre = [] if fc else [nn.Flatten()]
        self.blocks["out"] = nn.Sequential(*pre, nn.Linear(width, num_classes), nn.LogSoftmax(dim=1))
        apply_init(self, init)

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return x  # (B, num_classes) log-probabilities
