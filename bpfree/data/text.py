"""Parallel text for translation: Multi30k (task 1) and IWSLT 2017, tokenised by a SentencePiece
model learned on the training split.

Files are read with Hugging Face `datasets` from the local copies under `root`:
  multi30k/{train,val,test_2016_flickr}.{de,en}.gz   one sentence per line (github multi30k/dataset)
  iwslt2017/de-en/train.tags.de-en.{de,en}            the release's own format: talk metadata in
  iwslt2017/de-en/IWSLT17.TED.{dev2010,tst2010}.de-en.{de,en}.xml   <tag> lines, then one segment per
                                                      line; dev/test as <seg id="n"> ... </seg>
(the extracted `texts/de/en/de-en.tgz` of the 2017-01-trnted release, the files the HF `iwslt2017`
script reads). Online users may set `hub` to a Hugging Face dataset id instead.

Tensors (one TensorData per split), with PAD = 0, BOS = 2, EOS = 3 and L the longest side:
  x: (N, 2, L) int64; x[:, 0] = source ids + EOS, x[:, 1] = BOS + target ids (decoder input)
  y: (N, L)    int64; target ids + EOS (what the decoder must predict), PAD where nothing is
"""
from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from bpfree import atomic
from bpfree.data.batching import Splits, TensorData
from bpfree.data.verify import verify_files
from bpfree.data.vision import DatasetUnavailable

PAD, UNK, BOS, EOS = 0, 1, 2, 3

Pairs = dict[str, tuple[list[str], list[str]]]  # split -> (source sentences, target sentences)


@dataclass(frozen=True)
class TextSpec:
    langs: tuple[str, str]                     # the pair as the files name it
    files: Callable[[str, str], dict[str, tuple[str, str]]]  # (src, tgt) -> split -> (src file, tgt file)
    read: Callable[[list[Path], Path], list[list[str]]]  # (files, cache dir) -> their sentences, aligned
    hub: str                                   # the Hugging Face id online users may point at
    missing: str                               # what to do when the files are absent


def _hf_text(paths: list[Path], cache: Path) -> list[list[str]]:
    """One sentence per line, read with HF datasets' `text` builder (handles .gz); its Arrow files go
    under data.cache_dir, not ~/.cache."""
    import datasets

    datasets.disable_progress_bars()
    out = []
    for p in paths:
        key = (str(p), p.stat().st_mtime_ns)  # memoised per process: sweeps and tests read a corpus once
        if key not in _LINES:
            ds = datasets.load_dataset("text", data_files=str(p), split="train", keep_in_memory=True,
                                       cache_dir=str(cache / "hf_datasets"))
            _LINES[key] = tuple(s.strip() for s in ds["text"])
        out.append(list(_LINES[key]))
    return out


_LINES: dict[tuple[str, int], tuple[str, ...]] = {}


_SEG = re.compile(r"<seg[^>]*>(.*?)</seg>", re.S)


def _iwslt_read(paths: list[Path], cache: Path | None = None) -> list[list[str]]:
    """IWSLT 2017 release files: train.tags.* (metadata lines start with '<'; the rest are
    segments) or *.xml (segments in <seg> elements). Parsed as the HF `iwslt2017` script does."""
    import datasets

    out = []
    for p in paths:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".xml":
            root = ET.fromstring(text)  # a malformed file fails here, naming the parse error
            segs = [(s.text or "").strip() for s in root.iter("seg")]
        else:
            segs = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("<")]
        # through `datasets` so both corpora share one in-memory representation
        out.append(datasets.Dataset.from_dict({"text": segs})["text"])
    return out


def _multi30k_files(src: str, tgt: str) -> dict[str, tuple[str, str]]:
    return {s: (f"multi30k/{f}.{src}.gz", f"multi30k/{f}.{tgt}.gz")
            for s, f in (("train", "train"), ("val", "val"), ("test", "test_2016_flickr"))}


def _iwslt_files(src: str, tgt: str) -> dict[str, tuple[str, str]]:
    d = "iwslt2017/de-en"
    out = {"train": (f"{d}/train.tags.de-en.{src}", f"{d}/train.tags.de-en.{tgt}")}
    for split, tag in (("val", "dev2010"), ("test", "tst2010")):
        out[split] = (f"{d}/IWSLT17.TED.{tag}.de-en.{src}.xml", f"{d}/IWSLT17.TED.{tag}.de-en.{tgt}.xml")
    return out


TEXT = {
    "multi30k": TextSpec(("de", "en"), _multi30k_files, _hf_text, "bentrevett/multi30k",
                         "copy multi30k/data/task1/raw/{train,val,test_2016_flickr}.{de,en}.gz there"),
    "iwslt17": TextSpec(("de", "en"), _iwslt_files, _iwslt_read, "IWSLT/iwslt2017",
                        "extract the IWSLT 2017 release's texts/de/en/de-en.tgz into iwslt2017/ there "
                        "(no offline copy exists in this workplace: its cells say unavailable)"),
}


def text_available(name: str, root) -> bool:
    spec = TEXT[name]
    return all((Path(root) / f).exists() for pair in spec.files(*spec.langs).values() for f in pair)


def _read_local(spec: TextSpec, root: Path, cache: Path, name: str, src: str, tgt: str) -> Pairs:
    files = spec.files(src, tgt)
    missing = [f for pair in files.values() for f in pair if not (root / f).exists()]
    if missing:
        raise DatasetUnavailable(
            f"{name}: {len(missing)} file(s) missing under data.root={root} (e.g. {missing[0]}); "
            f"{spec.missing}, or set data.root"
        )
    verify_files(root, [f for pair in files.values() for f in pair], cache)  # root/SHA256SUMS, once
    out = {}
    for split, (fs, ft) in files.items():
        s, t = spec.read([root / fs, root / ft], cache)
        if len(s) != len(t):
            raise ValueError(f"{name} {split}: {len(s)} source vs {len(t)} target sentences in {fs} / {ft}")
        out[split] = (s, t)
    return out


def _read_hub(hub: str, src: str, tgt: str) -> Pairs:  # pragma: no cover - needs the internet
    import datasets

    ds = datasets.load_dataset(hub)
    names = {"train": "train", "val": "validation", "test": "test"}
    out = {}
    for split, hf in names.items():
        cols = ds[hf].column_names
        if "translation" in cols:  # the iwslt2017 layout: {"translation": {"de": ..., "en": ...}}
            tr = ds[hf]["translation"]
            out[split] = ([r[src] for r in tr], [r[tgt] for r in tr])
        else:                      # the multi30k layout: one column per language
            out[split] = (list(ds[hf][src]), list(ds[hf][tgt]))
    return out


def train_tokenizer(texts: list[str], cache_dir: Path, key: dict, vocab_size: int, model_type: str):
    """A joint SentencePiece model over both languages, cached under cache_dir by its settings and
    the training text's hash (so a changed corpus or setting never reuses a stale model)."""
    import sentencepiece as spm

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for s in texts:
        h.update(s.encode())
        h.update(b"\n")
    prefix = Path(cache_dir) / "sentencepiece" / f"{key['dataset']}-{model_type}{vocab_size}-{h.hexdigest()[:12]}"
    model = prefix.with_suffix(".model")
    if not model.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temporary_beside(prefix)  # two runs sharing the cache may train it at once
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(tmp), vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS,
            eos_id=EOS, num_threads=1, minloglevel=2,
            hard_vocab_limit=False,  # a small corpus (subset) gets fewer pieces instead of an error
        )
        Path(f"{tmp}.vocab").replace(prefix.with_suffix(".vocab"))
        Path(f"{tmp}.model").replace(model)  # last: its presence means the pair is complete
    return spm.SentencePieceProcessor(model_file=str(model)), model


def _pad(seqs: list[list[int]], width: int) -> torch.Tensor:
    """(N, width) int64, PAD-filled; the Python loop is over sentences at load time, not tokens."""
    out = np.full((len(seqs), width), PAD, dtype=np.int64)
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(len(seqs)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    out[rows, cols] = flat
    return torch.from_numpy(out)


def encode_pairs(sp, src: list[str], tgt: list[str]) -> TensorData:
    s = [ids + [EOS] for ids in sp.encode(src)]
    t = sp.encode(tgt)
    width = max(max(map(len, s)), max(map(len, t)) + 1)
    x = torch.stack([_pad(s, width), _pad([[BOS] + ids for ids in t], width)], 1)  # (N, 2, L)
    y = _pad([ids + [EOS] for ids in t], width)                                     # (N, L)
    return TensorData(x, y)


def load_text(name: str, root: str, cache_dir: str, download: bool = False, subset: int | None = None, *,
              src_lang: str, tgt_lang: str, vocab_size: int = 8000, tokenizer: str = "unigram",
              max_len: int = 100, hub: str | None = None) -> Splits:
    """Splits(task='translation') with train/val/test TensorData and, in `extras`, the tokenizer path
    and the raw test/val sentences that detokenised metrics compare against."""
    spec = TEXT[name]
    if {src_lang, tgt_lang} != set(spec.langs):
        raise ValueError(f"{name} pairs {spec.langs}; got src_lang={src_lang!r}, tgt_lang={tgt_lang!r}")
    pairs = _read_hub(hub, src_lang, tgt_lang) if hub else _read_local(spec, Path(root), Path(cache_dir), name, src_lang, tgt_lang)
    tr_src, tr_tgt = pairs["train"]
    if subset:
        tr_src, tr_tgt = tr_src[:subset], tr_tgt[:subset]
    key = {"dataset": name, "src": src_lang, "tgt": tgt_lang, "subset": subset, "hub": hub}
    sp, model_path = train_tokenizer(tr_src + tr_tgt, Path(cache_dir), key, vocab_size, tokenizer)
    train = encode_pairs(sp, tr_src, tr_tgt)
    # drop overlong training pairs (OpenNMT's src/tgt_seq_length filter); evaluation keeps everything
    keep = ((train.x != PAD).sum(-1).amax(1) <= max_len)
    train = TensorData(train.x[keep], train.y[keep])
    width = int((train.x != PAD).sum(-1).max())
    train = TensorData(train.x[..., :width].contiguous(), train.y[:, :width].contiguous())
    val, test = encode_pairs(sp, *pairs["val"]), encode_pairs(sp, *pairs["test"])
    note = f"{src_lang}->{tgt_lang}; SentencePiece {tokenizer} {sp.get_piece_size()} (joint)"
    if subset:
        note += f"; first {subset} training pairs"
    return Splits(
        name, train, test, task="translation", note=note, val=val,
        extras={"tokenizer": str(model_path), "test_src": pairs["test"][0], "test_ref": pairs["test"][1],
                "vocab_size": sp.get_piece_size()},
    )


def length_batches(data: TensorData, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                   augment=None, pool: int = 100) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of similar-length pairs, trimmed to their longest member.

    Shuffled pools of `pool * batch_size` pairs are sorted by length and cut into batches, whose
    order is then shuffled; the order depends only on (seed, epoch), as in `batches`. Padding per
    batch is what the longest pair needs, so attention and the softmax never run over dead columns.
    """
    n = len(data)
    lens = (data.x != PAD).sum(-1).amax(1).cpu()  # (N,) longest side of each pair
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        g, order = None, torch.arange(n)
    chunks = []
    step = pool * batch_size
    for i in range(0, n, step):
        idx = order[i : i + step]
        idx = idx[torch.argsort(lens[idx], stable=True)]
        chunks += list(idx.split(batch_size))
    if shuffle:
        chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=g)]
    for idx in chunks:
        width = int(lens[idx].max())
        idx = idx.to(data.y.device)
        yield data.x[idx, :, :width], data.y[idx, :width]
