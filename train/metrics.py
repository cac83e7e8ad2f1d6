"""Full-catalog ranking metrics for leave-one-out evaluation (one target per user).

With a single held-out item, Recall@K equals HR@K. Dense models (SASRec, HSTU) score every
item (`target_ranks`); a generative model (TIGER) returns a ranked list of beams
(`list_ranks`): a target outside the list is a miss, and @K beyond the list's depth is not
reported (None) rather than counted as misses. Ties count against the target (an item
scored equal to it ranks ahead), so a model that scores everything alike gets no credit.
Ranks are NaN-safe: a NaN score never ranks ahead of anything; a NaN target ranks last and
a NaN elsewhere counts against the target. (A run never reports such ranks: the training
loop stops on the first non-finite score; this is the second line of defence.)

Two protocols, both reported by every run (README, "Training"):
  full    every item of the catalog is ranked, the user's history included: "full ranking
          over the entire item catalog" (SCoTER 4.1, TwiSTAR 5). The default.
  masked  the items of the user's history are left out of the ranking (what SASRec's own
          code, RecBole's defaults and generative-recommenders' eval do).
"""

from __future__ import annotations

import torch

KS = (5, 10, 20, 50)  # @20 and @50: TwiSTAR's retrieval probes
PROTOCOLS = ("full", "masked")
PROTOCOL_NAMES = {
    "full": "full ranking over the entire catalog, history included (SCoTER 4.1, TwiSTAR 5)",
    "masked": "full ranking with the user's history items excluded",
}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among all columns; ties ranked pessimistically.

    An item counts ahead of the target unless its score is strictly lower, so a NaN on
    either side counts against the target: a NaN target ranks last, never first."""
    t = targets.view(-1, 1)
    ahead = ~(scores < scores.gather(1, t))
    ahead.scatter_(1, t, False)  # the target is not ahead of itself
    return ahead.sum(dim=1)


MISS = 2**40  # the rank of a target that a ranked list does not contain


def listed_in(items: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: whether each listed item is among its row's `rows` (B, m) items."""
    return (items[:, :, None] == rows[:, None, :]).any(-1)


def list_ranks(items: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor,
               exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target in a ranked list (B, n) of item ids (0 = no item,
    e.g. fewer beams than asked), MISS when absent. Listed items in `exclude` (B, m) (the
    history, for the masked protocol) are dropped before ranking. Ties count against the
    target, as in `target_ranks`: a listed item scored >= the target's score ranks ahead."""
    listed = items > 0
    if exclude is not None:
        listed &= ~listed_in(items, exclude)
    is_target = listed & (items == targets[:, None])
    found = is_target.any(1)
    t_score = torch.where(is_target, scores, torch.full_like(scores, float("inf"))).amin(1)
    ahead = (listed & ~is_target & ~(scores < t_score[:, None])).sum(1)
    return torch.where(found, ahead, torch.full_like(ahead, MISS))


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS,
                       depth: int | None = None) -> dict[str, float | None]:
    """Recall@K and NDCG@K averaged over users, from 0-based target ranks; with `depth`
    (a ranked list's length), None for every K beyond it."""
    if (ranks < 0).any():
        raise ValueError("negative target rank")
    ranks = ranks.double()
    out: dict[str, float | None] = {}
    for k in ks:
        if depth is not None and k > depth:
            out[f"recall@{k}"] = out[f"ndcg@{k}"] = None
            continue
        hit = ranks < k
        out[f"recall@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
    return out
