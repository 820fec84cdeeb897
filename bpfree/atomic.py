"""Atomic writes: a file appears whole or not at all (a killed run never leaves half a record,
checkpoint or cache), and processes sharing a folder never write into each other's half-finished file.

Two runs do share folders: every run of a Hydra multirun under the joblib launcher, or two lanes of a
CPU campaign, reads the same data cache (`data.cache_dir`), and the first to need a dataset builds the
cache entry. A fixed temporary name (`x.tmp`) there is one file two processes write at once; the name
`temporary_beside` gives is unique to the process and the call."""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_beside(path: Path) -> Path:
    """A hidden sibling of `path` (same folder, so the final rename never crosses filesystems) that no
    other process or call uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove(path: Path) -> None:
    """Remove a file or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving the block, rename it onto `path` (readers see the
    old file or the new one, never a mix). On an error the temporary is removed and `path` is untouched.

        with replacing(out) as tmp:
            torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove(tmp)


def write_text(path: Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def torch_save(obj, path: Path) -> Path:
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
