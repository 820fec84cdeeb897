"""python -m bpfree.data verify [--root DIR]: check every dataset file against DIR/SHA256SUMS."""
from __future__ import annotations

import argparse
import os
import sys

from bpfree.data.verify import SUMS, verify_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpfree.data", description=__doc__)
    ap.add_argument("command", choices=["verify"])
    ap.add_argument("--root", default=os.environ.get("BPFREE_DATA", "data"), help="data.root (env BPFREE_DATA)")
    a = ap.parse_args(argv)
    rows = verify_all(a.root)
    if not rows:
        print(f"no {SUMS} under {a.root}: nothing to verify (point --root / BPFREE_DATA at the data folder)")
        return 2
    for rel, status in rows:
        print(f"{status:8s} {rel}")
    bad = [r for r, s in rows if s != "ok"]
    print(f"{len(rows) - len(bad)} of {len(rows)} files ok" + (f"; {len(bad)} not: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
