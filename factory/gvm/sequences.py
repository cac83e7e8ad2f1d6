"""The user sequences GVM works on, and the item text shown to the teacher and embedded.

A sequence is the user's training history (the train part of a split, most recent
`max_history` items, oldest first) and the first item of the user's validation part, which
scores the chains. The test part is never read here. Users are drawn by a seeded hash order,
so the same seed gives the same users on any machine and adding users keeps the first ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from factory.errors import FactoryError
from factory.warehouse import require_split


@dataclass(frozen=True)
class Sequence:
    user_id: str
    history: list[str]  # item ids, oldest first
    target: str  # first validation item; never shown to the teacher


def sample_sequences(con: duckdb.DuckDBPyConnection, dataset: str, split: str, n_users: int,
                     seed: int, max_history: int = 20,
                     exclude_runs: list[str] | None = None) -> list[Sequence]:
    """Up to `n_users` users with training history and a validation item, in seeded order.

    `exclude_runs` leaves out the users of other runs (e.g. the users a pattern was mined
    on, so that `gvm compare` scores templates on users the discovery never saw).
    """
    require_split(con, dataset, split)
    rows = con.execute(
        """
        with valid as (
            select user_id, arg_min(item_id, position) as target
            from split_interactions
            where dataset = $dataset and split = $split and part = 'valid' group by user_id
        ), picked as (
            select v.user_id, v.target from valid v
            where exists (select 1 from split_interactions t where t.dataset = $dataset
                          and t.split = $split and t.part = 'train' and t.user_id = v.user_id)
              and v.user_id not in (select user_id from gvm_sequences
                                    where run_id in (select unnest($exclude::varchar[])))
            order by md5($seed || ':' || v.user_id), v.user_id
            limit $n
        ), hist as (
            select user_id, item_id, position,
                   row_number() over (partition by user_id order by position desc) as back
            from split_interactions
            where dataset = $dataset and split = $split and part = 'train'
              and user_id in (select user_id from picked)
        )
        select p.user_id, list(h.item_id order by h.position), p.target
        from picked p join hist h using (user_id)
        where h.back <= $max_history
        group by p.user_id, p.target
        order by md5($seed || ':' || p.user_id), p.user_id
        """,
        {"dataset": dataset, "split": split, "n": n_users, "seed": str(seed),
         "max_history": max_history, "exclude": exclude_runs or []},
    ).fetchall()
    if not rows:
        raise FactoryError(f"no users in {dataset!r} split {split!r} have both training "
                           "history and a validation item")
    return [Sequence(u, list(h), t) for u, h, t in rows]


def history_info(con: duckdb.DuckDBPyConnection, dataset: str,
                 sequences: list[Sequence]) -> dict[str, list[dict[str, Any]]]:
    """Per user, the prompt's view of the history: title, categories, brand, oldest first."""
    info = item_info(con, dataset, [i for s in sequences for i in s.history])
    return {s.user_id: [info[i] for i in s.history] for s in sequences}


def item_info(con: duckdb.DuckDBPyConnection, dataset: str,
              item_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Title, categories and brand per item (all items when `item_ids` is None)."""
    sql = "select item_id, title, categories, brand from items where dataset = ?"
    params: list[Any] = [dataset]
    if item_ids is not None:
        sql += " and item_id in (select unnest(?))"
        params.append(sorted(set(item_ids)))
    return {i: {"title": t or i, "categories": c or [], "brand": b}
            for i, t, c, b in con.execute(sql, params).fetchall()}


def item_text(info: dict[str, Any]) -> str:
    """What an item is for semantic retrieval: title, categories, brand."""
    parts = [info["title"]]
    if info["categories"]:
        parts.append(", ".join(info["categories"]))
    if info["brand"]:
        parts.append(info["brand"])
    return " | ".join(parts)
