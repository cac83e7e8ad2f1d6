"""Small seeded datasets for the I2I / SID tests, ingested through the real ingest path."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from factory.datasets.ingest import NormaliseOptions, ingest
from factory.datasets.raw import RawDataset
from factory.embeddings import Embedder
from factory.warehouse import Warehouse

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi", "Romance"]


def random_sequences(seed: int = 7, users: int = 40, items: int = 25,
                     lengths: tuple[int, int] = (3, 12)) -> dict[str, list[str]]:
    """{user: distinct items in order}; popularity skewed so that pairs repeat."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(items)]
    out = {}
    for u in range(users):
        n = rng.randint(*lengths)
        seq: list[str] = []
        while len(seq) < n:
            item = f"i{rng.choices(range(items), weights)[0]:02d}"
            if item not in seq:
                seq.append(item)
        out[f"u{u:03d}"] = seq
    return out


def add_dataset(wh: Warehouse, name: str, sequences: dict[str, list[str]],
                titles: dict[str, str] | None = None) -> None:
    """Ingest `sequences` (timestamps follow the order) with core=1 and the loo split."""
    users, items, ts, order = [], [], [], []
    for u, seq in sequences.items():
        for k, item in enumerate(seq):
            users.append(u)
            items.append(item)
            ts.append(1_000_000 + k * 60)
            order.append(len(order))
    ids = sorted(set(items))
    titles = titles or {}
    raw = RawDataset(
        source="test",
        interactions=pa.table({"user_id": users, "item_id": items, "ts": ts,
                               "rating": [4.0] * len(users), "ord": order}),
        items=pa.table({
            "item_id": ids,
            "title": [titles.get(i, f"Movie {i}") for i in ids],
            "categories": [[GENRES[int(i[1:]) % len(GENRES)]] if i[1:].isdigit() else []
                           for i in ids],
            "brand": [None] * len(ids), "description": [None] * len(ids),
            "price": [None] * len(ids), "attrs": [None] * len(ids),
        }),
    )
    ingest(wh, name, raw, NormaliseOptions(core=1))


def train_sequences(wh: Warehouse, dataset: str, split: str = "loo") -> dict[str, list[str]]:
    with wh.read() as con:
        rows = con.execute(
            "select user_id, list(item_id order by position) from split_interactions"
            " where dataset = ? and split = ? and part = 'train' group by user_id",
            [dataset, split],
        ).fetchall()
    return dict(rows)


def fake_encode(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors from the text hash: exercises everything but the model."""
    out = np.stack([
        np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[:8].astype(np.float32)
        + 1.0 for t in texts
    ])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_model(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the encoder with `fake_encode`; returns the list of encoded batches."""
    calls: list[list[str]] = []

    def encode(self: Embedder, texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return fake_encode(texts)

    monkeypatch.setattr(Embedder, "_encode", encode)
    return calls


def mined_pairs(train: pa.Table, users: pa.Table, items: pa.Table, params, engine: str = "auto",
                chunk_occurrences: int = 10**9) -> list[tuple]:
    """(item_i, item_j, support, score, rank) of everything `mine` yields, sorted."""
    from factory.i2i import mine

    batches = [b for b, _ in mine(train, users, items, params, engine=engine,
                                  chunk_occurrences=chunk_occurrences)]
    rows = pa.Table.from_batches(batches).to_pylist() if batches else []
    return sorted((r["item_i"], r["item_j"], r["support"], r["score"], r["rank"]) for r in rows)


def assert_close_pairs(a: list[tuple], b: list[tuple]) -> None:
    """Same pairs, supports and ranks; scores equal to float rounding."""
    assert [r[:3] + r[4:] for r in a] == [r[:3] + r[4:] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x[3] == pytest.approx(y[3], rel=1e-9, abs=1e-12)
