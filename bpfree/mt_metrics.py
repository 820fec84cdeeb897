"""Translation metrics, as fractions in [0, 1] like the paper's tables (COMET as the model outputs it).

- BLEU: corpus BLEU of word tokens, the paper-era "tokenized BLEU": hypothesis and reference are
  split by nltk's word tokenizer (Treebank rules, no downloads) and scored by sacrebleu with
  tokenize='none', so sacrebleu only counts n-grams of those tokens.
- SacreBLEU: sacrebleu's standard signature on the detokenised strings (13a tokenizer, mixed case,
  exp smoothing), the number comparable across papers.
- METEOR: nltk's meteor_score per sentence (WordNet synonyms, from the local nltk_data), averaged.
- COMET: unbabel-comet on (source, hypothesis, reference) triples; system score. Returns None with
  the reason when no model can be loaded (offline, no local checkpoint).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import sacrebleu


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer  # word_tokenize without punkt sentence splitting

    return NLTKWordTokenizer()


def words(text: str) -> list[str]:
    return _word_tokenizer().tokenize(text)


def _streams(refs) -> list[list[str]]:
    """One reference per hypothesis (list[str]) or several reference streams (list[list[str]])."""
    return [refs] if refs and isinstance(refs[0], str) else list(refs)


def bleu(hyps: list[str], refs) -> float:
    h = [" ".join(words(s)) for s in hyps]
    r = [[" ".join(words(s)) for s in stream] for stream in _streams(refs)]
    return sacrebleu.corpus_bleu(h, r, tokenize="none", force=True).score / 100.0


def sacrebleu_score(hyps: list[str], refs) -> float:
    return sacrebleu.corpus_bleu(hyps, _streams(refs)).score / 100.0


def meteor(hyps: list[str], refs: list[str], nltk_data: str | None = None) -> float:
    import nltk
    from nltk.translate.meteor_score import meteor_score

    if nltk_data and nltk_data not in nltk.data.path:
        nltk.data.path.insert(0, nltk_data)
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError as e:
        raise LookupError(
            f"METEOR needs WordNet under one of {nltk.data.path[:3]}...; set NLTK_DATA or "
            "dataset.eval.nltk_data to a folder holding corpora/wordnet (shared/data/nltk_data here)"
        ) from e
    scores = [meteor_score([words(r)], words(h), wordnet=wordnet) for h, r in zip(hyps, refs)]
    return sum(scores) / max(len(scores), 1)


def resolve_comet(model: str, allow_download: bool = False) -> str:
    """A COMET checkpoint path: `model` itself when it is a .ckpt file, its checkpoints/model.ckpt
    when a folder, else a Hugging Face id looked up in the local cache (downloaded only if allowed)."""
    p = Path(model)
    if p.is_file():
        return str(p)
    if p.is_dir():
        ckpt = p / "checkpoints" / "model.ckpt"
        if ckpt.is_file():
            return str(ckpt)
        raise FileNotFoundError(f"{p} holds no checkpoints/model.ckpt (a COMET model folder has hparams.yaml + that)")
    from huggingface_hub import snapshot_download

    # local_files_only: offline, a hub id fails at once instead of waiting on the network
    folder = snapshot_download(model, local_files_only=not allow_download)
    return str(Path(folder) / "checkpoints" / "model.ckpt")


def comet(srcs: list[str], hyps: list[str], refs: list[str], model: str, *, batch_size: int = 64,
          allow_download: bool = False, gpus: int = 0) -> tuple[float | None, str]:
    """(system score, '') or (None, why it could not be computed)."""
    try:
        ckpt = resolve_comet(model, allow_download)
    except Exception as e:  # noqa: BLE001 - any failure to find a model means "no COMET", not a crash
        return None, f"COMET model {model!r} unavailable ({type(e).__name__}); set dataset.eval.comet_model to a local checkpoint"
    import logging

    from comet import load_from_checkpoint

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "comet"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    m = load_from_checkpoint(ckpt, local_files_only=True)
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
    out = m.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False, num_workers=0)
    return float(out.system_score), ""
