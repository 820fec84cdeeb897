"""The learning rate each rule is given in rules_tuned: the one with the best validation accuracy in the
rules_tune records (data.val_split 0.1; the test set plays no part). Prints one line per rule.

    python experiments/backprop-free-transformers/select_lr.py [--records DIR]

DIR defaults to rules_tune's records; `--records results/records/backprop-free-transformers/rules_tune_kp20`
gives kp's decay choice at the 20-epoch budget (its rows are kp_decay<d>, one lr each).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RECORDS = Path("results/records/backprop-free-transformers/rules_tune")


def choices(records: Path = RECORDS) -> dict[str, dict]:
    """{row: {"lr": best lr, "val_acc": its best-epoch val_acc, "grid": {lr: val_acc}, "decay": kp decay}}"""
    out: dict[str, dict] = {}
    for p in sorted(records.glob("*.json")):
        r = json.loads(p.read_text())
        if r["status"] != "ok":
            continue
        c = r["config"]
        # best epoch's validation accuracy (records summarise only the task's test metrics under "best")
        acc = max(e["val_acc"] for e in r["metrics"]["per_epoch"])
        row = out.setdefault(r["row"], {"grid": {}, "method": r["method"], "decay": c["method"].get("decay")})
        row["grid"][c["optim"]["lr"]] = acc
    for row in out.values():
        row["lr"] = max(row["grid"], key=lambda lr: row["grid"][lr])
        row["val_acc"] = row["grid"][row["lr"]]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=Path, default=RECORDS, help="a folder of validation-split records")
    for row, c in choices(ap.parse_args().records).items():
        grid = ", ".join(f"{lr:g}: {a:.4f}" for lr, a in sorted(c["grid"].items()))
        print(f"{row:16s} lr {c['lr']:g} (val_acc {c['val_acc']:.4f}; grid {grid})")
