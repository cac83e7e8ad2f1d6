"""What the dense backbones (SASRec, HSTU) share: the item table (ID embedding plus one
embedding per semantic-ID level, summed, as SCoTER's HSTU variant, App. A.1) and the
Recommender that scores a sequence's last state against every item vector, with
full-softmax cross-entropy over the catalog (default) or sampled softmax, and optional
SCoTER fusion of the reasoning.

Sampled softmax (`loss="sampled"`) is generative-recommenders' ML-1M recipe (configs/ml-1m/
{sasrec,hstu}-sampled-softmax-n128-final.gin): states and item vectors L2-normalised (eps
1e-6), logits divided by a temperature of 0.05, 128 negatives drawn uniformly from the
catalog, a negative equal to the positive masked out. Here one set of negatives is drawn
per batch and shared by all its positions (the reference draws per position): the same
estimator in expectation, at a (positions x N) matmul instead of a gather per position.
Ranking then scores by the same cosine / temperature.

Where the fusion applies: a row's chain H_i was generated from its whole history, so it may
describe items that are *targets* of earlier positions. The per-position next-item loss
therefore uses the plain causal states for every position but the last, and the fused state
only at the last position, whose target the chain never saw. That is SCoTER's per-sequence
fusion (eq. 7: one target per sequence, i_{T+1}); evaluation ranks with the same last state.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from train.fusion import ScoterFusion, info_nce

LOSSES = ("full", "sampled")
L2_EPS = 1e-6  # generative-recommenders' l2_norm_eps


class _Workspace:
    """One reusable (rows x items) float buffer for `catalog_cross_entropy`: at ML-1M's
    L200 a batch's logits are ~190 MB, and a fresh buffer of that size per step is fresh
    pages from the kernel (mmap, page faults: the sys time that dominated an epoch).
    Taken by a forward, given back by its backward: a second forward before the first's
    backward (or a graph dropped without one) simply allocates its own."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []

    def take(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of at least rows * cols elements of `like`'s dtype and device."""
        buf = self.free.pop() if self.free else like.new_empty(0)
        if buf.numel() < rows * cols or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(rows * cols)
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.free = [buf]


class _CatalogCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `states` (M, d) against items 1..n of `weight` (n + 1, d),
    row 0 being padding. Same value and gradients as `F.cross_entropy(states @ weight.T`
    with column 0 at -inf`), but the softmax is formed in place in one buffer that the
    backward turns into the logits' gradient in place: one (M, n) buffer instead of ~4
    (logits, log-softmax, the zero-filled gradient, its softmax backward)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, states: torch.Tensor,
                weight: torch.Tensor, labels: torch.Tensor, workspace: _Workspace
                ) -> torch.Tensor:
        items = weight[1:]
        buf = workspace.take(len(states), len(items), states)
        p = buf[:len(states) * len(items)].view(len(states), len(items))
        torch.mm(states, items.T, out=p)
        col = (labels - 1)[:, None]
        target = p.gather(1, col)[:, 0]
        top = p.amax(1, keepdim=True)
        p.sub_(top).exp_()
        z = p.sum(1, keepdim=True)
        p.div_(z)  # the softmax over items 1..n
        ctx.save_for_backward(states, weight, col)
        ctx.p, ctx.buf, ctx.workspace = p, buf, workspace
        return (z.log_().add_(top)[:, 0] - target).mean()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        states, weight, col = ctx.saved_tensors
        p, buf, ctx.p, ctx.buf = ctx.p, ctx.buf, None, None
        # d loss / d logits = (softmax - one_hot(label)) / M, formed in the softmax's buffer
        p.scatter_add_(1, col, p.new_full(col.shape, -1.0)).mul_(grad / len(states))
        g_states = p @ weight[1:]
        g_weight = torch.zeros_like(weight)
        torch.mm(p.T, states, out=g_weight[1:])
        ctx.workspace.give(buf)
        return g_states, g_weight, None, None


def catalog_cross_entropy(states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          workspace: _Workspace | None = None) -> torch.Tensor:
    """Full-softmax cross-entropy over items 1..n (labels in 1..n), see
    `_CatalogCrossEntropy`; float32 inputs."""
    return _CatalogCrossEntropy.apply(states, weight, labels, workspace or _Workspace())


def init_weights(m: nn.Module) -> None:
    """N(0, 0.02) for linear and embedding weights, zero biases and padding rows."""
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        nn.init.zeros_(m.weight[m.padding_idx])


class ItemTable(nn.Module):
    """Item vectors: an ID embedding plus, with semantic IDs, one embedding per level."""

    def __init__(self, n_items: int, dim: int, sid: torch.Tensor | None = None):
        super().__init__()
        self.dim = dim
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.sid_emb = nn.ModuleList()
        if sid is not None:
            # codes shifted by one so that 0 is the padding item's code at every level
            self.register_buffer("sid", sid + 1, persistent=False)
            for level in range(sid.shape[1]):
                self.sid_emb.append(nn.Embedding(int(sid[:, level].max()) + 2, dim,
                                                 padding_idx=0))
        self.apply(init_weights)

    def forward(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of `items` (any shape), or of every item (n_items + 1, d) when None."""
        vec = self.item_emb.weight if items is None else self.item_emb(items)
        if self.sid_emb:
            codes = self.sid if items is None else self.sid[items]
            for level, emb in enumerate(self.sid_emb):
                vec = vec + emb(codes[..., level])
        return vec


class Encoder(Protocol):
    """A causal sequence encoder over an ItemTable (SASRec, HSTU)."""

    items: ItemTable

    def __call__(self, seq: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L, d) for left-padded sequences (B, L); `time` (B, L) unix
        seconds of each history item where the cache has them."""
        ...


class Recommender(nn.Module):
    """Backbone plus optional fusion; computes the training losses and the ranking scores."""

    def __init__(self, backbone: nn.Module, fusion: ScoterFusion | None = None,
                 lam: float = 0.1, temperature: float = 0.1, loss: str = "full",
                 negatives: int = 128, softmax_temperature: float = 0.05):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}")
        self.backbone, self.fusion = backbone, fusion
        self.lam, self.temperature = lam, temperature
        self.loss, self.negatives = loss, negatives
        self.softmax_temperature = softmax_temperature
        #: the in-place full-softmax loss on the CPU (`catalog_cross_entropy`); False
        #: forms the logits with autograd, as CUDA and mixed precision always do
        self.fused_ce = True
        self._workspace = _Workspace()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled softmax compares directions (cosine), as the reference; full: identity."""
        if self.loss == "full":
            return x
        return x / x.norm(dim=-1, keepdim=True).clamp(min=L2_EPS)

    def sampled_logits(self, states: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (M, 1 + N), the positive first, and the negatives drawn (N,): uniform
        over items 1..n from torch's RNG; where a negative is the row's own positive its
        logit is -inf, so the positive is never counted against itself."""
        n_items = self.backbone.items.item_emb.num_embeddings - 1
        neg = torch.randint(1, n_items + 1, (self.negatives,), device=states.device)
        q = self._norm(states)
        pos = (q * self._norm(self.backbone.items(labels))).sum(-1, keepdim=True)
        negl = (q @ self._norm(self.backbone.items(neg)).T).masked_fill(
            neg[None, :] == labels[:, None], float("-inf"))
        return torch.cat([pos, negl], dim=1) / self.softmax_temperature, neg

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

    def user_vectors(self, seq: torch.Tensor, reasoning: torch.Tensor | None = None,
                     time: torch.Tensor | None = None) -> torch.Tensor:
        return self._last_state(self.backbone(seq, time)[:, -1], reasoning)[0]

    def scores(self, seq: torch.Tensor, reasoning: torch.Tensor | None = None,
               time: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, n_items + 1) for every item; column 0 (padding) is -inf."""
        s = self._norm(self.user_vectors(seq, reasoning, time)) @ self._norm(
            self.backbone.items()).T
        if self.loss == "sampled":
            s = s / self.softmax_temperature
        s[:, 0] = float("-inf")
        return s

    def losses(self, seq: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
               reasoning: torch.Tensor | None = None, time: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Next-item cross-entropy at every labelled position (the last one fused), over the
        full catalog or sampled negatives, plus lambda * InfoNCE when fusing (eq. 8)."""
        h = self.backbone(seq, time)
        last, z_last = self._last_state(h[:, -1], reasoning)
        states = torch.cat([h[:, :-1], last[:, None]], dim=1)
        mask = labels > 0
        if self.loss == "sampled":
            logits, _ = self.sampled_logits(states[mask], labels[mask])
            rec = -F.log_softmax(logits.float(), dim=1)[:, 0].mean()
        elif (self.fused_ce and states.device.type == "cpu" and states.dtype == torch.float32
              and not torch.is_autocast_enabled("cpu")):
            rec = catalog_cross_entropy(states[mask], self.backbone.items(), labels[mask],
                                        self._workspace)
        else:
            logits = states[mask] @ self.backbone.items().T
            logits[:, 0] = float("-inf")
            rec = F.cross_entropy(logits.float(), labels[mask])
        out = {"rec": rec, "loss": rec}
        if z_last is not None and len(z_last) and "contrastive" not in self.fusion.ablate:
            if reasoning is not None and len(z_last) < len(target):
                target = target[reasoning.flatten(1).abs().amax(1) > 0]
            nce = info_nce(z_last.float(), self.backbone.items(target).float(), target,
                           self.temperature)
            out["nce"] = nce
            out["loss"] = rec + self.lam * nce
        return out
