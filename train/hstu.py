"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words", ICML): the sequential
transducer SCoTER reports its gains on (App. A.1), after the reference implementation
facebookresearch/generative-recommenders (research/modeling/sequential/hstu.py).

One block, for x (B, L, d):
    U, V, Q, K = split(SiLU(LayerNorm(x) W1))            W1: d -> 2 H dv + 2 H dqk, no bias
    A = SiLU(Q K^T + rab) / L, causal and padding-masked  no softmax: pointwise aggregation
    x = x + W2(Dropout(LayerNorm(A V) * U))               gating by U
What the reference does and this file keeps: item embeddings scaled by sqrt(d) plus learned
absolute positions (truncated normal, std sqrt(1/d)), dropout on that input and before W2,
LayerNorms without affine weights inside the block, W1 ~ N(0, 0.02), W2 Xavier-uniform,
A divided by the padded length L (not by each row's length), rab shared by all heads.
What differs: histories are left-padded (the reference is jagged, right-aligned to 0), so
padding rows are zeroed after every block; the reference's query i reads the *target's*
timestamp at the last position, here the last position repeats its own time so that no
property of the target reaches the model; the output gets a LayerNorm (the reference
L2-normalises it, which train.model.Recommender does under --loss sampled) so that the
full-softmax dot product keeps a learnable scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config
from train.model import ItemTable, init_weights

#: time buckets: floor(log(|dt| seconds) / 0.301), clamped to 0..TIME_BUCKETS, as the
#: reference (0.301 ~ log10 2 on a natural log: about 1.35x wider per bucket, 128 buckets)
TIME_BUCKETS = 128
TIME_LOG_BASE = 0.301


def build(cfg: Config, items: ItemTable, max_len: int) -> HSTU:
    return HSTU(items, max_len, cfg.layers, cfg.heads, cfg.dropout)


class RelativeBias(nn.Module):
    """rab (B or 1, L, L): a learned weight per causal distance i - j, plus, with
    timestamps, a learned weight per log-bucket of t[i + 1] - t[j] (query i is judged by
    when the *next* item came, the reference's RelativeBucketedTimeAndPositionBasedBias;
    the last query repeats its own time, so the target's time is never read)."""

    def __init__(self, max_len: int, buckets: int = TIME_BUCKETS):
        super().__init__()
        self.buckets = buckets
        self.pos_w = nn.Parameter(torch.empty(max_len).normal_(std=0.02))
        self.time_w = nn.Parameter(torch.empty(buckets + 1).normal_(std=0.02))

    def time_buckets(self, time: torch.Tensor) -> torch.Tensor:
        """(B, L, L) bucket of t[i + 1] - t[j], t[L] := t[L - 1]."""
        nxt = torch.cat([time[:, 1:], time[:, -1:]], dim=1)
        dt = (nxt[:, :, None] - time[:, None, :]).abs().clamp(min=1).float()
        return (dt.log() / TIME_LOG_BASE).long().clamp(0, self.buckets)

    def forward(self, length: int, time: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(length, device=self.pos_w.device)
        dist = (pos[:, None] - pos[None, :]).clamp(0, len(self.pos_w) - 1)
        bias = self.pos_w[dist][None]  # only i >= j survives the causal mask
        if time is None:
            return bias
        return bias + self.time_w[self.time_buckets(time)]


class HSTUBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, eps: float = 1e-6):
        super().__init__()
        self.heads, self.dqk, self.dv, self.eps = heads, dim // heads, dim // heads, eps
        self.uvqk = nn.Linear(dim, 2 * heads * (self.dv + self.dqk), bias=False)
        self.out = nn.Linear(heads * self.dv, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, rab: torch.Tensor
                ) -> torch.Tensor:
        b, length, dim = x.shape
        h = self.heads
        normed = F.layer_norm(x, (dim,), eps=self.eps)
        u, v, q, k = F.silu(self.uvqk(normed)).split(
            [h * self.dv, h * self.dv, h * self.dqk, h * self.dqk], dim=-1)
        q = q.view(b, length, h, self.dqk).transpose(1, 2)
        k = k.view(b, length, h, self.dqk).transpose(1, 2)
        v = v.view(b, length, h, self.dv).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) + rab[:, None]  # (B, H, L, L)
        attn = F.silu(scores) / length * allowed[:, None]
        a = (attn @ v).transpose(1, 2).reshape(b, length, h * self.dv)
        gated = F.layer_norm(a, (h * self.dv,), eps=self.eps) * u
        return x + self.out(self.drop(gated))


class HSTU(nn.Module):
    """Causal HSTU encoder over the shared item table; uses timestamps when given."""

    uses_time = True  # train.loop says once when the cache has none

    def __init__(self, items: ItemTable, max_len: int, layers: int = 2, heads: int = 1,
                 dropout: float = 0.2):
        super().__init__()
        dim = items.dim
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide the model dimension ({dim})")
        self.dim, self.items = dim, items
        self.pos_emb = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.rab = RelativeBias(max_len)
        self.blocks = nn.ModuleList(HSTUBlock(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.apply(init_weights)
        # the reference's initialisation, where it differs from init_weights' N(0, 0.02)
        nn.init.trunc_normal_(self.pos_emb.weight, std=math.sqrt(1.0 / dim),
                              a=-2 * math.sqrt(1.0 / dim), b=2 * math.sqrt(1.0 / dim))
        for block in self.blocks:
            nn.init.xavier_uniform_(block.out.weight)

    def forward(self, seq: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        """Causal states (B, L, d) for left-padded sequences (B, L); `time` (B, L) unix
        seconds adds the time bias, None leaves the position bias alone."""
        b, length = seq.shape
        valid = seq > 0
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        allowed = (causal & valid[:, None, :]).to(self.pos_emb.weight.dtype)
        pos = torch.arange(length, device=seq.device)
        x = self.items(seq) * math.sqrt(self.dim) + self.pos_emb(pos)
        x = self.drop(x) * valid[..., None]
        rab = self.rab(length, time)
        for block in self.blocks:
            x = block(x, allowed, rab) * valid[..., None]
        return self.ln(x)
