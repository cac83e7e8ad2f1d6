"""Validate scoring and the Mine maths (pruning, clustering, quality, intervals, choice)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from factory.gvm.mine import (
    NOISE,
    choose_pattern,
    cluster_paths,
    nearest_to_centroid,
    prune_near_duplicates,
    rate_clusters,
    wilson,
)
from factory.gvm.validate import score, top1


def unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_top1_maps_by_cosine_in_chunks() -> None:
    catalog = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    queries = unit([[0.9, 0.1, 0], [0, 0.2, 1], [0.1, 1, 0.1]])
    index, cosine = top1(queries, catalog, chunk=2)
    assert index.tolist() == [0, 2, 1]
    assert cosine[0] == pytest.approx(0.9 / math.hypot(0.9, 0.1))


def test_score_dedupes_mapped_items_before_ranking() -> None:
    s = score(["a", "a", "b", "a", "c"], "c")
    assert s.hit_rank == 3 and s.n_unique == 3
    assert s.recall() == 1.0 and s.ndcg() == pytest.approx(0.5)
    assert s.recall(k=2) == 0.0 and s.ndcg(k=2) == 0.0
    miss = score(["a", "b"], "z")
    assert miss.hit_rank is None and miss.recall() == 0.0 and miss.ndcg() == 0.0


def test_prune_per_group_and_global() -> None:
    v = unit([[1, 0], [0.99, 0.05], [0, 1], [1, 0.01]])
    per_user = prune_near_duplicates(v, ["u1", "u1", "u1", "u2"], 0.85)
    assert [p.keep for p in per_user] == [True, False, True, True]
    assert per_user[1].duplicate_of == 0 and per_user[1].cosine > 0.99
    everything = prune_near_duplicates(v, [0, 0, 0, 0], 0.85)
    assert [p.keep for p in everything] == [True, False, True, False]
    assert [p.keep for p in prune_near_duplicates(v, [0] * 4, 1.01)] == [True] * 4


def blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 5
    return unit([list(centres[i % 3] + rng.normal(0, 0.3, 8)) for i in range(60)])


def test_kmeans_picks_k_by_silhouette_and_is_seeded() -> None:
    x = blobs()
    c = cluster_paths(x, "kmeans", 2, 6, seed=1)
    assert c.k == 3 and set(c.silhouettes) == {2, 3, 4, 5, 6}
    assert max(c.silhouettes, key=c.silhouettes.get) == 3
    # members of one blob share a label
    assert len({c.labels[i] for i in range(0, 60, 3)}) == 1
    again = cluster_paths(x, "kmeans", 2, 6, seed=1)
    assert (again.labels == c.labels).all()


def test_too_few_paths_make_one_cluster_with_a_note() -> None:
    c = cluster_paths(unit([[1, 0], [1, 0]]), "kmeans", 2, 10)
    assert c.k == 1 and c.labels.tolist() == [0, 0] and "too few" in c.note
    empty = cluster_paths(np.zeros((0, 4), dtype=np.float32), "kmeans", 2, 10)
    assert empty.k == 0 and len(empty.labels) == 0 and empty.note is None


def test_hdbscan_option_marks_noise() -> None:
    x = np.vstack([blobs(), unit([[0, 0, 0, 0, 0, 0, 1, 1]])])
    c = cluster_paths(x, "hdbscan", min_cluster_size=5)
    assert c.k == 3
    assert c.labels[-1] == NOISE
    with pytest.raises(ValueError):
        cluster_paths(x, "spectral")


def test_wilson_interval() -> None:
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_quality_min_size_and_choice() -> None:
    labels = np.array([0] * 20 + [1] * 20 + [2] * 3 + [NOISE] * 5)
    scores = np.array([1] * 10 + [0] * 10 + [1] * 2 + [0] * 18 + [1] * 3 + [1] * 5, float)
    stats = rate_clusters(labels, scores, min_size=10)
    assert [s.cluster for s in stats] == [0, 1, 2]  # eligible first, then by quality
    lucky = next(s for s in stats if s.cluster == 2)
    assert lucky.quality == 1.0 and not lucky.eligible
    choice = choose_pattern(stats, 10)
    assert choice.best.cluster == 0 and choice.best.quality == 0.5
    assert "ahead of the runner-up" in choice.verdict


def test_choice_is_honest_when_data_is_weak() -> None:
    assert choose_pattern([], 10).best is None
    small = rate_clusters(np.array([0, 0, 1]), np.array([1.0, 0, 1]), min_size=10)
    c = choose_pattern(small, 10)
    assert c.best is None and "minimum 10" in c.verdict
    zero = rate_clusters(np.array([0] * 12 + [1] * 12), np.zeros(24), min_size=10)
    c = choose_pattern(zero, 10)
    assert c.best is None and "Recall@20 = 0" in c.verdict
    close = rate_clusters(np.array([0] * 12 + [1] * 12),
                          np.array([1.0] * 3 + [0] * 9 + [1.0] * 2 + [0] * 10), min_size=10)
    c = choose_pattern(close, 10)
    assert c.best.cluster == 0 and "not separated" in c.verdict


def test_exemplars_nearest_the_centroid_one_per_text() -> None:
    v = unit([[1, 0], [1, 0], [0.8, 0.2], [0.2, 0.8], [0, 1]])
    members = np.array([True, True, True, True, False])
    texts = ["a", "a", "b", "c", "d"]
    assert nearest_to_centroid(v, members, texts, 2) == [2, 0]
    assert nearest_to_centroid(v, members, texts, 10) == [2, 0, 3]
