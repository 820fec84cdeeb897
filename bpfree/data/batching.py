"""In-memory splits and index batching."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class TensorData:
    x: torch.Tensor  # (N, C, H, W) float32, standardised with the training split's channel statistics
    y: torch.Tensor  # (N,) int64 class indices

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass
class Splits:
    name: str
    train: TensorData
    test: TensorData
    task: str = "classification"
    note: str = ""  # caveat carried into every record and table, e.g. "JPEG re-encoded (lossy)"
    val: TensorData | None = None  # validation split, where the paper selects a checkpoint on it
    extras: dict = field(default_factory=dict)  # what the task needs besides tensors (tokenizer, raw text)


def batches(data: TensorData, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
            augment=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) mini-batches. The order depends only on (seed, epoch), so a resumed run replays
    exactly the batches an uninterrupted one would have seen."""
    n = len(data)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).to(data.y.device)
    else:
        order = torch.arange(n, device=data.y.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = data.x[idx]
        if augment is not None:
            x = augment(x)
        yield x, data.y[idx]


def jitter(x: torch.Tensor, pixels: int = 2) -> torch.Tensor:
    """Shift each image by an independent random offset in [-pixels, pixels]^2, zero-filling the border
    (the '2-pixel jittering' of associated-learning §5.2). x: (B, C, H, W)."""
    if pixels <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels, pixels, pixels, pixels))
    oy = torch.randint(0, 2 * pixels + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * pixels + 1, (b,), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + oy[:, None])  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] + ox[:, None])  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# data.augment options: name -> factory(data config) -> x -> x. A new augmentation is one entry here.
AUGMENTS = {
    "jitter": lambda d: (lambda x: jitter(x, d["jitter"])),
}
