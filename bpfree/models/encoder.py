"""BERT-style encoder classifier: backprop-free-transformers §7 (Devlin et al. 2019's post-LN layer).

Each layer l (post-LN, the paper's chain z_{4l+1}..z_{4l+4}):
    z_{4l+1} = self-attention(W_Q z, W_K z, W_V z)          attn.q / attn.k / attn.v (nn.Linear), softmax
                                                             over real keys only (padding mask)
    z_{4l+2} = LayerNorm(dropout(W_n z_{4l+1}) + z_{4l})     attn.o is W_n; ln1
    z_{4l+3} = GELU(W_i z_{4l+2})                            wi
    z_{4l+4} = LayerNorm(dropout(W_o z_{4l+3}) + z_{4l+2})   wo; ln2
The attention itself is bpfree.models.transformer.Attention (the seq2seq model's, shared): Q/K/V and
the output projection are plain nn.Linear, so the feedback converter swaps every projection.

Input, one of two kinds (`patch`):
  text   (patch=null): x (N, 2, L) int64, x[:, 0] token ids ([CLS] premise [SEP] hypothesis [SEP],
         PAD = 0 after), x[:, 1] segment ids (0 premise side, 1 hypothesis side); token + learned
         position + segment embeddings (bpfree/data/nli.py makes these tensors);
  images (patch=p):    x (N, C, H, W) cut into (H/p)(W/p) non-overlapping p x p patches (zero-padded
         to a multiple of p), each a token
         (a Linear patch embedding), after a learned [CLS] vector: the CPU stand-in (MNIST, p=7 -> 16
         patches + CLS = 17 tokens).
Both are followed by LayerNorm + dropout (BERT's embedding block).

Classification: `pool=cls` reads the first token ([CLS], as BERT); `pool=mean` averages the real
tokens. Then one Linear and log_softmax: log-probabilities (N, classes), like every bpfree classifier.

Blocks (the addressing contract): emb, L1..Ln, head. emb(x) -> stream (N, T, d); L_i(stream, keep)
-> stream, keep (N, 1, 1, T) bool = which keys may be attended (None when nothing is padded);
head(stream, real) -> log-probabilities, real (N, T) bool. `padding_mask(x)` gives `real`.

`stages(x)`: the chain for target rules (dtp_chain, lra_chain): every sub-layer as a Stage with its
pre-activation and its (non-componentwise, for attention and LayerNorm) activation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.data.text import PAD
from bpfree.models.transformer import Attention
from bpfree.registry import MODELS


class Embeddings(nn.Module):
    def __init__(self, input_shape, d: int, dropout: float, *, patch: int | None, vocab_size: int | None,
                 segments: int):
        super().__init__()
        self.patch = patch
        if patch is None:  # text: input_shape (2, L)
            if vocab_size is None:
                raise ValueError("model=encoder on text needs model.vocab_size (set by the dataset's "
                                 "vocab_size); for images set model.patch (e.g. model=encoder_patches)")
            if len(input_shape) != 2 or input_shape[0] != 2:
                raise ValueError(f"model=encoder with patch=null reads (ids; segments) of shape (2, L); "
                                 f"the dataset's input_shape is {list(input_shape)}: set model.patch for images")
            positions = input_shape[1]
            self.tok = nn.Embedding(vocab_size, d, padding_idx=PAD)
            self.seg = nn.Embedding(segments, d)
        else:              # images: input_shape (C, H, W)
            c, h, w = input_shape  # an image not a multiple of patch is zero-padded at the bottom/right
            positions = -(-h // patch) * -(-w // patch) + 1
            self.proj = nn.Linear(c * patch * patch, d)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Embedding(positions, d)
        self.ln, self.drop = nn.LayerNorm(d), nn.Dropout(dropout)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding sum before LayerNorm, (N, T, d)."""
        if self.patch is None:
            ids, seg = x[:, 0], x[:, 1]  # (N, L) each
            e = self.tok(ids) + self.seg(seg)
        else:
            p = self.patch
            x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
            t = F.unfold(x, p, stride=p).transpose(1, 2)  # (N, patches, C*p*p), row-major patches
            e = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(t)], 1)
        return e + self.pos.weight[: e.shape[1]]

    def forward(self, x):
        return self.drop(self.ln(self.tokens(x)))


class PostLNLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.attn = Attention(d, heads, dropout)  # q, k, v = W_Q, W_K, W_V; o = W_n
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.wi, self.act, self.wo = nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, z, keep):  # z: (N, T, d)
        z2 = self.ln1(self.drop(self.attn(z, keep=keep)) + z)
        return self.ln2(self.drop(self.wo(self.act(self.wi(z2)))) + z2)


def follow_dtype(ln: nn.LayerNorm):
    """ln as a function that computes in its input's dtype (LRA forms its error units in float64)."""
    return lambda a: F.layer_norm(a, ln.normalized_shape, ln.weight.to(a.dtype), ln.bias.to(a.dtype), ln.eps)


class Head(nn.Module):
    def __init__(self, d: int, num_classes: int, pool: str):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"model.pool={pool!r}; valid: cls (first token, BERT) or mean (real tokens)")
        self.pool_kind, self.out = pool, nn.Linear(d, num_classes)

    def pool(self, z, real):  # (N, T, d) -> (N, d)
        if self.pool_kind == "cls":
            return z[:, 0]
        if real is None:
            return z.mean(1)
        w = real.to(z.dtype)[..., None]  # (N, T, 1)
        return (z * w).sum(1) / w.sum(1)

    def forward(self, z, real):
        return F.log_softmax(self.out(self.pool(z, real)), -1)


@dataclass
class Stage:
    """One link z_{k-1} -> z_k of the chain: a = pre(z_{k-1}, side), z_k = act(a). `side` is the
    residual input (the stream two links back) for the post-LN sub-layers, else None. `weight` is the
    stage's main forward matrix (what an LRA error matrix follows); None for the embedding."""
    name: str
    pre: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    residual: bool
    weight: torch.Tensor | None


@MODELS.register("encoder")
class Encoder(nn.Module):
    def __init__(self, input_shape, num_classes: int, *, d_model: int, heads: int, ff: int, layers: int,
                 dropout: float, pool: str, patch: int | None, vocab_size: int | None, segments: int,
                 init_std: float):
        super().__init__()
        if layers < 1:
            raise ValueError(f"model.layers must be >= 1, got {layers}")
        self.input_shape, self.patch = tuple(input_shape), patch
        self.blocks = nn.ModuleDict(
            {"emb": Embeddings(input_shape, d_model, dropout, patch=patch, vocab_size=vocab_size, segments=segments)}
            | {f"L{i}": PostLNLayer(d_model, heads, ff, dropout) for i in range(1, layers + 1)}
            | {"head": Head(d_model, num_classes, pool)}
        )
        for m in self.modules():  # BERT's initializer_range
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, init_std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if patch is None:
            with torch.no_grad():
                self.blocks["emb"].tok.weight[PAD].zero_()

    def padding_mask(self, x) -> torch.Tensor | None:
        """(N, T) bool, True at real tokens; None when the input has no padding (image patches)."""
        return None if self.patch is not None else x[:, 0] != PAD

    def forward(self, x):
        real = self.padding_mask(x)
        keep = None if real is None else real[:, None, None, :]  # (N, 1, 1, T): keys that may be attended
        z = self.blocks["emb"](x)
        for name, blk in self.blocks.items():
            if name.startswith("L"):
                z = blk(z, keep)
        return self.blocks["head"](z, real)

    def stages(self, x) -> tuple[torch.Tensor | None, list[Stage]]:
        """The chain for target rules: (real (N, T) bool or None, stages emb, L1.attn, L1.wn, L1.wi,
        L1.wo, ..., Ln.wo). Stage `emb` reads x; every later one reads the previous stage's output."""
        real = None if x is None else self.padding_mask(x)  # x=None: only the stages' names and weights
        keep = None if real is None else real[:, None, None, :]
        emb = self.blocks["emb"]
        emb_ln = follow_dtype(emb.ln)
        out = [Stage("emb", lambda x_, _: emb.tokens(x_), lambda a: emb.drop(emb_ln(a)), False, None)]
        for name, blk in self.blocks.items():
            if not name.startswith("L"):
                continue
            out += [
                Stage(f"{name}.attn", lambda z, _, b=blk: b.attn.attend(z, keep=keep), lambda a: a, False,
                      blk.attn.v.weight),
                Stage(f"{name}.wn", lambda z, s, b=blk: b.drop(b.attn.o(z)) + s, follow_dtype(blk.ln1), True,
                      blk.attn.o.weight),
                Stage(f"{name}.wi", lambda z, _, b=blk: b.wi(z), blk.act, False, blk.wi.weight),
                Stage(f"{name}.wo", lambda z, s, b=blk: b.drop(b.wo(z)) + s, follow_dtype(blk.ln2), True,
                      blk.wo.weight),
            ]
        return real, out
