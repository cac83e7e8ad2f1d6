"""Order-preserving fusion of step-wise reasoning (SCoTER 3.3.2, eq. 1-8).

  z_ij     = LayerNorm(W_proj e_ij + b_proj)                          (1) adapter D -> d
  z_ij^pos = z_ij + P_j                                               (2) learnable step positions
  A_i      = Attention(h_seq, Z_i^pos, Z_i^pos)                       (3) sequence queries the steps
  g_i      = sigmoid(W_g [h_seq; A_i] + b_g)                          (4)
  E_fused  = LayerNorm(g_i * h_seq + (1 - g_i) * A_i)                 (5)
  L_InfoNCE: cosine(z_iK^pos, v_target) / tau against in-batch items  (6)
  L_total  = L_rec + lambda * L_InfoNCE                               (8)

The cross-attention (eq. 3) has its own per-head width: `heads` heads of `head_dim` each,
projected from and back to the model dimension d, so any head count works with any d
(SCoTER Table 8: d=50 with 4 heads; SCoTER-T: d_model 128 with 6 heads of d_kv 64). By
default head_dim = d // heads when that divides, else ceil(d / heads).

Ablations (SCoTER Table 4): "position" drops P_j, "contrastive" drops L_InfoNCE, "mean" and
"last" collapse H_i to the mean or the last step, "single" uses one embedding of the whole
chain instead of the steps (the cache's chain array).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ABLATIONS = ("position", "contrastive", "mean", "last", "single")
COLLAPSING = ("mean", "last", "single")


def check_ablations(ablate: frozenset[str]) -> None:
    unknown = sorted(ablate - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablation {', '.join(unknown)} (known: {', '.join(ABLATIONS)})")
    if len(ablate & set(COLLAPSING)) > 1:
        raise ValueError(f"ablations {', '.join(sorted(ablate & set(COLLAPSING)))} exclude "
                         "each other: each replaces the steps by one vector")


def default_head_dim(dim: int, heads: int) -> int:
    """dim // heads when the heads divide the model dimension, else ceil(dim / heads)."""
    return math.ceil(dim / heads)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, T, d) over keys/values (B, S, d), with `heads`
    heads of `head_dim` each, independent of d (T5-style d_kv)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        if heads < 1 or head_dim < 1:
            raise ValueError("fusion heads and head dimension must be at least 1")
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        inner = heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, inner) for _ in range(3))
        self.out = nn.Linear(inner, dim)
        for lin in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, t, _ = query.shape
        s = kv.shape[1]
        q = self.q(query).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(kv).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(kv).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class ScoterFusion(nn.Module):
    def __init__(self, step_dim: int, dim: int, n_steps: int, heads: int = 4,
                 dropout: float = 0.1, ablate: frozenset[str] = frozenset(),
                 head_dim: int | None = None):
        super().__init__()
        check_ablations(ablate)
        self.ablate = ablate
        self.head_dim = head_dim or default_head_dim(dim, heads)
        k = 1 if ablate & set(COLLAPSING) else n_steps
        self.adapter = nn.Sequential(nn.Linear(step_dim, dim), nn.LayerNorm(dim))
        self.step_pos = None if "position" in ablate else nn.Parameter(torch.randn(k, dim) * 0.02)
        self.attn = CrossAttention(dim, heads, self.head_dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.gate = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def steps(self, reasoning: torch.Tensor) -> torch.Tensor:
        """Z^pos (B, K', d) from H (B, K, D): eq. 1-2, after any collapsing ablation."""
        if "mean" in self.ablate:
            reasoning = reasoning.mean(dim=1, keepdim=True)
        elif "last" in self.ablate:
            reasoning = reasoning[:, -1:]
        z = self.adapter(reasoning)
        return z if self.step_pos is None else z + self.step_pos

    def forward(self, h: torch.Tensor, reasoning: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse sequence states h (B, T, d) with H; returns E_fused (B, T, d) and z_K^pos."""
        z = self.steps(reasoning)
        a = self.attn(h, z)
        a = self.drop(a)
        g = torch.sigmoid(self.gate(torch.cat([h, a], dim=-1)))
        return self.norm(g * h + (1 - g) * a), z[:, -1]


def info_nce(z_last: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Eq. 6 with in-batch negatives: row i's positive is its own target's embedding; other
    rows' targets are negatives, except rows sharing row i's target (not negatives)."""
    sim = F.normalize(z_last, dim=-1) @ F.normalize(item_vecs, dim=-1).T / temperature
    same = targets[:, None] == targets[None, :]
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    sim = sim.masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(targets), device=targets.device))
