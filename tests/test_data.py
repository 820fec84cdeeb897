"""Datasets: real MNIST, and the loaders for data we cannot have offline, on small files written
here in the real formats (IDX for EMNIST, pickled batches for CIFAR, a JPEG tar.gz for cifar10_jpeg)."""
from __future__ import annotations

import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from bpfree.data import DatasetUnavailable, TensorData, batches, is_available, jitter, load_dataset


def test_real_mnist_loads_standardised(real_root, tmp_path):
    s = load_dataset("mnist", real_root, tmp_path)
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert set(s.train.y.unique().tolist()) == set(range(10))
    assert abs(float(s.train.x.mean())) < 1e-3 and abs(float(s.train.x.std()) - 1) < 1e-3
    assert s.test.y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first MNIST test labels


def test_subset_keeps_statistics_of_full_split(real_root, tmp_path):
    full, sub = load_dataset("fmnist", real_root, tmp_path), load_dataset("fmnist", real_root, tmp_path, subset=100)
    assert len(sub.train) == 100 and torch.equal(sub.train.x, full.train.x[:100])


def _idx(path, arr: np.ndarray) -> None:
    """Write an IDX file (the MNIST/EMNIST format): magic (0, 0, dtype 0x08, ndim), sizes, bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, arr.ndim))
        f.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def test_emnist_letters_from_idx_files(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 52), ("test", 26))}
    labels = {s: (np.arange(len(imgs[s])) % 26) + 1 for s in imgs}  # EMNIST letters: 1..26
    for s in imgs:
        _idx(raw / f"emnist-letters-{s}-images-idx3-ubyte", imgs[s])
        _idx(raw / f"emnist-letters-{s}-labels-idx1-ubyte", labels[s])
    assert is_available("emnist", tmp_path)
    d = load_dataset("emnist", tmp_path, tmp_path / "cache")
    assert d.train.y.min() == 0 and d.train.y.max() == 25  # mapped to 0..25
    assert torch.equal(d.train.y, torch.from_numpy(labels["train"] - 1))
    # EMNIST is stored transposed: the loader turns it upright, so pixel (r, c) comes from (c, r)
    raw0 = torch.from_numpy(imgs["train"][0]).float() / 255
    x0 = d.train.x[0, 0]
    corr_t = torch.corrcoef(torch.stack([x0.flatten(), raw0.T.flatten()]))[0, 1]
    assert corr_t > 0.999


def _cifar_pickle(path, n, label_key, rng):
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key.encode(): rng.integers(0, 10, n).tolist(), b"batch_label": b"test"}
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return d


@pytest.mark.parametrize("name,folder,files,key", [
    ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"),
    ("cifar100", "cifar-100-python", ["train", "test"], "fine_labels"),
])
def test_cifar_from_pickled_batches(tmp_path, name, folder, files, key):
    (tmp_path / folder).mkdir()
    rng = np.random.default_rng(1)
    written = {f: _cifar_pickle(tmp_path / folder / f, 8, key, rng) for f in files}
    d = load_dataset(name, tmp_path, tmp_path / "cache")
    n_train = 8 * (len(files) - 1)
    assert d.train.x.shape == (n_train, 3, 32, 32) and d.test.x.shape == (8, 3, 32, 32)
    assert d.test.y.tolist() == written[files[-1]][key.encode()]
    # row-major (3, 32, 32) layout: channel 0 of image 0 is the first 1024 bytes
    first = torch.from_numpy(written[files[0]][b"data"][0, :1024].reshape(32, 32)).float()
    corr = torch.corrcoef(torch.stack([d.train.x[0, 0].flatten(), first.flatten()]))[0, 1]
    assert corr > 0.999


def _write_jpeg_archive(root, classes=("airplane", "automobile", "bird")) -> None:
    """cifar10_jpeg's real format: a tar.gz of {train,test}/<class>/*.jpg, 4 train and 2 test images
    per class, every pixel of class k at 40 * k."""
    from torchvision.io import encode_jpeg

    classes = list(classes)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for split, n in (("train", 4), ("test", 2)):
            for c in classes:
                for i in range(n):
                    img = torch.full((3, 32, 32), 40 * classes.index(c), dtype=torch.uint8)
                    data = encode_jpeg(img, quality=95).numpy().tobytes()
                    info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.jpg")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (root / "cifar10-jpeg").mkdir()
    (root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz").write_bytes(buf.getvalue())


def test_cifar10_jpeg_from_tar_of_class_folders(tmp_path):
    _write_jpeg_archive(tmp_path)
    d = load_dataset("cifar10_jpeg", tmp_path, tmp_path / "cache")
    assert d.train.x.shape == (12, 3, 32, 32) and d.test.x.shape == (6, 3, 32, 32)
    assert sorted(d.train.y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # alphabetical class folders
    assert d.train.y[:4].unique().numel() > 1, "splits are shuffled, not listed class by class"
    for k in range(3):  # each label still sits with its own images (pixel value 40 * class)
        xs = d.train.x[d.train.y == k]
        assert torch.allclose(xs, xs[:1].expand_as(xs))
    assert "JPEG" in d.note and "not CIFAR-10" in d.note
    assert list((tmp_path / "cache").glob("cifar10_jpeg-*.pt")), "decoded tensors are cached"
    again = load_dataset("cifar10_jpeg", tmp_path, tmp_path / "cache")
    assert torch.equal(again.train.x, d.train.x)


def test_two_runs_building_the_jpeg_cache_at_once_both_load(tmp_path, monkeypatch):
    """Runs of one sweep (joblib launcher) or two CPU lanes share data.cache_dir, and the first runs to
    need cifar10_jpeg extract it together. Here a second run extracts and finishes in the middle of the
    first one's extraction (after its files are out, before its rename); both must load the same data
    and leave no half-extracted folder behind."""
    _write_jpeg_archive(tmp_path)
    cache = tmp_path / "cache"
    real_extractall, others = tarfile.TarFile.extractall, []

    def extract_then_let_another_run_finish(self, *args, **kwargs):
        real_extractall(self, *args, **kwargs)
        if not others:  # the other run: a whole load, start to finish, on the same cache
            others.append(None)  # first, so the other run's own extraction does not start a third
            others[0] = load_dataset("cifar10_jpeg", tmp_path, cache)

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_then_let_another_run_finish)
    first = load_dataset("cifar10_jpeg", tmp_path, cache)
    assert torch.equal(first.train.x, others[0].train.x) and torch.equal(first.test.y, others[0].test.y)
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, f"temporary folders left in the cache: {leftovers}"


def test_missing_dataset_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("emnist", tmp_path, tmp_path / "cache")
    msg = str(e.value)
    assert str(tmp_path / "EMNIST" / "raw") in msg and "BPFREE_DATA" in msg and "data.download=true" in msg


def test_batches_replay_by_seed_and_epoch_and_cover_each_sample_once():
    d = TensorData(torch.arange(10.0)[:, None], torch.arange(10))
    e0 = [y.tolist() for _, y in batches(d, 4, shuffle=True, seed=3, epoch=0)]
    assert e0 == [y.tolist() for _, y in batches(d, 4, shuffle=True, seed=3, epoch=0)]
    assert e0 != [y.tolist() for _, y in batches(d, 4, shuffle=True, seed=3, epoch=1)]
    assert sorted(sum(e0, [])) == list(range(10)) and [len(b) for b in e0] == [4, 4, 2]


def test_jitter_is_a_bounded_shift_of_each_image():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8) + 1  # strictly positive, so the zero border reveals the shift
    out = jitter(x, 2)
    for i in range(16):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], torch.roll(x[i], (dy, dx), (1, 2)) * _mask(dy, dx))]
        assert len(matches) == 1


def _mask(dy, dx, n=8):
    m = torch.ones(1, n, n)
    if dy > 0: m[:, :dy] = 0  # noqa: E701
    if dy < 0: m[:, dy:] = 0  # noqa: E701
    if dx > 0: m[:, :, :dx] = 0  # noqa: E701
    if dx < 0: m[:, :, dx:] = 0  # noqa: E701
    return m
