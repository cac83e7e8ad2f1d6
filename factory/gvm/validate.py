"""Validate (SCoTER sec. 3.2, Alg. 1 lines 11-20): descriptions -> catalog items -> Score(C).

The teacher recommends descriptions, not item ids. Each description is mapped to its top-1
catalog item by cosine similarity of sentence embeddings; the unique mapped items, in the
teacher's order, form the predicted set Y_20(C). Score(C) = Recall@20 = 1 if the user's held
out item is in it. The held-out item is the split's *validation* target, never the test one,
so that the test target stays unseen by everything that selects a pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def top1(queries: np.ndarray, catalog: np.ndarray,
         chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine of the nearest catalog row for each query (rows L2-normalised)."""
    if len(catalog) == 0:
        raise ValueError("empty catalog")
    index = np.empty(len(queries), dtype=np.int64)
    cosine = np.empty(len(queries), dtype=np.float32)
    for lo in range(0, len(queries), chunk):
        sims = queries[lo:lo + chunk] @ catalog.T
        best = sims.argmax(axis=1)
        index[lo:lo + chunk] = best
        cosine[lo:lo + chunk] = sims[np.arange(len(best)), best]
    return index, cosine


@dataclass(frozen=True)
class Score:
    """How one chain's recommendations did against the held-out item."""

    hit_rank: int | None  # 1-based rank of the target among the unique mapped items
    n_unique: int

    def recall(self, k: int = 20) -> float:
        return 1.0 if self.hit_rank is not None and self.hit_rank <= k else 0.0

    def ndcg(self, k: int = 20) -> float:
        """One relevant item: 1/log2(rank + 1) when it is ranked within k."""
        if self.hit_rank is None or self.hit_rank > k:
            return 0.0
        return 1.0 / math.log2(self.hit_rank + 1)


def score(mapped: list[str], target: str) -> Score:
    """Rank of `target` among the mapped items with repeats removed (first occurrence wins)."""
    unique = list(dict.fromkeys(mapped))
    rank = unique.index(target) + 1 if target in unique else None
    return Score(rank, len(unique))
