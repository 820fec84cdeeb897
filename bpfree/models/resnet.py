"""CIFAR ResNets of He et al. (2016, §4.2): depth = 6n + 2, three stages of n basic blocks with
16/32/64 channels, identity shortcuts with zero-padded channels (option A). One class; the depths
are one-line constructors (resnet20, resnet32, resnet110)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.models.init import apply_init
from bpfree.models.mlp import ACTIVATIONS
from bpfree.registry import MODELS


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, act=nn.ReLU):
        super().__init__()
        # activations are modules (not F.relu) so a rule can swap them (associated learning uses ELU)
        self.act1, self.act2 = act(), act()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:  # option A: zero-pad the new channels, no parameters
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x):  # (B, c_in, H, W) -> (B, c_out, H/stride, W/stride)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class Head(nn.Module):
    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):  # (B, 64, 8, 8) -> (B, classes) log-probabilities
        return F.log_softmax(self.fc(x.mean(dim=(2, 3))), dim=1)


class ResNet(nn.Module):
    """Blocks: stem, s1b1..s1bN, s2b1..s2bN, s3b1..s3bN, head.

    With `fc` non-empty the head is replaced by fully connected blocks fc1..fcK (fc1 global-average-
    pools first) and out: the extra layers the associated-learning authors put on top of the ResNet so
    that its BP baseline has the parameters of the AL fold (§5.1; their CIFAR10/models.py ResNet).
    """

    def __init__(self, input_shape, num_classes: int, *, depth: int, width: int, fc, activation: str,
                 init: str):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.input_shape = tuple(input_shape)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.blocks = nn.ModuleDict()
        self.blocks["stem"] = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), act())
        c = width
        for s in range(3):
            for b in range(n):
                c_out = width * 2**s
                self.blocks[f"s{s + 1}b{b + 1}"] = BasicBlock(c, c_out, 2 if (s > 0 and b == 0) else 1, act)
                c = c_out
        if not fc:
            self.blocks["head"] = Head(c, num_classes)
        else:
            for k, f in enumerate(fc, start=1):
                pre = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if k == 1 else []  # (B, c, 8, 8) -> (B, c)
                self.blocks[f"fc{k}"] = nn.Sequential(*pre, nn.Linear(c, f), act())
                c = f
            self.blocks["out"] = nn.Sequential(nn.Linear(c, num_classes), nn.LogSoftmax(dim=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if init != "default":
            apply_init(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x


MODELS.register("resnet")(ResNet)
for _d in (20, 32, 110):
    MODELS.register(f"resnet{_d}")(partial(ResNet, depth=_d))
