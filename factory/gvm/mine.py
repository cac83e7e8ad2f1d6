"""Prune and Mine (SCoTER sec. 3.2, Alg. 1 lines 10 and 22-32): from scored paths to a pattern.

Paths are embedded (rows L2-normalised), near-duplicates are pruned, the rest are clustered
(k-means with k chosen by silhouette, or HDBSCAN), each cluster is a candidate pattern P with
Quality(P) = mean Score over its chains, and P* is the best cluster. Two guards keep the
choice honest: a cluster needs a minimum size to compete (a lucky cluster of three paths
cannot win), and every quality carries a 95% Wilson interval so a reader can see when the
winner is not separated from the runner-up. The exemplars for the abstraction prompt are
the N paths nearest the winner's centroid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NOISE = -1  # HDBSCAN's label for paths that belong to no cluster


@dataclass(frozen=True)
class Pruned:
    keep: bool
    duplicate_of: int | None  # index of the kept path this one is too close to
    cosine: float | None


def prune_near_duplicates(vectors: np.ndarray, groups: Sequence[object],
                          threshold: float = 0.85) -> list[Pruned]:
    """Greedy, in the given order: a path is dropped when its cosine to an already kept path
    of the same group reaches `threshold` (SCoTER gamma = 0.85). One group for every path is
    Alg. 1 line 10 (C_div = PruneByCosSim(C_all, gamma)); a group per user is the option."""
    vectors = np.asarray(vectors, dtype=np.float32)
    # kept paths of each group, rows in a growing buffer (no copy of the kept set per path)
    kept: dict[object, tuple[np.ndarray, list[int]]] = {}
    out: list[Pruned] = []
    for i, group in enumerate(groups):
        buf, index = kept.get(group) or (np.empty((0, vectors.shape[1]), np.float32), [])
        n = len(index)
        if n:
            sims = buf[:n] @ vectors[i]
            j = int(sims.argmax())
            if sims[j] >= threshold:
                out.append(Pruned(False, index[j], float(sims[j])))
                continue
        if n == len(buf):
            buf = np.concatenate([buf, np.empty((max(8, n), vectors.shape[1]), np.float32)])
        buf[n] = vectors[i]
        index.append(i)
        kept[group] = (buf, index)
        out.append(Pruned(True, None, None))
    return out


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray
    method: str
    k: int
    silhouettes: dict[int, float]  # k -> silhouette (k-means only)
    note: str | None = None


def cluster_paths(vectors: np.ndarray, method: str = "kmeans", k_min: int = 2, k_max: int = 10,
                  min_cluster_size: int = 10, seed: int = 0,
                  silhouette_sample: int = 5000) -> Clustering:
    """Cluster path embeddings; k-means picks k in [k_min, k_max] by the silhouette coefficient."""
    n = len(vectors)
    if n == 0:
        return Clustering(np.zeros(0, dtype=int), method, 0, {})
    distinct = len(np.unique(np.round(vectors, 6), axis=0))
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        if n < 2:
            return Clustering(np.zeros(n, dtype=int), method, 1, {}, f"{n} path(s): one cluster")
        labels = HDBSCAN(min_cluster_size=max(2, min(min_cluster_size, n)),
                         copy=True).fit_predict(vectors)
        k = len(set(labels.tolist()) - {NOISE})
        return Clustering(labels, method, k, {})
    if method != "kmeans":
        raise ValueError(f"unknown clustering method {method!r}")
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    ks = [k for k in range(k_min, k_max + 1) if 2 <= k <= min(distinct, n - 1)]
    if not ks:
        note = (f"{n} path(s), {distinct} distinct: too few to choose k in "
                f"[{k_min}, {k_max}] by silhouette; one cluster")
        return Clustering(np.zeros(n, dtype=int), method, 1, {}, note)
    silhouettes: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for k in ks:
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors)
        fits[k] = labels
        silhouettes[k] = float(silhouette_score(
            vectors, labels, sample_size=min(n, silhouette_sample), random_state=seed))
    best = max(ks, key=lambda k: (silhouettes[k], -k))
    return Clustering(fits[best], method, best, silhouettes)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a hit rate (Score is 0/1, so Quality is a proportion)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ClusterStats:
    cluster: int
    n: int
    hits: int
    quality: float  # Quality(P): mean Score (Recall@20) of its chains
    ci_low: float
    ci_high: float
    eligible: bool


def rate_clusters(labels: np.ndarray, scores: np.ndarray, min_size: int) -> list[ClusterStats]:
    """Quality and interval per cluster, best first; noise is not a cluster."""
    stats = []
    for c in sorted(set(labels.tolist()) - {NOISE}):
        member = labels == c
        n, hits = int(member.sum()), int(round(float(scores[member].sum())))
        lo, hi = wilson(hits, n)
        stats.append(ClusterStats(c, n, hits, hits / n, lo, hi, n >= min_size))
    return sorted(stats, key=lambda s: (-s.eligible, -s.quality, -s.n, s.cluster))


@dataclass(frozen=True)
class Choice:
    best: ClusterStats | None
    verdict: str  # one honest sentence about how well the data supports the choice


def choose_pattern(stats: list[ClusterStats], min_size: int) -> Choice:
    """P* = the eligible cluster of highest quality, or none with the reason why."""
    eligible = [s for s in stats if s.eligible]
    if not stats:
        return Choice(None, "no clusters: no path survived parsing and pruning")
    if not eligible:
        largest = max(s.n for s in stats)
        return Choice(None, f"no cluster has the minimum {min_size} paths (largest has "
                            f"{largest}); generate for more users or lower --min-cluster-size")
    best = eligible[0]
    if best.hits == 0:
        return Choice(None, f"no path in the {len(eligible)} eligible cluster(s) hit its "
                            "validation target (Recall@20 = 0 everywhere): the data prefers "
                            "no pattern")
    interval = f"Recall@20 {best.quality:.4f} (95% CI {best.ci_low:.4f}-{best.ci_high:.4f}, " \
               f"{best.hits}/{best.n})"
    if len(eligible) == 1:
        return Choice(best, f"cluster {best.cluster} chosen, the only eligible one: {interval}")
    runner = eligible[1]
    if best.ci_low > runner.quality:
        how = f"ahead of the runner-up (cluster {runner.cluster}, {runner.quality:.4f}) " \
              "beyond its interval"
    else:
        how = f"not separated from the runner-up (cluster {runner.cluster}, " \
              f"{runner.quality:.4f}, inside the interval)"
    return Choice(best, f"cluster {best.cluster} chosen: {interval}; {how}")


def nearest_to_centroid(vectors: np.ndarray, members: np.ndarray, texts: Sequence[str],
                        n: int) -> list[int]:
    """Indices of up to `n` members nearest the centroid, one per distinct text."""
    idx = np.flatnonzero(members)
    centroid = vectors[idx].mean(axis=0)
    norm = np.linalg.norm(centroid)
    if norm > 0:
        centroid = centroid / norm
    order = idx[np.argsort(-(vectors[idx] @ centroid), kind="stable")]
    chosen, seen = [], set()
    for i in order.tolist():
        if texts[i] in seen:
            continue
        seen.add(texts[i])
        chosen.append(i)
        if len(chosen) == n:
            break
    return chosen
