"""associated-learning Table 7 and Figures 5-6: the data of what the hidden layers of BP and AL networks
encode. This file only produces data; `make tables` draws it (experiments/associated-learning/tables.yaml,
table7 `figures:`, kind `scatter` in bpfree/plots.py), so drawing never trains or touches a checkpoint.

`python experiments/associated-learning/figures.py results/records/associated-learning/table3/<run>.json ...`
(after the runs, while their checkpoints exist): rebuild each run's rule from its record, load
checkpoint_dir/last.pt, pass the first 1000 test images through the inference path (eq. 8 for AL, the
network for BP) with forward hooks on the model's blocks, and
- embed the raw input and three hidden layers in 2-D with t-SNE -> a small .npz under
  results/figures_data/associated-learning/ (float16, about 20 kB: y (N,), layers, emb_<layer> (N, 2));
- measure the inter-class distance (mean distance between class centroids), the intra-class distance
  (mean over classes of the mean pairwise distance inside the class) and their ratio on the last
  hidden layer (the input of the output layer, the "metafeatures" of §5.4) -> a derived record under
  results/records/associated-learning/table7/ (row = method, column = model; `derived_from` names the
  training record, `features` the .npz).

Layers embedded follow §5.4: MLP 2nd and 4th hidden layers and the output; vanilla CNN 4th, 8th and 12th
hidden layers. In AL these blocks lie on the eq. 8 path (f_i, the top bridge, the decoders).
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, to import bpfree

N_POINTS = 1000
FIG_LAYERS = {"mlp": ["l2", "l4", "l6"], "cnn": ["c4", "c8", "f4"]}     # §5.4
DATA_DIR = Path("results/figures_data/associated-learning")


def class_distances(z: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """z (N, D) features, y (N,) labels -> inter, intra and inter/intra (§5.4, Table 7)."""
    z = z.astype(np.float64)
    classes = np.unique(y)
    cents = np.stack([z[y == k].mean(0) for k in classes])
    d = np.linalg.norm(cents[:, None] - cents[None], axis=-1)
    inter = d[np.triu_indices(len(classes), 1)].mean()
    intra = []
    for k in classes:
        zk = z[y == k]
        dk = np.linalg.norm(zk[:, None] - zk[None], axis=-1)
        intra.append(dk[np.triu_indices(len(zk), 1)].mean())
    intra = float(np.mean(intra))
    return {"inter": float(inter), "intra": intra, "ratio": float(inter) / intra}


def _tsne(z: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    z = z.reshape(len(z), -1).astype(np.float32)
    if z.shape[1] > 50:  # the usual PCA-to-50 before t-SNE (speed; van der Maaten & Hinton 2008)
        z = PCA(50, random_state=seed).fit_transform(z)
    return TSNE(2, init="pca", perplexity=30, random_state=seed).fit_transform(z)


def extract(record_path: str | Path, records_dir: str | Path = "results/records") -> Path:
    """Features of one finished run (see the module docstring); returns the derived record's path."""
    from bpfree.data import load_dataset
    from bpfree.build import build_rule_for
    from bpfree.models import blocks
    from bpfree.records import record_path as rec_path, write_record
    from bpfree.tasks import TASKS

    with open(record_path) as f:
        rec = json.load(f)
    c = rec["config"]
    model_name = c["model"]["name"]
    if model_name not in FIG_LAYERS:
        raise ValueError(f"these figures cover models {sorted(FIG_LAYERS)} (§5.4), not {model_name!r}")
    ckpt = Path(c["checkpoint_dir"]) / "last.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} not found: rerun {record_path}'s configuration (checkpoints are "
                                "not committed), then extract again")
    ds = c["dataset"]
    data = load_dataset(ds["name"], c["data"]["root"], c["data"]["cache_dir"])
    task = TASKS[data.task](ds["num_classes"])
    rule = build_rule_for(c, ds["input_shape"], ds["num_classes"], task.loss, "cpu")  # as run.py built it
    model = rule.model
    rule.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["rule"])
    rule.eval()
    x, y = data.test.x[:N_POINTS], data.test.y[:N_POINTS]
    names = list(blocks(model).keys())
    metafeature = names[-2]  # the last hidden layer: the input of the output block
    wanted = [*FIG_LAYERS[model_name], metafeature]
    feats, hooks = {}, []
    for n in wanted:
        hooks.append(blocks(model)[n].register_forward_hook(
            lambda m, i, o, n=n: feats.__setitem__(n, o.detach().flatten(1).numpy())))
    with torch.no_grad():
        rule.predict(x)
    for h in hooks:
        h.remove()
    yy = y.numpy()
    dist = class_distances(feats[metafeature], yy)
    emb = {"raw": _tsne(x.numpy())}
    emb.update({n: _tsne(feats[n]) for n in FIG_LAYERS[model_name]})
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    out = DATA_DIR / f"{rec['name']}.npz"
    np.savez_compressed(out, y=yy.astype(np.int8), layers=np.array(list(emb)),
                        **{f"emb_{k}": v.astype(np.float16) for k, v in emb.items()})

    derived = copy.deepcopy(rec)
    derived.update({
        "table": "table7", "row": rec["method"], "column": model_name,
        "metrics": {"final": dist, "best": dist, "per_epoch": []},
        "derived_from": str(record_path), "features": str(out),
        "feature_layer": metafeature, "feature_points": int(len(yy)),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return write_record(derived, rec_path(records_dir, rec["paper"], "table7", rec["name"]))


def shown_in_table3(model: str, seed: int = 0, records_dir: str | Path = "results/records") -> list[Path]:
    """The Table 3 records of `model` (its config name: mlp, cnn) at `seed` that Table 3 shows, one each
    for BP and AL (Table 7's rows): the longest-trained, as `make tables` keeps them
    (bpfree.tables.one_per_seed), so Table 7 describes the same networks as the accuracy beside it."""
    from bpfree.records import validate
    from bpfree.tables import one_per_seed

    runs = []
    for p in sorted((Path(records_dir) / "associated-learning" / "table3").glob("*.json")):
        r = validate(json.loads(p.read_text()))
        if r["model"] == model and r["seed"] == seed and r["status"] == "ok" and r["method"] in ("bp", "al"):
            runs.append({**r, "_path": p})
    kept, _ = one_per_seed(runs)
    if not kept:
        raise SystemExit(f"no finished Table 3 record of model {model!r}, seed {seed} under {records_dir}")
    return [r["_path"] for r in kept]


USAGE = ("usage: python experiments/associated-learning/figures.py RECORD.json [...] | --table3 MODEL [SEED]\n"
         "(after training, while the runs' checkpoints exist; --table3 takes the records Table 3 shows; "
         "`make tables` then draws Figures 5-6 from the table7 records)")

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or (args[0] == "--table3" and len(args) not in (2, 3)):
        raise SystemExit(USAGE)
    todo = shown_in_table3(args[1], int(args[2]) if len(args) == 3 else 0) if args[0] == "--table3" else args
    for p in todo:
        print(f"wrote {extract(p)}")
