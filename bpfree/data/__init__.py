"""Datasets as in-memory tensors, batched by index (no per-sample transforms in the training loop).

`load_dataset(name, ...)` returns a `Splits`; its `task` names how runs on it are scored.
"""
from __future__ import annotations

from bpfree.data.batching import AUGMENTS, Splits, TensorData, batches, jitter
from bpfree.data.text import TEXT, length_batches, load_text, text_available
from bpfree.data.vision import VISION, DatasetUnavailable, is_available, load_vision


def load_dataset(name: str, root: str, cache_dir: str, download: bool = False, subset: int | None = None,
                 test_subset: int | None = None, val_split: float | None = None, **options) -> Splits:
    """`options` are the dataset's own settings from its config (text: languages, vocabulary size).
    `val_split` (a fraction in (0, 1)) holds out the LAST that fraction of the training set (after
    `subset`) as the validation split `val`, which runs then score every epoch (val_acc, ...) for model
    selection that never looks at the test set; the standardisation statistics stay the full
    training split's."""
    if name in VISION:
        s = load_vision(name, root, cache_dir, download=download, subset=subset, **options)
    elif name in TEXT:
        s = load_text(name, root, cache_dir, download=download, subset=subset, **options)
    else:
        raise KeyError(f"unknown dataset {name!r}; valid options: {', '.join(sorted([*VISION, *TEXT]))}")
    if val_split is not None:
        if not 0 < val_split < 1:
            raise ValueError(f"data.val_split={val_split!r}: give a fraction in (0, 1), e.g. 0.1, or null (no split)")
        if s.val is not None:
            raise ValueError(f"data.val_split={val_split}: dataset {name!r} has its own validation split; "
                             "set data.val_split=null")
        n_val = round(len(s.train.y) * val_split)
        if not 0 < n_val < len(s.train.y):
            raise ValueError(f"data.val_split={val_split} leaves {n_val} of {len(s.train.y)} training samples "
                             "for validation; use a larger training set or another fraction")
        n = len(s.train.y) - n_val
        s.train, s.val = (TensorData(s.train.x[:n], s.train.y[:n]),
                          TensorData(s.train.x[n:], s.train.y[n:]))
    if test_subset is not None:
        s.test = TensorData(s.test.x[:test_subset], s.test.y[:test_subset])
        if s.val is not None:  # evaluation of every kind shrinks, or a smoke run still scores 1014 pairs
            s.val = TensorData(s.val.x[:test_subset], s.val.y[:test_subset])
        for k in ("test_src", "test_ref"):
            if k in s.extras:
                s.extras[k] = s.extras[k][:test_subset]
    return s


def available(name: str, root) -> bool:
    """Whether the dataset's files are under `root` (image or text)."""
    return text_available(name, root) if name in TEXT else is_available(name, root)


__all__ = ["AUGMENTS", "Splits", "TensorData", "TEXT", "VISION", "batches", "length_batches", "jitter", "load_dataset", "is_available",
           "available", "DatasetUnavailable"]
