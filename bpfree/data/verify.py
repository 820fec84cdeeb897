"""Dataset files checked against the SHA256SUMS file beside them (../shared/data/SHA256SUMS here).

`python -m bpfree.data verify [--root DIR]` (make verify-data) checks every listed file. Loaders call
`verify_files` on the files they are about to decode; a file that passed is remembered by (path, size,
mtime) in the cache folder, so the hash is computed once, not on every run. A root without SHA256SUMS,
or a file it does not list (datasets obtained elsewhere), is not checked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bpfree import atomic

SUMS = "SHA256SUMS"


class CorruptData(ValueError):
    """A dataset file differs from what it should be; the message names the file and the fix."""


def read_sums(root) -> dict[str, str]:
    f = Path(root) / SUMS
    if not f.is_file():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip().lstrip("*")] = digest
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def verify_files(root, relpaths, cache_dir=None) -> None:
    """Raise CorruptData for the first of `relpaths` (relative to root) whose sha256 differs from root's
    SHA256SUMS. Passed files are remembered in <cache_dir>/verified.json."""
    sums = read_sums(root)
    listed = [r for r in relpaths if r in sums]
    if not listed:
        return
    memo_path = Path(cache_dir) / "verified.json" if cache_dir else None
    memo = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except json.JSONDecodeError:
            memo = {}
    changed = False
    for rel in listed:
        p = Path(root) / rel
        stamp = _stamp(p)
        if memo.get(stamp) == sums[rel]:
            continue
        got = sha256(p)
        if got != sums[rel]:
            raise CorruptData(
                f"{p} is corrupt: its sha256 is {got[:16]}..., {Path(root) / SUMS} expects {sums[rel][:16]}... "
                f"(size {p.stat().st_size} bytes). Restore the file from its source (see {Path(root) / 'README.txt'}), "
                "or point data.root (env BPFREE_DATA) at an intact copy")
        memo[stamp] = got
        changed = True
    if changed and memo_path is not None:
        atomic.write_text(memo_path, json.dumps(memo, indent=0))


def verify_all(root) -> list[tuple[str, str]]:
    """(file, 'ok' | 'missing' | 'CORRUPT') for every file SHA256SUMS lists."""
    out = []
    for rel, digest in read_sums(root).items():
        p = Path(root) / rel
        out.append((rel, "missing" if not p.is_file() else ("ok" if sha256(p) == digest else "CORRUPT")))
    return out
