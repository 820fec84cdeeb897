"""Encoder-decoder transformer (Vaswani et al. 2017) as OpenNMT-py builds it: pre-norm layers with a
final LayerNorm, sinusoidal positions, one joint vocabulary (PAD/BOS/EOS from bpfree.data.text).

Blocks (the addressing contract): E1..En (encoder layers) then D1..Dn (decoder layers), in forward
order. Encoder blocks are called `blk(x, src_keep)`, decoder blocks `blk(y, memory, src_keep, cache)`;
the stream (B, S or T, d_model) is the first argument and the returned tensor. Attention
projections are plain nn.Linear, so feedback rules can swap them.

forward(x): x (B, 2, L) = [source ids; BOS + target ids] -> log-probabilities (B, L, vocab), teacher
forced. Decoding: `greedy(src, max_len)` and `beam(src, beam_size, max_len)` on source ids (B, S).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.data.text import BOS, EOS, PAD
from bpfree.registry import MODELS


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} is not divisible by heads={heads}")
        self.h, self.dk, self.p = heads, d // heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, h, T, dk)
        return t.unflatten(-1, (self.h, self.dk)).transpose(1, 2)

    def forward(self, q_in, kv_in=None, keep=None, causal=False, cache=None, static=False):
        """keep: (B, 1, 1, S) bool, True where a key may be attended. cache: dict holding this layer's
        keys/values between decoding steps; static=True: they depend only on kv_in (cross-attention
        over the encoder memory), so they are computed once."""
        return self.o(self.attend(q_in, kv_in, keep, causal, cache, static))

    def attend(self, q_in, kv_in=None, keep=None, causal=False, cache=None, static=False):
        """The attention mixture before the output projection `o`, (B, T, d): the weight-free
        sub-layer that target rules treat as one stage (bpfree/models/encoder.py)."""
        q = self.split(self.q(q_in))
        if cache is not None and static and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            src = q_in if kv_in is None else kv_in
            k, v = self.split(self.k(src)), self.split(self.v(src))
            if cache is not None:
                if not static and "k" in cache:  # self-attention: append this step's key/value
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0, is_causal=causal,
        )  # (B, h, T, dk)
        return out.transpose(1, 2).flatten(2)


class FeedForward(nn.Sequential):
    def __init__(self, d: int, ff: int, dropout: float):
        super().__init__(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.ff, self.drop = Attention(d, heads, dropout), FeedForward(d, ff, dropout), nn.Dropout(dropout)

    def forward(self, x, keep):  # x: (B, S, d)
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, keep=keep))
        return x + self.drop(self.ff(self.ln2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.cross = Attention(d, heads, dropout), Attention(d, heads, dropout)
        self.ff, self.drop = FeedForward(d, ff, dropout), nn.Dropout(dropout)

    def forward(self, y, memory, keep, cache=None):  # y: (B, T, d); memory: (B, S, d)
        # causal masking is needed only when all target positions run at once; a cached step sees
        # exactly the past. Padded target positions sit after the real ones, so causality alone
        # already keeps real positions from attending to them.
        h = self.ln1(y)
        y = y + self.drop(self.self_attn(h, causal=cache is None, cache=None if cache is None else cache.setdefault("self", {})))
        h = self.ln2(y)
        y = y + self.drop(self.cross(h, memory, keep=keep, cache=None if cache is None else cache.setdefault("cross", {}), static=True))
        return y + self.drop(self.ff(self.ln3(y)))


def sinusoids(length: int, d: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    return pe  # (length, d)


@MODELS.register("transformer")
class Seq2SeqTransformer(nn.Module):
    def __init__(self, input_shape, num_classes: int, *, d_model: int, heads: int, ff: int, layers: int,
                 dropout: float, tie_embeddings: bool, max_positions: int):
        super().__init__()
        self.vocab, self.d = num_classes, d_model
        self.embed = nn.Embedding(num_classes, d_model, padding_idx=PAD)  # shared by both sides
        self.register_buffer("pe", sinusoids(max_positions, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleDict(
            {f"E{i}": EncoderLayer(d_model, heads, ff, dropout) for i in range(1, layers + 1)}
            | {f"D{i}": DecoderLayer(d_model, heads, ff, dropout) for i in range(1, layers + 1)}
        )
        self.enc_norm, self.dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.generator = nn.Linear(d_model, num_classes)
        for n, p in self.named_parameters():  # OpenNMT's param_init_glorot
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if tie_embeddings:
            self.generator.weight = self.embed.weight

    def _embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:  # (B, T) -> (B, T, d)
        pos = self.pe[offset : offset + ids.shape[1]]
        return self.drop(self.embed(ids) * math.sqrt(self.d) + pos)

    def _side(self, prefix: str):
        return [b for n, b in self.blocks.items() if n.startswith(prefix)]

    def encode(self, src: torch.Tensor):
        """src (B, S) -> memory (B, S, d), keep mask (B, 1, 1, S)."""
        keep = (src != PAD)[:, None, None, :]
        x = self._embed(src)
        for blk in self._side("E"):
            x = blk(x, keep)
        return self.enc_norm(x), keep

    def decode(self, tgt_in, memory, keep, cache=None, offset: int = 0):
        """tgt_in (B, T) -> log-probabilities (B, T, vocab). With `cache` (a dict kept across calls),
        tgt_in holds only the newest position(s), starting at `offset`."""
        y = self._embed(tgt_in, offset)
        for i, blk in enumerate(self._side("D")):
            y = blk(y, memory, keep, None if cache is None else cache.setdefault(i, {}))
        return F.log_softmax(self.generator(self.dec_norm(y)), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory, keep = self.encode(x[:, 0])
        return self.decode(x[:, 1], memory, keep)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, S) -> (B, <= max_len) token ids after BOS, EOS and everything after it set to PAD."""
        memory, keep = self.encode(src)
        b = src.shape[0]
        tok = torch.full((b, 1), BOS, dtype=torch.long, device=src.device)
        out, done, cache = [], torch.zeros(b, dtype=torch.bool, device=src.device), {}
        for t in range(max_len):
            nxt = self.decode(tok, memory, keep, cache, offset=t)[:, -1].argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, PAD)
            out.append(nxt)
            done |= nxt == EOS
            if bool(done.all()):
                break
            tok = nxt[:, None]
        return _strip(torch.stack(out, 1))

    @torch.no_grad()
    def beam(self, src: torch.Tensor, beam_size: int, max_len: int, length_penalty: float = 0.6) -> torch.Tensor:
        """Beam search over all sentences at once (B * K hypotheses); finished hypotheses keep their
        score and extend only with PAD. Final choice by score / GNMT length penalty ((5+len)/6)^alpha."""
        if beam_size == 1:
            return self.greedy(src, max_len)
        b, k, dev = src.shape[0], beam_size, src.device
        memory, keep = self.encode(src)
        memory, keep = memory.repeat_interleave(k, 0), keep.repeat_interleave(k, 0)  # (B*K, S, d)
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step has K distinct picks
        seqs = torch.full((b * k, 0), PAD, dtype=torch.long, device=dev)
        tok = torch.full((b * k, 1), BOS, dtype=torch.long, device=dev)
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        cache: dict = {}
        base = (torch.arange(b, device=dev) * k)[:, None]  # (B, 1)
        for t in range(max_len):
            logp = self.decode(tok, memory, keep, cache, offset=t)[:, -1]  # (B*K, V)
            # a finished hypothesis continues only with PAD, at no cost
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, PAD] = 0.0
            logp = torch.where(done[:, None], frozen, logp)
            cand = (scores.view(-1, 1) + logp).view(b, -1)  # (B, K*V)
            scores, flat = cand.topk(k, -1)                 # (B, K)
            origin = (base + flat // self.vocab).view(-1)   # (B*K,) which hypothesis each extends
            nxt = (flat % self.vocab).view(-1)
            seqs = torch.cat([seqs[origin], nxt[:, None]], 1)
            done = done[origin] | (nxt == EOS)
            _reorder(cache, origin)
            if bool(done.all()):
                break
            tok = nxt[:, None]
        lengths = ((seqs != PAD) & (seqs != EOS)).sum(1).float() + 1.0
        norm = scores.view(-1) / (((5.0 + lengths) / 6.0) ** length_penalty)
        best = norm.view(b, k).argmax(-1) + base.view(-1)
        return _strip(seqs[best])


def _reorder(cache: dict, origin: torch.Tensor) -> None:
    """Give each surviving hypothesis its parent's self-attention keys/values. Cross-attention ones
    are equal across the K beams of a sentence and `origin` never leaves a sentence, so they stay.
    A removed (ablated) decoder layer never fills its entry, so it has nothing to reorder."""
    for layer in cache.values():
        part = layer.get("self")
        if part is not None:
            part["k"], part["v"] = part["k"][origin], part["v"][origin]


def _strip(seqs: torch.Tensor) -> torch.Tensor:
    """PAD out everything from the first EOS on (the EOS itself included)."""
    after = (seqs == EOS).int().cumsum(1) > 0
    return seqs.masked_fill(after, PAD)
