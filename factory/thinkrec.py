"""ThinkRec instances: (user, target position) of a split with the history a prompt shows.

Shared by the reasoning-trace job (B.3 prompts to the teacher) and the SFT export (B.2
prompts), so both show the same history for the same instance. A history is the latest
`history` interactions of the same user in the same split before the target: for a train
target that is train data only (every split orders parts in time); for a valid/test target
it is what came before it, never the target or anything later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np

from factory.itemtext import HistoryEntry, Item

#: labelled interactions of the split whose item has a title (and earlier history if asked)
_CANDIDATES = (
    "with s as (select part, user_id, position, item_id, label,"
    "           min(position) over (partition by user_id) as first"
    "           from split_interactions where dataset = $dataset and split = $split)"
    " select s.part, s.user_id, s.position from s join items i"
    "  on i.dataset = $dataset and i.item_id = s.item_id"
    " where s.label is not null and i.title is not null and ($part is null or s.part = $part)"
    "  and (not $need_history or s.position > s.first)"
    " order by s.part, s.user_id, s.position"
)


@dataclass(frozen=True)
class Instance:
    part: str
    user_id: str
    position: int
    item_id: str
    label: bool
    history: tuple[HistoryEntry, ...]


def candidates(con: duckdb.DuckDBPyConnection, dataset: str, split: str,
               part: str | None = None, need_history: bool = True) -> list[tuple[str, str, int]]:
    """(part, user_id, position) of every usable instance, in a fixed order. A teacher needs
    a history to reason about; recommendation examples do not (ThinkRec's data, like CoLLM's,
    has one instance per interaction, a user's first with an empty history)."""
    return [(p, str(u), int(pos)) for p, u, pos in con.execute(
        _CANDIDATES, {"dataset": dataset, "split": split, "part": part,
                      "need_history": need_history}).fetchall()]


def require_labels(con: duckdb.DuckDBPyConnection, dataset: str) -> None:
    """ThinkRec's instances are yes/no: a dataset without labels has none."""
    from factory.errors import FactoryError

    if con.execute("select count(label) from interactions where dataset = ?",
                   [dataset]).fetchone()[0] == 0:
        raise FactoryError(f"dataset {dataset!r} has no yes/no labels: ingest it from data "
                           "with ratings and --label-threshold (ThinkRec: 3 for ML-1M and "
                           "Yelp, 4 for Book)")


def sample_keys(keys: Sequence[tuple[str, str, int]], n: int | None,
                seed: int) -> list[tuple[str, str, int]]:
    """`n` of the keys drawn without replacement with the seed, in their original order."""
    if n is None or n >= len(keys):
        return list(keys)
    picked = np.sort(np.random.default_rng(seed).choice(len(keys), size=n, replace=False))
    return [keys[k] for k in picked]


def load_instances(con: duckdb.DuckDBPyConnection, dataset: str, split: str,
                   keys: Sequence[tuple[str, str, int]], history: int, items: dict[str, Item],
                   keywords: dict[str, list[str]], need_history: bool = True) -> list[Instance]:
    """The instances of `keys` with their latest `history` earlier interactions (items
    without a title are left out of a history; an instance left with none is dropped unless
    `need_history` is False)."""
    import pyarrow as pa

    if not keys:
        return []
    table = pa.table({"user_id": [k[1] for k in keys],
                      "position": pa.array([k[2] for k in keys], pa.int32()),
                      "k": pa.array(range(len(keys)), pa.int64())})
    con.register("_instance_keys", table)
    try:
        rows = con.execute(
            "with s as (select user_id, position, item_id, label from split_interactions"
            "           where dataset = ? and split = ?),"
            " h as (select user_id, position, item_id, label,"
            "  list(item_id) over w as h_items, list(label) over w as h_labels from s"
            "  window w as (partition by user_id order by position"
            "               rows between ? preceding and 1 preceding))"
            " select c.k, h.item_id, h.label, h.h_items, h.h_labels from _instance_keys c"
            " join h using (user_id, position) order by c.k",
            [dataset, split, history]).fetchall()
    finally:
        con.unregister("_instance_keys")
    # one (immutable) entry per (item, label), shared by every history that holds it: 100k
    # instances x 10 items would otherwise build a million identical objects
    shown: dict[tuple[str, bool], HistoryEntry | None] = {}

    def entry(i: str, lab: bool | None) -> HistoryEntry | None:
        key = (i, lab)
        if key not in shown:
            shown[key] = (HistoryEntry(i, items[i].title, bool(lab), keywords.get(i))
                          if i in items and items[i].title and lab is not None else None)
        return shown[key]

    out = []
    for k, item_id, label, h_items, h_labels in rows:
        entries = tuple(e for e in map(entry, h_items or [], h_labels or []) if e is not None)
        if (entries or not need_history) and label is not None:
            part, user_id, position = keys[k]
            out.append(Instance(part, user_id, position, str(item_id), bool(label), entries))
    return out
