"""A straightforward pure-Python dictionary miner for the scores of `factory.i2i`.

It is the oracle the tests check the SQL against and the baseline of bench/mine_i2i.py: the
style of the public TwiSTAR code (nested loops over each sequence, dictionaries of pair
tallies), computing exactly the definitions in the `factory.i2i` docstring.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from itertools import combinations

from factory.i2i import SWING_USER_ALPHA, SWING_USER_BETA, MineParams


def _partners(seq: list[str], window: int, directed: bool):
    """(i, j) for every pair the sequence supports; each at most once per user."""
    n = len(seq)
    for a in range(n):
        hi = n if not window else min(n, a + window + 1)
        for b in range(a + 1, hi):
            yield seq[a], seq[b]
            if not directed:
                yield seq[b], seq[a]


def mine_reference(
    sequences: dict[str, list[str]], params: MineParams
) -> list[tuple[str, str, int, float, int]]:
    """(item_i, item_j, support, score, rank) from {user_id: training items in order}."""
    p = params
    support: dict[tuple[str, str], int] = defaultdict(int)
    pen: dict[tuple[str, str], float] = defaultdict(float)
    item_users: dict[str, int] = defaultdict(int)
    for seq in sequences.values():
        for item in seq:
            item_users[item] += 1
        w = 1.0 / (p.alpha + len(seq))
        for pair in _partners(seq, p.window, p.directed):
            support[pair] += 1
            pen[pair] += w
    kept = [pair for pair, n in support.items() if n >= p.min_count]
    n_users = len(sequences)
    if p.score == "swing":
        swing = _swing(sequences, set(kept), p)
    scores: dict[tuple[str, str], float] = {}
    for i, j in kept:
        n = support[(i, j)]
        if p.score == "count":
            s = float(n)
        elif p.score == "penalised":
            s = pen[(i, j)]
        elif p.score == "swing":
            s = swing.get((i, j), 0.0)
        elif p.score == "pmi":
            s = math.log(n * float(n_users) / (float(item_users[i]) * item_users[j]))
        else:
            s = float(n) / item_users[i]
        scores[(i, j)] = round(s, 12)
    by_source: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pair in kept:
        by_source[pair[0]].append(pair)
    out = []
    for pairs in by_source.values():
        pairs.sort(key=lambda q: (-scores[q], -support[q], q[1]))
        if p.top_k:
            pairs = pairs[:p.top_k]
        out.extend((i, j, support[(i, j)], scores[(i, j)], r)
                   for r, (i, j) in enumerate(pairs, 1))
    return out


def _swing(
    sequences: dict[str, list[str]], kept: set[tuple[str, str]], p: MineParams
) -> dict[tuple[str, str], float]:
    """Swing on the capped graph: each item keeps its swing_max_users highest-priority users."""
    priority = {u: hashlib.md5(f"{p.seed}:{u}".encode()).hexdigest() for u in sequences}
    item_users: dict[str, list[str]] = defaultdict(list)
    for u, seq in sequences.items():
        for item in seq:
            item_users[item].append(u)
    capped = {item: set(sorted(us, key=lambda u: (priority[u], u))[:p.swing_max_users])
              for item, us in item_users.items()}
    user_items: dict[str, set[str]] = defaultdict(set)
    for item, us in capped.items():
        for u in us:
            user_items[u].add(item)
    weight = {u: (SWING_USER_ALPHA + len(items)) ** -SWING_USER_BETA
              for u, items in user_items.items()}
    supporters: dict[tuple[str, str], list[str]] = defaultdict(list)
    for u, seq in sequences.items():
        mine = [x if u in capped[x] else None for x in seq]
        for i, j in _partners(mine, p.window, p.directed):
            if i is not None and j is not None and (i, j) in kept:
                supporters[(i, j)].append(u)
    out = {}
    for pair, us in supporters.items():
        s = 0.0
        for u, v in combinations(us, 2):
            s += weight[u] * weight[v] / (p.alpha + len(user_items[u] & user_items[v]))
        out[pair] = s
    return out
