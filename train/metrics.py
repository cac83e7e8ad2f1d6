"""Full-catalog ranking metrics for leave-one-out evaluation (one target per user).

With a single held-out item, Recall@K equals HR@K. Ties count against the target (an item
scored equal to it ranks ahead), so a model that scores everything alike gets no credit.
"""

from __future__ import annotations

import torch

KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among all columns; ties ranked pessimistically."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_scores).sum(dim=1) - 1


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K and NDCG@K averaged over users, from 0-based target ranks."""
    ranks = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
    return out
