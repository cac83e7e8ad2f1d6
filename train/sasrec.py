"""SASRec (Kang & McAuley 2018): causal self-attention over the item sequence.

The encoder half of a dense recommender (train.model.Recommender scores its last state
against every item vector); items are the shared ID (+ SID) table of train.model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config
from train.model import ItemTable, init_weights


def build(cfg: Config, items: ItemTable, max_len: int) -> SASRec:
    return SASRec(items, max_len, cfg.layers, cfg.heads, cfg.ffn_dim, cfg.dropout)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(
            2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a point-wise FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, items: ItemTable, max_len: int, layers: int = 2, heads: int = 1,
                 ffn_dim: int | None = None, dropout: float = 0.2):
        super().__init__()
        dim = items.dim
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide the model dimension ({dim})")
        self.dim, self.items = dim, items
        self.pos_emb = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, ffn_dim or dim, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(self, seq: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        """Causal hidden states (B, L, d) for left-padded item sequences (B, L); SASRec
        has no use for timestamps."""
        b, length = seq.shape
        valid = seq > 0
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        # a padding position may attend only to itself: no row of the mask is empty
        allowed = (causal & (valid[:, None, :] | eye))[:, None]
        pos = torch.arange(length, device=seq.device)
        x = self.items(seq) * math.sqrt(self.dim) + self.pos_emb(pos)
        x = self.drop(x) * valid[..., None]
        for block in self.blocks:
            x = block(x, allowed) * valid[..., None]
        return self.ln(x)
