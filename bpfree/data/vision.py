"""Image classification datasets read from their standard files under `root`.

Each split is decoded once into uint8 tensors (cached on disk where decoding is slow), then
standardised with the training split's per-channel mean/std and kept in memory as float32.
"""
from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bpfree import atomic
from bpfree.data.batching import Splits, TensorData
from bpfree.data.verify import CorruptData, verify_files


class DatasetUnavailable(FileNotFoundError):
    """The dataset's files are not under data.root; the message says where we looked and what to do."""


Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_test, y_test


@dataclass(frozen=True)
class VisionSpec:
    files: tuple[str, ...]              # relative to root; all must exist
    read: Callable[[Path, Path], Arrays]  # (root, cache_dir) -> uint8 (N, C, H, W) images, int64 labels
    download: Callable[[Path], None] | None = None  # fetch into root (online users)
    note: str = ""


def _idx_files(folder: str, prefix: str = "") -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{prefix}{split}-{kind}"
        for split in (("train", "test") if prefix else ("train", "t10k"))
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An uncompressed IDX file of unsigned bytes (LeCun's MNIST format: magic 0x0000 08 <ndim>, then ndim
    big-endian int32 sizes, then the data). Checked, so a truncated or damaged file names itself and the fix
    instead of failing deep inside a reshape."""
    raw = path.read_bytes()
    fix = (f"Restore {path.name} from its source (its folder's README.txt; `python -m bpfree.data verify` "
           "checks every file), or point data.root (env BPFREE_DATA) at an intact copy")
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise CorruptData(f"{path} is not an IDX file of {ndim}-d unsigned bytes: header "
                          f"{raw[:4].hex() or '(empty)'} (expected 000008{ndim:02x}). {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise CorruptData(f"{path} is truncated or padded: its header says {dims} ({expected} bytes) but the "
                          f"file has {len(raw)} bytes. {fix}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy())


def _torchvision_idx(cls_name: str, **kw) -> tuple[Callable, Callable]:
    """Read the IDX files of a torchvision MNIST-family dataset (the files under <root>/<Class>/raw/);
    torchvision is used only to download them."""
    import torchvision.datasets as tvd

    def read(root: Path, cache: Path) -> Arrays:
        raw = root / cls_name / "raw"
        prefix = f"emnist-{kw['split']}-" if "split" in kw else ""
        out = []
        for split in (("train", "test") if prefix else ("train", "t10k")):
            x = read_idx(raw / f"{prefix}{split}-images-idx3-ubyte", 3)
            y = read_idx(raw / f"{prefix}{split}-labels-idx1-ubyte", 1).long()
            if len(x) != len(y):
                raise CorruptData(f"{raw}: {split} has {len(x)} images but {len(y)} labels; restore both files")
            out += [x[:, None], y]
        return tuple(out)

    def download(root: Path) -> None:
        getattr(tvd, cls_name)(str(root), train=True, download=True, **kw)
        getattr(tvd, cls_name)(str(root), train=False, download=True, **kw)

    return read, download


def _emnist_read(root: Path, cache: Path) -> Arrays:
    read, _ = _torchvision_idx("EMNIST", split="letters")
    xtr, ytr, xte, yte = read(root, cache)
    # EMNIST stores images transposed; letters labels run 1..26.
    return xtr.transpose(-1, -2), ytr - 1, xte.transpose(-1, -2), yte - 1


def _cifar_pickles(folder: str, train: list[str], test: list[str], label_key: str) -> Callable:
    """The python-pickle batches of CIFAR-10/100 (dict with b'data' (N, 3072) uint8 and labels)."""

    def load(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for p in paths:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key.encode()], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def read(root: Path, cache: Path) -> Arrays:
        d = root / folder
        return (*load([d / n for n in train]), *load([d / n for n in test]))

    return read


def _cifar_download(cls_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, cls_name)(str(root), download=True)

    return download


def _jpeg_folder_read(archive: str, name: str) -> Callable:
    """A tar.gz of train/<class>/*.jpg and test/<class>/*.jpg: extract once into the cache, list with
    torchvision's ImageFolder, decode with torchvision.io, cache the uint8 tensors. ImageFolder lists
    the images class by class; `_interleave` puts each split in one fixed random order."""

    def read(root: Path, cache: Path) -> Arrays:
        src = root / archive
        stamp = f"{src.stat().st_size}-{int(src.stat().st_mtime)}"
        tensors = cache / f"{name}-{stamp}.pt"
        if tensors.exists():
            d = torch.load(tensors)
            return _interleave(d["x_train"], d["y_train"]) + _interleave(d["x_test"], d["y_test"])
        out = cache / f"{name}-{stamp}"
        if not (out / "test").is_dir():
            # two runs sharing the cache may both get here: each extracts into its own folder, the
            # first rename wins, and a loser whose rename finds the folder complete uses the winner's
            tmp = atomic.temporary_beside(out)
            try:
                with tarfile.open(src) as tf:
                    tf.extractall(tmp, filter="data")
                os.replace(tmp, out)
            except OSError:
                if not (out / "test").is_dir():
                    raise
            finally:
                atomic.remove(tmp)
        from torchvision.datasets import ImageFolder
        from torchvision.io import ImageReadMode, decode_image, read_file

        arrays = []
        for split in ("train", "test"):
            folder = ImageFolder(str(out / split))
            x = torch.stack([decode_image(read_file(p), mode=ImageReadMode.RGB) for p, _ in folder.samples])
            arrays += [x, torch.tensor(folder.targets, dtype=torch.int64)]
        atomic.torch_save(dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)), tensors)
        return _interleave(*arrays[:2]) + _interleave(*arrays[2:])

    return read


def _interleave(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random order (seed 0) for a split read class by class from folders, so that the first N
    samples (data.subset, data.test_subset) hold every class, as in the original CIFAR pickles."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


_mnist_read, _mnist_dl = _torchvision_idx("MNIST")
_fmnist_read, _fmnist_dl = _torchvision_idx("FashionMNIST")

VISION: dict[str, VisionSpec] = {
    "mnist": VisionSpec(_idx_files("MNIST"), _mnist_read, _mnist_dl),
    "fmnist": VisionSpec(_idx_files("FashionMNIST"), _fmnist_read, _fmnist_dl),
    "emnist": VisionSpec(
        _idx_files("EMNIST", "emnist-letters-"), _emnist_read,
        lambda root: _torchvision_idx("EMNIST", split="letters")[1](root),
        note="letters split, 26 classes",
    ),
    "cifar10": VisionSpec(
        tuple(f"cifar-10-batches-py/{n}" for n in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]),
        _cifar_pickles("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        _cifar_download("CIFAR10"),
    ),
    "cifar100": VisionSpec(
        ("cifar-100-python/train", "cifar-100-python/test"),
        _cifar_pickles("cifar-100-python", ["train"], ["test"], "fine_labels"),
        _cifar_download("CIFAR100"),
    ),
    "cifar10_jpeg": VisionSpec(
        ("cifar10-jpeg/cifar10-jpeg.tar.gz",),
        _jpeg_folder_read("cifar10-jpeg/cifar10-jpeg.tar.gz", "cifar10_jpeg"),
        None,
        note="CIFAR-10 re-encoded as JPEG (lossy); not CIFAR-10",
    ),
}


def is_available(name: str, root: str | os.PathLike) -> bool:
    return all((Path(root) / f).is_file() for f in VISION[name].files)


def load_vision(name: str, root, cache_dir, download: bool = False, subset: int | None = None) -> Splits:
    spec = VISION[name]
    root, cache = Path(root), Path(cache_dir)
    if not is_available(name, root):
        if download and spec.download is not None:
            spec.download(root)
        else:
            missing = [str(root / f) for f in spec.files if not (root / f).is_file()]
            how = (
                "set data.download=true when online, or " if spec.download is not None else ""
            )
            raise DatasetUnavailable(
                f"dataset {name!r} not found: missing {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f". Put its standard files under {root} or point data.root (env BPFREE_DATA) at the "
                f"folder that holds them; {how}pick another dataset."
            )
    verify_files(root, spec.files, cache)  # against root/SHA256SUMS, once per file version
    x_tr, y_tr, x_te, y_te = spec.read(root, cache)
    # standardise with the full training split's channel statistics (before any subsetting)
    xf = x_tr.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3), keepdim=True)
    std = xf.std(dim=(0, 2, 3), keepdim=True)
    del xf
    if subset is not None:
        x_tr, y_tr = x_tr[:subset], y_tr[:subset]
    norm = lambda x: (x.float().div_(255) - mean) / std  # noqa: E731
    return Splits(name, TensorData(norm(x_tr), y_tr), TensorData(norm(x_te), y_te), note=spec.note)
