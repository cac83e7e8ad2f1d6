"""SASRec (Kang & McAuley 2018) with full-softmax cross-entropy over the catalog, optional
semantic-ID embeddings summed into the item embeddings (as SCoTER's HSTU variant, App. A.1),
and optional SCoTER fusion of a sequence's reasoning steps.

Where the fusion applies: a row's chain H_i was generated from its whole history, so it may
describe items that are *targets* of earlier positions. The per-position next-item loss
therefore uses the plain causal states for every position but the last, and the fused state
only at the last position, whose target the chain never saw. That is SCoTER's per-sequence
fusion (eq. 7: one target per sequence, i_{T+1}); evaluation ranks with the same last state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.fusion import ScoterFusion, info_nce


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
    def __init__(self, n_items: int, max_len: int, dim: int = 64, layers: int = 2,
                 heads: int = 1, ffn_dim: int | None = None, dropout: float = 0.2,
                 sid: torch.Tensor | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide the model dimension ({dim})")
        self.dim = dim
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.sid_emb = nn.ModuleList()
        if sid is not None:
            # codes shifted by one so that 0 is the padding item's code at every level
            self.register_buffer("sid", sid + 1, persistent=False)
            for level in range(sid.shape[1]):
                self.sid_emb.append(nn.Embedding(int(sid[:, level].max()) + 2, dim,
                                                 padding_idx=0))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, ffn_dim or dim, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Item embeddings (ID plus one embedding per SID level), for `items` or all of them."""
        vec = self.item_emb.weight if items is None else self.item_emb(items)
        if self.sid_emb:
            codes = self.sid if items is None else self.sid[items]
            for level, emb in enumerate(self.sid_emb):
                vec = vec + emb(codes[..., level])
        return vec

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Causal hidden states (B, L, d) for left-padded item sequences (B, L)."""
        b, length = seq.shape
        valid = seq > 0
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        # a padding position may attend only to itself: no row of the mask is empty
        allowed = (causal & (valid[:, None, :] | eye))[:, None]
        pos = torch.arange(length, device=seq.device)
        x = self.item_vectors(seq) * math.sqrt(self.dim) + self.pos_emb(pos)
        x = self.drop(x) * valid[..., None]
        for block in self.blocks:
            x = block(x, allowed) * valid[..., None]
        return self.ln(x)


class Recommender(nn.Module):
    """Backbone plus optional fusion; computes the training losses and the ranking scores."""

    def __init__(self, backbone: SASRec, fusion: ScoterFusion | None = None,
                 lam: float = 0.1, temperature: float = 0.1):
        super().__init__()
        self.backbone, self.fusion = backbone, fusion
        self.lam, self.temperature = lam, temperature

    def _last_state(self, h_last: torch.Tensor, reasoning: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.fusion is None:
            return h_last, None
        if reasoning is None:
            raise ValueError("this model fuses reasoning: the batch needs its steps")
        fused, z_last = self.fusion(h_last[:, None], reasoning)
        # `export cache --missing skip` writes all-zero steps for a sequence without a chain:
        # such a row keeps its plain state (no fusion) and stays out of the InfoNCE term
        has = reasoning.flatten(1).abs().amax(1) > 0
        if bool(has.all()):
            return fused[:, 0], z_last
        return torch.where(has[:, None], fused[:, 0], h_last), z_last[has]

    def user_vectors(self, seq: torch.Tensor, reasoning: torch.Tensor | None = None
                     ) -> torch.Tensor:
        return self._last_state(self.backbone(seq)[:, -1], reasoning)[0]

    def scores(self, seq: torch.Tensor, reasoning: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, n_items + 1) for every item; column 0 (padding) is -inf."""
        s = self.user_vectors(seq, reasoning) @ self.backbone.item_vectors().T
        s[:, 0] = float("-inf")
        return s

    def losses(self, seq: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
               reasoning: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Cross-entropy over the full catalog at every labelled position (the last one
        fused), plus lambda * InfoNCE when fusing (eq. 8)."""
        h = self.backbone(seq)
        last, z_last = self._last_state(h[:, -1], reasoning)
        states = torch.cat([h[:, :-1], last[:, None]], dim=1)
        mask = labels > 0
        logits = states[mask] @ self.backbone.item_vectors().T
        logits[:, 0] = float("-inf")
        rec = F.cross_entropy(logits.float(), labels[mask])
        out = {"rec": rec, "loss": rec}
        if z_last is not None and len(z_last) and "contrastive" not in self.fusion.ablate:
            if reasoning is not None and len(z_last) < len(target):
                target = target[reasoning.flatten(1).abs().amax(1) > 0]
            nce = info_nce(z_last.float(), self.backbone.item_vectors(target).float(), target,
                           self.temperature)
            out["nce"] = nce
            out["loss"] = rec + self.lam * nce
        return out
