"""ThinkRec user grouping and expert gating (sec. 3.3, eq. 8-10).

User latent features come from a collaborative model trained on the training part of a split
only: a truncated SVD of the binary user x item interaction matrix (user factors U * Sigma),
the closed-form solution of least-squares matrix factorisation. Users are clustered with
k-means into N groups; each group's mean feature represents its expert; a user's
participation weights are softmax(cos(e_u, E) / tau); and the gate of eq. 9-10 sends
averaged users (entropy > 0.95 log N) to the global expert, concentrated users
(max weight > 0.5 + 0.6/N) to their single best expert, and everyone else to a fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GLOBAL = "global"
SINGLE = "single"
FUSED = "fused"


@dataclass
class Grouping:
    features: np.ndarray        # (users, dim), L2-normalised SVD user factors
    groups: np.ndarray          # (users,), k-means cluster of each user
    experts: np.ndarray         # (N, dim), mean feature of each group (eq. 8)
    weights: np.ndarray         # (users, N), participation softmax(cos / tau) (eq. 8)
    entropy: np.ndarray         # (users,), H(w) (eq. 9)
    gate: list[str]             # global | single | fused (eq. 10)


def svd_user_features(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                      dim: int, seed: int) -> tuple[np.ndarray, float]:
    """User factors U * Sigma of a rank-`dim` truncated SVD of the binary interaction matrix."""
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD

    matrix = csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)),
                        shape=(n_users, n_items))
    matrix.data[:] = 1.0  # repeated (user, item) pairs count once
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed)
    factors = svd.fit_transform(matrix)
    return factors, float(svd.explained_variance_ratio_.sum())


def participation(features: np.ndarray, experts: np.ndarray, tau: float) -> np.ndarray:
    """softmax(cos(e_u, e_n) / tau) over experts n (ThinkRec eq. 8)."""
    def unit(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)

    logits = unit(features) @ unit(experts).T / tau
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def gate(weights: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Entropy of each weight vector and its gate decision (ThinkRec eq. 9-10)."""
    n = weights.shape[1]
    entropy = -(weights * np.log(np.clip(weights, 1e-300, None))).sum(axis=1)
    top = weights.max(axis=1)
    decisions = [
        GLOBAL if h > 0.95 * np.log(n) else SINGLE if m > 0.5 + 0.6 / n else FUSED
        for h, m in zip(entropy, top, strict=True)
    ]
    return entropy, decisions


def group_users(factors: np.ndarray, n_groups: int, tau: float = 0.1,
                seed: int = 0) -> Grouping:
    """k-means over L2-normalised user factors, expert means, participation and gate."""
    from sklearn.cluster import KMeans

    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    features = factors / np.where(norms == 0, 1.0, norms)
    km = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit(features)
    groups = km.labels_.astype(np.int64)
    experts = np.stack([features[groups == g].mean(axis=0) for g in range(n_groups)])
    weights = participation(features, experts, tau)
    entropy, decisions = gate(weights)
    return Grouping(features, groups, experts, weights, entropy, decisions)
