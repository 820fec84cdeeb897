"""Sentence-pair classification (natural language inference): MNLI and PASCAL RTE 1-3, as token-id
tensors for model=encoder (backprop-free-transformers §7.1).

Files under data.root:
  mnli, layout=tsv      MNLI/{train,dev_matched,dev_mismatched}.tsv (GLUE's release: tab-separated,
                        a header row, columns sentence1, sentence2, gold_label among others, no quoting)
  mnli, layout=parquet  glue/mnli/{train,validation_matched,validation_mismatched}-*.parquet (the
                        Hugging Face `glue` dataset's files: premise, hypothesis, label 0/1/2, idx)
  mnli, layout=auto     whichever of the two is present (tsv first)
  rte                   rte/corpora/rte.zip (nltk_data's package: rte/rte{1,2,3}_{dev,test}.xml,
                        <pair entailment="YES|NO"> or value="TRUE|FALSE", <t> premise, <h> hypothesis)
Both MNLI layouts are read with Hugging Face `datasets` (the csv builder with tab delimiter and no
quoting, or the parquet builder); every row is checked first, and a malformed one stops the load
with its file and line (tsv; 1-based, header = line 1) or row (parquet; 0-based).

Labels: mnli 0 entailment, 1 neutral, 2 contradiction (the HF glue order); rte 0 entailment,
1 not entailment. Splits: mnli train -> train, dev_matched -> test (the paper's development set),
dev_mismatched -> val (recorded as val_* each epoch); rte train = rte1_dev, rte1_test, rte2_dev,
rte2_test, rte3_dev (3367 pairs), test = rte3_test (800 pairs). RTE-3's test set is the only split
whose pairs are all of one challenge; GLUE's re-split (with RTE-5) is not available here.

Tokens: one SentencePiece model learned on the training split's premises and hypotheses (cached
as translation's, bpfree/data/text.py), ids PAD/UNK/BOS/EOS = 0/1/2/3; BOS serves as [CLS] and
EOS as [SEP]. x (N, 2, L) int64: x[:, 0] = [CLS] premise [SEP] hypothesis [SEP] then PAD,
x[:, 1] = segment ids (0 up to the first [SEP], 1 after it, 0 on padding); y (N,) int64.
Pairs longer than max_len lose tokens from the longer sentence first (BERT's truncation).
"""
from __future__ import annotations

import csv
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from bpfree.data.batching import Splits, TensorData
from bpfree.data.text import BOS, EOS, PAD, train_tokenizer
from bpfree.data.vision import DatasetUnavailable

MNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
RTE_LABELS = {"YES": 0, "TRUE": 0, "NO": 1, "FALSE": 1}
MNLI_TSV = {"train": "MNLI/train.tsv", "test": "MNLI/dev_matched.tsv", "val": "MNLI/dev_mismatched.tsv"}
MNLI_PARQUET = {"train": "glue/mnli/train-*.parquet", "test": "glue/mnli/validation_matched-*.parquet",
                "val": "glue/mnli/validation_mismatched-*.parquet"}
RTE_ZIP = "rte/corpora/rte.zip"
RTE_TRAIN = ["rte1_dev", "rte1_test", "rte2_dev", "rte2_test", "rte3_dev"]
RTE_TEST = ["rte3_test"]
LAYOUTS = ("auto", "tsv", "parquet")

Rows = tuple[list[str], list[str], list[int]]  # premises, hypotheses, labels

NLI = ("mnli", "rte")


class MalformedRow(ValueError):
    """A data row that cannot be read; the message names the file and the line/row."""


def _parquet_files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _has_tsv(root: Path) -> bool:
    return all((root / f).is_file() for f in MNLI_TSV.values())


def _has_parquet(root: Path) -> bool:
    return all(_parquet_files(root, p) for p in MNLI_PARQUET.values())


def nli_available(name: str, root) -> bool:
    root = Path(root)
    if name == "rte":
        return (root / RTE_ZIP).is_file()
    return _has_tsv(root) or _has_parquet(root)


def _check_tsv(path: Path) -> None:
    """Every line has the header's number of fields, the three needed columns exist, and the label
    is one of MNLI's three: else MalformedRow naming path:line."""
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\n").rstrip("\r").split("\t")
        need = ("sentence1", "sentence2", "gold_label")
        missing = [c for c in need if c not in header]
        if missing:
            raise MalformedRow(f"{path}:1: header lacks column(s) {missing}; GLUE MNLI TSV has {list(need)}")
        col = header.index("gold_label")
        for lineno, line in enumerate(f, start=2):
            fields = line.rstrip("\n").rstrip("\r").split("\t")
            if len(fields) != len(header):
                raise MalformedRow(f"{path}:{lineno}: {len(fields)} tab-separated fields, the header has "
                                   f"{len(header)}")
            if fields[col] not in MNLI_LABELS:
                raise MalformedRow(f"{path}:{lineno}: gold_label {fields[col]!r} is not one of "
                                   f"{sorted(MNLI_LABELS)}")


def _read_tsv(path: Path, cache: Path) -> Rows:
    import datasets

    _check_tsv(path)
    datasets.disable_progress_bars()
    cols = ["sentence1", "sentence2", "gold_label"]
    ds = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE,
                               usecols=cols, keep_default_na=False, na_filter=False,
                               features=datasets.Features({c: datasets.Value("string") for c in cols}),
                               split="train", keep_in_memory=True, cache_dir=str(cache / "hf_datasets"))
    return (list(ds["sentence1"]), list(ds["sentence2"]), [MNLI_LABELS[g] for g in ds["gold_label"]])


def _read_parquet(paths: list[Path], cache: Path) -> Rows:
    import datasets

    datasets.disable_progress_bars()
    prem, hyp, lab = [], [], []
    for p in paths:  # one at a time, so a bad row names its own file
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train", keep_in_memory=True,
                                   cache_dir=str(cache / "hf_datasets"))
        missing = [c for c in ("premise", "hypothesis", "label") if c not in ds.column_names]
        if missing:
            raise MalformedRow(f"{p}: no column(s) {missing}; the HF glue/mnli parquet files have "
                               "premise, hypothesis, label")
        for i, (a, b, y) in enumerate(zip(ds["premise"], ds["hypothesis"], ds["label"])):
            if not isinstance(a, str) or not isinstance(b, str) or y not in (0, 1, 2):
                raise MalformedRow(f"{p}: row {i}: premise={a!r}, hypothesis={b!r}, label={y!r} "
                                   "(need two strings and a label in 0, 1, 2; -1 marks an unlabelled test row)")
            prem.append(a), hyp.append(b), lab.append(int(y))
    return prem, hyp, lab


def read_mnli(root: Path, cache: Path, layout: str) -> dict[str, Rows]:
    if layout not in LAYOUTS:
        raise ValueError(f"dataset.layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "tsv" if _has_tsv(root) else "parquet" if _has_parquet(root) else "missing"
    if layout in ("tsv", "missing") and not _has_tsv(root) or layout == "parquet" and not _has_parquet(root):
        want = (list(MNLI_TSV.values()) if layout != "parquet" else []) + \
               (list(MNLI_PARQUET.values()) if layout != "tsv" else [])
        raise DatasetUnavailable(
            f"mnli: files not found under data.root={root}: expected {want}. Put GLUE's MNLI folder "
            "(or the HF glue/mnli parquet files) there, or set data.root; this workplace has no offline copy")
    if layout == "tsv":
        return {s: _read_tsv(root / f, cache) for s, f in MNLI_TSV.items()}
    return {s: _read_parquet(_parquet_files(root, p), cache) for s, p in MNLI_PARQUET.items()}


def _read_rte_xml(text: bytes, where: str) -> Rows:
    root = ET.fromstring(text)
    prem, hyp, lab = [], [], []
    for i, pair in enumerate(root.iter("pair")):
        label = pair.get("entailment") or pair.get("value")
        t, h = pair.find("t"), pair.find("h")
        if label not in RTE_LABELS or t is None or h is None:
            raise MalformedRow(f"{where}: pair {i} (id={pair.get('id')}): needs <t>, <h> and "
                               f"entailment=YES|NO or value=TRUE|FALSE, got label {label!r}")
        prem.append(" ".join((t.text or "").split())), hyp.append(" ".join((h.text or "").split()))
        lab.append(RTE_LABELS[label])
    return prem, hyp, lab


def read_rte(root: Path) -> dict[str, Rows]:
    path = root / RTE_ZIP
    if not path.is_file():
        raise DatasetUnavailable(f"rte: {path} not found; copy nltk_data's corpora/rte.zip into "
                                 f"{root / 'rte' / 'corpora'} or set data.root")
    out = {}
    with zipfile.ZipFile(path) as z:
        for split, names in (("train", RTE_TRAIN), ("test", RTE_TEST)):
            parts = [_read_rte_xml(z.read(f"rte/{n}.xml"), f"{path}:rte/{n}.xml") for n in names]
            out[split] = tuple(sum((p[j] for p in parts), []) for j in range(3))
    return out


def encode_nli(sp, prem: list[str], hyp: list[str], labels: list[int], max_len: int) -> TensorData:
    """(N, 2, L) ids + segments and (N,) labels; L = the longest pair after truncation (<= max_len)."""
    a_ids, b_ids = sp.encode(prem), sp.encode(hyp)
    rows, segs = [], []
    for a, b in zip(a_ids, b_ids):
        a, b = list(a), list(b)
        while len(a) + len(b) + 3 > max_len:  # BERT's longest-first truncation
            (a if len(a) >= len(b) else b).pop()
        rows.append([BOS, *a, EOS, *b, EOS])
        segs.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    width = max(map(len, rows))
    x = np.full((len(rows), 2, width), PAD, dtype=np.int64)
    for i, (r, s) in enumerate(zip(rows, segs)):
        x[i, 0, : len(r)], x[i, 1, : len(s)] = r, s
    return TensorData(torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64))


def load_nli(name: str, root: str, cache_dir: str, download: bool = False, subset: int | None = None, *,
             vocab_size: int, tokenizer: str, max_len: int, layout: str = "auto") -> Splits:
    root, cache = Path(root), Path(cache_dir)
    if name == "mnli":
        rows = read_mnli(root, cache, layout)
    elif name == "rte":
        rows = read_rte(root)
    else:
        raise KeyError(f"unknown NLI dataset {name!r}; valid: {', '.join(NLI)}")
    prem, hyp, lab = rows["train"]
    if subset:
        prem, hyp, lab = prem[:subset], hyp[:subset], lab[:subset]
    key = {"dataset": name, "subset": subset}  # not the layout: the same text gives the same pieces
    sp, _ = train_tokenizer(prem + hyp, cache, key, vocab_size, tokenizer)
    enc = lambda r: encode_nli(sp, *r, max_len)  # noqa: E731
    note = f"SentencePiece {tokenizer} {sp.get_piece_size()} pieces, max_len {max_len}"
    if name == "rte":
        note += "; PASCAL RTE-1..3 (nltk_data), test = rte3_test; not GLUE RTE"
    if subset:
        note += f"; first {subset} training pairs"
    return Splits(name, enc((prem, hyp, lab)), enc(rows["test"]), note=note,
                  val=enc(rows["val"]) if "val" in rows else None,
                  extras={})
