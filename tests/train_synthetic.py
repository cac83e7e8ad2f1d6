"""Tiny synthetic caches for the training tests, written with the real exporter's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from factory.exports.cache import StepSource, build_parts, write_cache


def synthetic_cache(out: Path, *, n_items: int = 40, n_users: int = 300, length: int = 8,
                    pattern: str = "random", steps: str | None = None, step_dim: int = 16,
                    k: int = 3, sid_levels: int = 0, sid_codes: int = 8,
                    unique_sids: bool = False, seed: int = 0, times: bool = False) -> Path:
    """pattern "random": histories carry no signal; "cycle": the next item is always the
    previous one plus one (mod n). steps "oracle": the last reasoning step embeds the row's
    own target item's text vector (the others are noise); "noise": all steps are noise.
    sid_levels codes per item, each in 0..sid_codes-1; unique_sids: no two items share one
    (TIGER decodes one item per SID). `times`: each user's interactions get increasing unix
    seconds, gaps of 1 s to ~11 days."""
    rng = np.random.default_rng(seed)
    users, train, valid, test = [], [], [], []
    stamps: tuple[list, list, list] = ([], [], [])
    for u in range(n_users):
        if pattern == "cycle":
            start = int(rng.integers(n_items))
            items = [(start + i) % n_items + 1 for i in range(length)]
        else:
            items = [int(i) + 1 for i in rng.choice(n_items, size=length, replace=False)]
        users.append(f"u{u:04d}")
        train.append(items[:-2])
        valid.append([items[-2]])
        test.append([items[-1]])
        when = (1_600_000_000 + np.cumsum(np.exp(rng.uniform(0, 14, size=length)))).astype(
            np.int64).tolist()
        for part, chunk in zip(stamps, (when[:-2], [when[-2]], [when[-1]]), strict=True):
            part.append(chunk)
    parts = build_parts(users, train, valid, test, max_len=length,
                        times=stamps if times else None)
    columns = {
        "item_idx": pa.array(np.arange(1, n_items + 1, dtype=np.int32)),
        "item_id": pa.array([f"i{i}" for i in range(1, n_items + 1)]),
        "title": pa.array([f"item {i}" for i in range(1, n_items + 1)]),
    }
    if sid_levels:
        if unique_sids:
            flat = rng.choice(sid_codes ** sid_levels, size=n_items, replace=False)
            digits = [flat // sid_codes ** lvl % sid_codes for lvl in reversed(range(sid_levels))]
            codes = np.stack(digits, axis=1).astype(np.int32).tolist()
        else:
            codes = rng.integers(0, sid_codes, size=(n_items, sid_levels)).astype(
                np.int32).tolist()
        columns["sid"] = pa.array(codes, pa.list_(pa.int32()))
    source = None
    if steps is not None:
        text = rng.normal(size=(n_items + 1, step_dim)).astype(np.float32)
        by_row = {}
        for name, part in parts.items():
            h = rng.normal(size=(len(part.target), k, step_dim)).astype(np.float32)
            if steps == "oracle":
                h[:, -1] = text[part.target] + 0.1 * h[:, -1]
            by_row[name] = (dict(zip(part.user_ids, range(len(part.user_ids)), strict=True)),
                            h)

        def fetch(part: str, user_ids: list[str]) -> np.ndarray:
            index, h = by_row[part]
            return h[[index[u] for u in user_ids]]

        def chain(part: str, user_ids: list[str]) -> np.ndarray:
            return fetch(part, user_ids)[:, -1] + fetch(part, user_ids)[:, 0] * 0.1

        source = StepSource(meta={"K": k, "D": step_dim, "encoder": "synthetic",
                                  "template": "synthetic", "chain_source": "synthetic"},
                            steps=fetch, chain=chain, dtype="float16")
    write_cache(out, dataset="synthetic", split="loo", items=pa.table(columns), parts=parts,
                max_len=length, steps=source)
    return out
