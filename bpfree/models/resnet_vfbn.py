"""The ResNet-110 of virtual-forward-backward-networks App. B.1 (after mitmul/chainer-cifar10), with its
data augmentation and multi-view test prediction built in.

    x (B, 3, 32, 32) -> view: a 24x24 view (training: random, App. B.1 (1)-(3); eval: the central crop)
      -> stem: unpadded 3x3 conv, 16 maps, BN, ReLU               (B, 16, 22, 22)
      -> s1b1..s1bN: basic blocks (2 convs, skip every 2 layers)   (B, 32, 22, 22)
      -> s2b1..s2bN: first block stride 2                          (B, 64, 11, 11)
      -> s3b1..s3bN: first block stride 2                          (B, 64, 6, 6)
      -> head: global average pooling, linear, log-softmax         (B, classes)

depth = 6N + 2 (stem + 3 stages of 2N convs + the classifier): 110 is N = 18, i.e. "three stages of 36
conv layers"; every conv is followed by BN and ReLU (the second conv of a block after the skip sum, as He
et al.); shortcuts are identity, zero-padded channels and strided subsampling at the transitions (He et
al.'s option A; the paper does not say which). `default_split` is where the paper puts the gradient
synthesizer, the middle of stage 2 (after s2b9 of ResNet-110: its output is (B, 64, 11, 11)).

Test prediction (App. B.1 "averaged the output"): in eval mode `forward` runs every block on each of the
`test_views` views of each image (bpfree/data/augment.py TEST_VIEWS) and returns the log of the mean
class probability. Rules that call the blocks one by one get the `view` block's single view instead;
`over_views(x, fn)` lets such a rule average its own inference function over the same views.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from bpfree.data.augment import TEST_VIEWS, TRAIN_VIEWS, center_crop
from bpfree.models.resnet import BasicBlock, Head
from bpfree.registry import MODELS


class View(nn.Module):
    """Block `view`: (B, C, H, W) -> (B, C, size, size). Training: a random augmented view
    (`train_views`); eval: the central crop (identity on an input that is already size x size)."""

    def __init__(self, size: int, big: int, train_views: str | None):
        super().__init__()
        self.size, self.big, self.train_views = size, big, train_views

    def forward(self, x):
        if self.training and self.train_views is not None:
            return TRAIN_VIEWS[self.train_views](x, self.size, self.big)
        return center_crop(x, self.size)


class ResNetVFBN(nn.Module):
    """Blocks: view, stem, s1b1..s1bN, s2b1..s2bN, s3b1..s3bN, head."""

    def __init__(self, input_shape, num_classes: int, *, depth: int, stem_width: int, widths, image_size: int,
                 big_crop: int, train_views: str | None, test_views: str | None):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"model.depth must be 6N+2 (14, 20, 26, 32, ..., 110), got {depth}")
        if train_views is not None and train_views not in TRAIN_VIEWS:
            raise ValueError(f"unknown model.train_views {train_views!r}; valid: null, {sorted(TRAIN_VIEWS)}")
        if test_views is not None and test_views not in TEST_VIEWS:
            raise ValueError(f"unknown model.test_views {test_views!r}; valid: null, {sorted(TEST_VIEWS)}")
        if min(input_shape[-2:]) < max(image_size, big_crop if train_views == "vfbn" else image_size):
            raise ValueError(f"input {tuple(input_shape)} is smaller than the {image_size}x{image_size} views "
                             f"(and {big_crop}x{big_crop} crops) model.image_size / model.big_crop ask for")
        n = (depth - 2) // 6
        self.input_shape, self.test_views = tuple(input_shape), test_views
        self.image_size, self.big_crop = image_size, big_crop
        self.blocks = nn.ModuleDict()
        self.blocks["view"] = View(image_size, big_crop, train_views)
        # unpadded 3x3 conv: 24x24x3 -> 22x22x16 (App. B.1)
        self.blocks["stem"] = nn.Sequential(nn.Conv2d(input_shape[0], stem_width, 3, 1, 0, bias=False),
                                            nn.BatchNorm2d(stem_width), nn.ReLU())
        c = stem_width
        for s, w in enumerate(widths):
            for b in range(n):
                self.blocks[f"s{s + 1}b{b + 1}"] = BasicBlock(c, w, 2 if (s > 0 and b == 0) else 1)
                c = w
        self.blocks["head"] = Head(c, num_classes)
        # the paper's synthesizer position: the middle of stage 2 (ResNet-110: s2b9 of 18)
        self.default_split = f"s2b{max(1, n // 2)}"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _blocks_forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return x

    def over_views(self, x: torch.Tensor, fn) -> torch.Tensor:
        """log of the mean over the test views of exp(fn(view)): fn maps (B, C, s, s) to log-probabilities."""
        views = TEST_VIEWS[self.test_views](x, self.image_size, self.big_crop)  # (V, B, C, s, s)
        p = sum(fn(v).exp() for v in views) / len(views)
        return p.clamp_min(1e-30).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 32, 32) -> (B, classes) log-probabilities
        if self.training or self.test_views is None:
            return self._blocks_forward(x)
        return self.over_views(x, self._blocks_forward)


MODELS.register("resnet_vfbn")(ResNetVFBN)
for _d in (14, 20, 26, 32, 110):
    MODELS.register(f"resnet{_d}_vfbn")(partial(ResNetVFBN, depth=_d))
