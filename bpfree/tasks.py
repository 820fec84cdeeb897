"""What a run is scored on: the loss a rule trains against and the evaluation metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bpfree.data import TensorData, batches, length_batches


class Task:
    """What the training loop asks of a task; each default here is what a plain classifier needs.

    - `loss(output, y)`: the task loss every rule reports as `loss` (local objectives get their own keys);
    - `batches(data, batch_size, shuffle=, seed=, epoch=, augment=)`: how a split is batched;
    - `select`: None, or (metric, "min"|"max"): keep the epoch whose weights `final` scores;
    - `evaluate(predict, data, batch_size)`: per-epoch metrics through the rule's `predict`;
    - `final(rule, data, batch_size)`: scores computed once after training (translation: decode + BLEU),
      through the rule's own inference, never around it.
    """

    metrics: dict[str, str] = {}
    primary: str = ""
    select: tuple[str, str] | None = None
    batches = staticmethod(batches)

    def final(self, rule, data, batch_size: int) -> dict:
        return {}


class Classification(Task):
    """Models emit log-probabilities (B, classes); loss = NLL, metrics = accuracy (a fraction)."""

    metrics = {"test_acc": "max", "test_loss": "min"}  # how 'best over epochs' is taken
    primary = "test_acc"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def check(self, data: TensorData, name: str) -> None:
        top = int(data.y.max())
        if top >= self.num_classes:
            raise ValueError(
                f"{name} has label {top} but dataset.num_classes={self.num_classes}; "
                "fix num_classes in the dataset config"
            )

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(output, y)

    @torch.no_grad()
    def evaluate(self, predict, data: TensorData, batch_size: int) -> dict[str, float]:
        correct, total_loss = 0, 0.0
        for x, y in batches(data, batch_size, shuffle=False):
            out = predict(x)
            correct += int((out.argmax(1) == y).sum())
            total_loss += float(F.nll_loss(out, y, reduction="sum"))
        n = len(data)
        return {"test_acc": correct / n, "test_loss": total_loss / n}


TASKS = {"classification": Classification}


def smoothed_nll(logp: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean over real (non-PAD) target tokens of the label-smoothed NLL. logp (B, T, V) log-probabilities,
    y (B, T) ids. Equals F.cross_entropy(..., label_smoothing, ignore_index=PAD) on log-probabilities,
    without its second log_softmax over the vocabulary (a third of a small model's step on CPU)."""
    lp, t = logp.flatten(0, 1), y.flatten()  # (B*T, V), (B*T,)
    real = t != 0
    lp, t = lp[real], t[real]
    nll = -lp.gather(1, t[:, None]).squeeze(1)
    return ((1.0 - smoothing) * nll - smoothing * lp.mean(1)).mean()


class Translation(Task):
    """Sequence-to-sequence: models emit log-probabilities (B, T, vocab) for the target positions.

    Training loss: token NLL with label smoothing, padding ignored. Each epoch: teacher-forced loss,
    token accuracy and perplexity on val and test (cheap). The loop keeps the checkpoint with the
    lowest validation loss (`select`, abstracted-gradients §4.3) and `final` scores that one: decode
    the test sources (beam or greedy), detokenise, then BLEU / SacreBLEU / METEOR / COMET against the
    raw references; with `ablate` regions also after removing those layers (§4.3, Tables 4-7).
    """

    metrics = {"val_loss": "min", "val_acc": "max", "test_loss": "min", "test_acc": "max"}
    primary = "sacrebleu"
    select = ("val_loss", "min")  # which epoch's weights `final` scores

    def __init__(self, num_classes: int, *, tokenizer: str, test_src: list[str], test_ref: list[str],
                 vocab_size: int, label_smoothing: float = 0.1, beam_size: int = 5, length_penalty: float = 0.6,
                 max_len_a: float = 1.5, max_len_b: int = 10, decode_batch_size: int = 128,
                 comet_model: str | None = "Unbabel/wmt22-comet-da", comet_batch_size: int = 64,
                 comet_download: bool = False, nltk_data: str | None = None, ablate=None):
        import sentencepiece as spm

        if vocab_size > num_classes:
            raise ValueError(f"the tokenizer has {vocab_size} pieces but the model only {num_classes} outputs; "
                             "set dataset.num_classes >= dataset.vocab_size")
        self.num_classes, self.ls = num_classes, label_smoothing
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer)
        self.src, self.ref = test_src, test_ref
        self.beam_size, self.length_penalty, self.a, self.b = beam_size, length_penalty, max_len_a, max_len_b
        self.decode_batch_size = decode_batch_size
        self.comet_model, self.comet_batch_size, self.comet_download = comet_model, comet_batch_size, comet_download
        self.nltk_data, self.ablate = nltk_data, [list(r) for r in ablate] if ablate else None

    batches = staticmethod(length_batches)  # length-bucketed, trimmed to each batch's longest pair

    def check(self, data: TensorData, name: str) -> None:
        top = int(data.x.max())
        if top >= self.num_classes:
            raise ValueError(f"{name} has token id {top} but the model has {self.num_classes} outputs; "
                             "set dataset.num_classes >= dataset.vocab_size")

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return smoothed_nll(output, y, self.ls)

    @torch.no_grad()
    def evaluate(self, predict, data: TensorData, batch_size: int) -> dict[str, float]:
        nll, correct, tokens = 0.0, 0, 0
        for x, y in self.batches(data, batch_size, shuffle=False):
            out = predict(x)  # (B, T, V)
            real = y != 0
            nll += float(F.nll_loss(out.flatten(0, 1), y.flatten(), ignore_index=0, reduction="sum"))
            correct += int(((out.argmax(-1) == y) & real).sum())
            tokens += int(real.sum())
        loss = nll / tokens
        return {"test_loss": loss, "test_acc": correct / tokens, "test_ppl": float(torch.tensor(loss).exp())}

    @torch.no_grad()
    def translate(self, rule, src: torch.Tensor) -> list[str]:
        """src (N, S) ids -> detokenised hypotheses, decoded in length-sorted batches through the rule's
        own inference (`rule.decode`), so a rule with its own inference path is scored on it."""
        from bpfree.data.text import PAD, UNK

        lens = (src != PAD).sum(1)
        order = torch.argsort(lens, stable=True)
        hyps: list[str | None] = [None] * len(src)
        for idx in order.split(self.decode_batch_size):
            width = int(lens[idx].max())
            s = src[idx, :width]
            out = rule.decode(s, self.beam_size, int(width * self.a) + self.b, self.length_penalty)
            # ids the tokenizer lacks (a model wider than a small corpus's vocabulary) read as UNK
            out = out.cpu().masked_fill(out.cpu() >= self.sp.get_piece_size(), UNK)
            texts = self.sp.decode([r[r != PAD].tolist() for r in out])
            for i, t in zip(idx.tolist(), texts):
                hyps[i] = t
        return hyps

    def score(self, hyps: list[str]) -> dict:
        from bpfree import mt_metrics as mt

        out = {"bleu": mt.bleu(hyps, self.ref), "sacrebleu": mt.sacrebleu_score(hyps, self.ref),
               "meteor": mt.meteor(hyps, self.ref, self.nltk_data)}
        out["comet"], why = (None, "dataset.eval.comet_model is null") if not self.comet_model else \
            mt.comet(self.src, hyps, self.ref, self.comet_model, batch_size=self.comet_batch_size,
                     allow_download=self.comet_download)
        if why:
            out["comet_note"] = why
        return out

    def final(self, rule, data, batch_size: int) -> dict:
        """Scores of the selected weights on the test set (and after ablation, if configured)."""
        from bpfree.models.surgery import ablated

        model = rule.model
        rule.eval()
        src = data.test.x[:, 0].to(next(model.parameters()).device)
        hyps = self.translate(rule, src)
        out = {**self.score(hyps), "samples": [{"src": s, "hyp": h, "ref": r}
                                               for s, h, r in list(zip(self.src, hyps, self.ref))[:5]]}
        if self.ablate:
            with ablated(model, self.ablate):
                ab = self.score(self.translate(rule, src))
            out |= {f"{k}_ablated": v for k, v in ab.items()}
        return out


TASKS["translation"] = Translation
