"""Batch-level image augmentations (no per-sample transforms in the loop): random crops, crops resized,
left-right flips, and the fixed test-time views whose outputs a model averages.

Virtual-forward-backward-networks App. B.1 augments CIFAR-10 with (1) random 24x24 crops of the 32x32
image, (2) 28x28 crops resized ("compressed") to 24x24, (3) left-right reflections of either, and
scores a test image by the mean output over its augmented views. `TRAIN_VIEWS` holds the training
draws (x (B, C, H, W) -> (B, C, s, s)); `TEST_VIEWS` the deterministic view sets
(x (B, C, H, W) -> (V, B, C, s, s)). The models that use them (bpfree/models/resnet_vfbn.py) apply them
inside their forward pass, so the shared loop and run.py stay as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _offsets(n: int, high: int, device) -> torch.Tensor:
    return torch.randint(0, high + 1, (n,), device=device)


def crop_at(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image crops: image i's size x size window at (oy[i], ox[i]). x (B, C, H, W) -> (B, C, size, size)."""
    b = x.shape[0]
    ar = torch.arange(size, device=x.device)
    rows = (oy[:, None] + ar[None, :])  # (B, size)
    cols = (ox[:, None] + ar[None, :])  # (B, size)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, size, size, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """A uniformly random size x size window of each image (App. B.1 (1))."""
    h, w = x.shape[-2:]
    return crop_at(x, _offsets(len(x), h - size, x.device), _offsets(len(x), w - size, x.device), size)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size (antialiased, as an image library's downscale)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_crop_resized(x: torch.Tensor, crop: int, size: int) -> torch.Tensor:
    """A random crop x crop window resized to size x size (App. B.1 (2): 28x28 crops compressed to 24x24)."""
    return resize(random_crop(x, crop), size)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (App. B.1 (3))."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top: top + size, left: left + size]


def vfbn_train(x: torch.Tensor, size: int = 24, big: int = 28) -> torch.Tensor:
    """App. B.1's training distribution: each image is, with probability 1/2 each, a random size crop
    or a random big crop resized to size, then flipped with probability 1/2. (B, C, 32, 32) -> (B, C, 24, 24)."""
    a = random_crop(x, size)
    b = random_crop_resized(x, big, size)
    pick = torch.rand(len(x), device=x.device) < 0.5
    return random_flip(torch.where(pick[:, None, None, None], a, b))


def _grid(x: torch.Tensor, crop: int, size: int, steps: int) -> list[torch.Tensor]:
    h, w = x.shape[-2:]
    ys = torch.linspace(0, h - crop, steps).round().long().tolist()
    xs = torch.linspace(0, w - crop, steps).round().long().tolist()
    views = [x[..., t: t + crop, l: l + crop] for t in ys for l in xs]
    return [v if crop == size else resize(v, size) for v in views]


def vfbn_grid36(x: torch.Tensor, size: int = 24, big: int = 28) -> torch.Tensor:
    """36 fixed views per image: 24x24 crops on a 3x3 grid of offsets, 28x28 crops on a 3x3 grid
    resized to 24x24, and the mirror image of each (36 = the paper's 1.8M / 50K augmentation factor;
    which 36 views the paper used is not written down: this grid is our choice). -> (36, B, C, 24, 24)."""
    views = _grid(x, size, size, 3) + _grid(x, big, size, 3)
    views = views + [v.flip(-1) for v in views]
    return torch.stack(views)


def center_flip(x: torch.Tensor, size: int = 24, big: int = 28) -> torch.Tensor:
    """2 views: the central 24x24 crop and its mirror image (the CPU-scale evaluation). -> (2, B, C, 24, 24)."""
    c = center_crop(x, size)
    return torch.stack([c, c.flip(-1)])


def center(x: torch.Tensor, size: int = 24, big: int = 28) -> torch.Tensor:
    """1 view: the central crop. -> (1, B, C, 24, 24)."""
    return center_crop(x, size)[None]


TRAIN_VIEWS = {"vfbn": vfbn_train, "center": lambda x, size=24, big=28: center_crop(x, size)}
TEST_VIEWS = {"grid36": vfbn_grid36, "center_flip": center_flip, "center": center}
