"""Export a leave-one-out split as a training cache (format: README.md, "Training caches").

One row per user per part, built from `split_interactions` only:
train = (train items except the last -> the last train item), valid = (all train items ->
the valid item), test = (train + valid items -> the test item); histories keep the most
recent `max_len` items, left-padded with 0. A history never contains its own target or any
later item. Optional arrays come from providers aligned to the rows: item text embeddings
(`ItemTextSource`; `embedder_text_source` embeds through the shared embedding cache) and
step-wise reasoning embeddings H_i (`StepSource`, SCoTER 3.3.1). Semantic IDs of a `sids`
run become items.parquet's `sid` column (`attach_sids`), for `python -m train --sid`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory import __version__
from factory.errors import FactoryError
from factory.splits import require_loo
from factory.step_cache import staging_dir
from factory.warehouse import Warehouse, require_split
from train.format import FLOAT_DTYPES, FORMAT, VERSION, sha256_file
from train.format import SPLITS as PARTS

#: rows asked of a step provider at a time, so H for millions of users never sits in memory
CHUNK_ROWS = 4096


@dataclass
class ItemTextSource:
    """Item text embeddings: `embed(item_ids, titles)` -> (n, D) in the order given."""

    encoder: str
    embed: Callable[[list[str], list[str | None]], np.ndarray]
    dtype: str = "float16"
    meta: dict[str, Any] = field(default_factory=dict)  # more for the manifest's item_text


@dataclass
class StepSource:
    """Step-wise reasoning H_i per row (SCoTER 3.3.1). `steps(part, user_ids)` returns
    (len(user_ids), K, D) for those users' rows of that part; `chain(part, user_ids)`,
    optional, returns one (len(user_ids), D) embedding of each whole chain (ablation
    "w/o step-wise embedding"). `meta` is written to the manifest: K, D, encoder, template,
    chain_source."""

    meta: dict[str, Any]
    steps: Callable[[str, list[str]], np.ndarray]
    chain: Callable[[str, list[str]], np.ndarray] | None = None
    dtype: str = "float16"
    #: `--missing skip`: which rows have a chain; the others get zero rows, has_steps false
    #: in {part}.users.parquet and a count in the manifest's steps.missing
    has: Callable[[str, list[str]], np.ndarray] | None = None


@dataclass
class Part:
    seq: np.ndarray  # (rows, max_len) int32
    target: np.ndarray  # (rows,) int32
    user_ids: list[str]
    history_len: np.ndarray  # (rows,) int32, before truncation
    time: np.ndarray | None = None  # (rows, max_len) int64 unix seconds of seq, 0 = padding
    #: the history items older than the window, ragged: row r's are older[ptr[r]:ptr[r+1]]
    older: np.ndarray | None = None  # int32
    older_ptr: np.ndarray | None = None  # (rows + 1,) int64


#: each user's (train, valid, test) interaction times, aligned with their item lists
Times = tuple[list[list[int]], list[list[int]], list[list[int]]]


def _pad_left(history: list[int], max_len: int, dtype: type = np.int32) -> np.ndarray:
    row = np.zeros(max_len, dtype=dtype)
    tail = history[-max_len:]
    if tail:
        row[max_len - len(tail):] = tail
    return row


def build_parts(users: list[str], train: list[list[int]], valid: list[list[int]],
                test: list[list[int]], max_len: int, times: Times | None = None
                ) -> dict[str, Part]:
    """The three leave-one-out parts from each user's chronological item indices; with
    `times`, each history's times padded exactly as its items (the target's own time is
    never written: it is not part of the history)."""
    rows: dict[str, tuple[list, ...]] = {p: ([], [], [], [], [], []) for p in PARTS}

    def add(part: str, user: str, history: list[int], target: int,
            when: list[int] | None) -> None:
        if not history:
            return  # nothing to condition on
        seqs, targets, uids, lens, stamps, older = rows[part]
        seqs.append(_pad_left(history, max_len))
        older.append(history[:-max_len])  # for the masked protocol: the whole history
        targets.append(target)
        uids.append(user)
        lens.append(len(history))
        if when is not None:
            stamps.append(_pad_left(when, max_len, np.int64))

    no_times: list[list[int] | None] = [None] * len(users)
    tr_t, va_t, te_t = times if times is not None else (no_times, no_times, no_times)
    # the test item's own time is a target's: no history ever holds it
    for user, tr, va, te, trt, vat, _tet in zip(users, train, valid, test, tr_t, va_t, te_t,
                                                strict=True):
        if len(va) > 1 or len(te) > 1:
            raise FactoryError(
                f"user {user} has {len(va)} validation and {len(te)} test items: a cache needs "
                "a leave-one-out split (one of each per user)")
        if tr:
            add("train", user, tr[:-1], tr[-1], None if trt is None else trt[:-1])
        if va:
            add("valid", user, tr, va[0], trt)
        if te:
            add("test", user, tr + va, te[0], None if trt is None else trt + vat)
    out = {}
    for part, (seqs, targets, uids, lens, stamps, older) in rows.items():
        counts = np.fromiter((len(o) for o in older), np.int64, len(older))
        out[part] = Part(
            older=np.fromiter((i for o in older for i in o), np.int32, int(counts.sum())),
            older_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            seq=np.stack(seqs) if seqs else np.zeros((0, max_len), np.int32),
            target=np.asarray(targets, dtype=np.int32),
            user_ids=uids,
            history_len=np.asarray(lens, dtype=np.int32),
            time=None if times is None else (
                np.stack(stamps) if stamps else np.zeros((0, max_len), np.int64)),
        )
    return out


def _write_chunked(path: Path, part: str, users: list[str], fetch: Callable, shape_tail: tuple,
                   dtype: str, what: str) -> None:
    """Ask `fetch` for CHUNK_ROWS rows at a time and write them into one .npy file."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype,
                                    shape=(len(users), *shape_tail))
    for start in range(0, len(users), CHUNK_ROWS):
        chunk = users[start:start + CHUNK_ROWS]
        got = np.asarray(fetch(part, chunk))
        if got.shape != (len(chunk), *shape_tail):
            raise FactoryError(f"{what} provider returned shape {got.shape} for {len(chunk)} "
                               f"{part} rows; expected {(len(chunk), *shape_tail)}")
        if not np.isfinite(got).all():
            raise FactoryError(f"{what} provider returned NaN or infinite values ({part})")
        arr[start:start + len(chunk)] = got.astype(dtype)
    arr.flush()
    del arr


def write_cache(out: Path, *, dataset: str, split: str, items: pa.Table,
                parts: dict[str, Part], max_len: int, item_text: ItemTextSource | None = None,
                steps: StepSource | None = None, replace: bool = False,
                sid_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the cache directory atomically (a temporary sibling renamed at the end); returns
    the manifest. `items` has item_idx (1..n), item_id, title and optionally sid."""
    out = Path(out)
    if out.exists() and not replace:
        raise FactoryError(f"{out} exists; pass --replace to overwrite it")
    n_items = items.num_rows
    if n_items == 0:
        raise FactoryError("no items to export")
    idx = items["item_idx"].to_numpy()
    if not np.array_equal(idx, np.arange(1, n_items + 1)):
        raise FactoryError("items must be numbered 1..n in order")
    if sid_meta is not None and "sid" not in items.column_names:
        raise FactoryError("sid_meta without a sid column")
    if sid_meta is None and "sid" in items.column_names:
        sid_meta = {"run_id": None, "levels": len(items["sid"][0].as_py())}
    with_time = {p.time is not None for p in parts.values()}
    if len(with_time) > 1:
        raise FactoryError("either every part has times or none has")
    for dtype in {s.dtype for s in (item_text, steps) if s is not None}:
        if dtype not in FLOAT_DTYPES:
            raise FactoryError(f"embedding dtype must be float16 or float32, not {dtype}")
    tmp = staging_dir(out)
    try:
        pq.write_table(items, tmp / "items.parquet")
        text_meta = None
        if item_text is not None:
            vecs = np.asarray(item_text.embed(items["item_id"].to_pylist(),
                                              items["title"].to_pylist()))
            if vecs.ndim != 2 or vecs.shape[0] != n_items or not np.isfinite(vecs).all():
                raise FactoryError(f"item text embeddings: got shape {vecs.shape}, expected "
                                   f"({n_items}, D) of finite values")
            full = np.zeros((n_items + 1, vecs.shape[1]), dtype=item_text.dtype)
            full[1:] = vecs
            np.save(tmp / "item_text.npy", full)
            text_meta = {**item_text.meta, "encoder": item_text.encoder,
                         "dim": int(vecs.shape[1]), "dtype": item_text.dtype}
        missing: dict[str, int] = {}
        for name, part in parts.items():
            if np.isin(part.target, 0).any() or (part.seq[:, -1] == 0).any():
                raise FactoryError(f"{name}: a row has no target or an empty history")
            np.save(tmp / f"{name}.seq.npy", part.seq.astype(np.int32))
            np.save(tmp / f"{name}.target.npy", part.target.astype(np.int32))
            if part.time is not None:
                if part.time.shape != part.seq.shape or (part.time[part.seq == 0] != 0).any():
                    raise FactoryError(f"{name}: times not aligned with the histories")
                np.save(tmp / f"{name}.time.npy", part.time.astype(np.int64))
            assert part.older is not None and part.older_ptr is not None
            np.save(tmp / f"{name}.older.npy", part.older.astype(np.int32))
            np.save(tmp / f"{name}.older_ptr.npy", part.older_ptr.astype(np.int64))
            columns = {
                "row": pa.array(np.arange(len(part.user_ids), dtype=np.int64)),
                "user_id": pa.array(part.user_ids, pa.string()),
                "history_len": pa.array(part.history_len, pa.int32()),
            }
            if steps is not None and steps.has is not None:
                mask = np.asarray(steps.has(name, part.user_ids), dtype=bool)
                columns["has_steps"] = pa.array(mask, pa.bool_())
                missing[name] = int((~mask).sum())
            pq.write_table(pa.table(columns), tmp / f"{name}.users.parquet")
            if steps is not None:
                k, d = int(steps.meta["K"]), int(steps.meta["D"])
                _write_chunked(tmp / f"{name}.steps.npy", name, part.user_ids, steps.steps,
                               (k, d), steps.dtype, "step")
                if steps.chain is not None:
                    _write_chunked(tmp / f"{name}.chain.npy", name, part.user_ids,
                                   steps.chain, (d,), steps.dtype, "chain")
        steps_meta = None if steps is None else {**steps.meta, "dtype": steps.dtype}
        if steps_meta is not None and steps.has is not None:
            steps_meta["missing"] = missing
        chain_meta = (None if steps is None or steps.chain is None
                      else {"D": int(steps.meta["D"]), "dtype": steps.dtype,
                            "encoder": steps.meta.get("encoder")})
        manifest = {
            "format": FORMAT, "version": VERSION, "dataset": dataset, "split": split,
            "n_items": n_items, "max_len": max_len, "item_text": text_meta, "sid": sid_meta,
            "steps": steps_meta, "chain": chain_meta,
            "time": {"unit": "s"} if True in with_time else None,
            "older": True,  # {split}.older[_ptr].npy: history beyond the window (masking)
            "rows": {name: int(len(p.target)) for name, p in parts.items()},
            "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "factory_version": __version__,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_split(con: duckdb.DuckDBPyConnection, dataset: str, split: str
               ) -> tuple[pa.Table, list[str], list[list[int]], list[list[int]], list[list[int]],
                          Times | None]:
    """Items (numbered 1..n by item_id), each user's train/valid/test item indices in
    chronological order, straight from `split_interactions`, and their interaction times
    (unix seconds) in the same order, None unless every interaction of the split has one."""
    require_split(con, dataset, split)
    require_loo(con, dataset, split, "a training cache")
    rows = con.execute(
        "select c.item_id, i.title from (select distinct item_id from split_interactions"
        "  where dataset = $d and split = $s) c"
        " left join items i on i.dataset = $d and i.item_id = c.item_id order by c.item_id",
        {"d": dataset, "s": split},
    ).fetchall()
    items = pa.table({
        "item_idx": pa.array(np.arange(1, len(rows) + 1, dtype=np.int32)),
        "item_id": pa.array([r[0] for r in rows], pa.string()),
        "title": pa.array([r[1] for r in rows], pa.string()),
    })
    con.register("_cache_items", items.select(["item_idx", "item_id"]))
    try:
        rows = con.execute(
            "select si.user_id,"
            " coalesce(list(m.item_idx order by si.position) filter (where si.part = 'train'),"
            "  []) as tr,"
            " coalesce(list(m.item_idx order by si.position) filter (where si.part = 'valid'),"
            "  []) as va,"
            " coalesce(list(m.item_idx order by si.position) filter (where si.part = 'test'),"
            "  []) as te,"
            " coalesce(list(si.ts order by si.position) filter (where si.part = 'train'),"
            "  []) as tr_ts,"
            " coalesce(list(si.ts order by si.position) filter (where si.part = 'valid'),"
            "  []) as va_ts,"
            " coalesce(list(si.ts order by si.position) filter (where si.part = 'test'),"
            "  []) as te_ts,"
            " count(*) filter (where si.ts is null) as untimed"
            " from split_interactions si join _cache_items m using (item_id)"
            " where si.dataset = $d and si.split = $s group by si.user_id order by si.user_id",
            {"d": dataset, "s": split},
        ).fetchall()
    finally:
        con.unregister("_cache_items")
    users = [r[0] for r in rows]
    times: Times | None = None
    if rows and not any(r[7] for r in rows):
        times = ([r[4] for r in rows], [r[5] for r in rows], [r[6] for r in rows])
    return (items, users, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
            times)


def resolve_sids_run(con: duckdb.DuckDBPyConnection, dataset: str, run: str | None) -> str:
    """`run` (an id, a unique prefix, or latest) checked to be a stored `sids` run of
    `dataset`; the dataset's latest when `run` is None."""
    from factory.runs import LATEST, resolve_run

    if run is None or run.strip() == LATEST:
        rows = con.execute("select run_id from sid_latest where dataset = ?", [dataset]
                           ).fetchall()
        if not rows:
            raise FactoryError(f"dataset {dataset!r} has no semantic IDs; run `factory sids "
                               f"--dataset {dataset}` first")
        return rows[0][0]
    return resolve_run(con, "sids", dataset, run, within="select run_id from sid_runs",
                       option="--sids-run", first=f"factory sids --dataset {dataset}")


def attach_sids(con: duckdb.DuckDBPyConnection, dataset: str, items: pa.Table,
                run: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """`items` with a `sid` column (list<int32>: one code per level, disambiguation level
    included) from the `sids` run `run` (default: the latest), and the manifest's `sid`
    entry. Every item of the cache must have a SID of the same length."""
    run_id = resolve_sids_run(con, dataset, run)
    con.register("_cache_item_ids", items.select(["item_id"]))
    try:
        rows = con.execute(
            "select c.item_id, s.codes from _cache_item_ids c left join item_sids_all s"
            " on s.dataset = ? and s.run_id = ? and s.item_id = c.item_id", [dataset, run_id]
        ).fetchall()
        info = con.execute("select params, n_levels, collision_rate, encoder from sid_runs"
                           " where run_id = ?", [run_id]).fetchall()[0]
    finally:
        con.unregister("_cache_item_ids")
    codes = dict(rows)
    missing = [i for i in items["item_id"].to_pylist() if codes.get(i) is None]
    if missing:
        raise FactoryError(f"sids run {run_id} has no SID for {len(missing):,} of the cache's "
                           f"{items.num_rows:,} items (e.g. {missing[0]!r}); re-run "
                           f"`factory sids --dataset {dataset}`")
    column = [list(codes[i]) for i in items["item_id"].to_pylist()]
    if len({len(c) for c in column}) != 1:
        raise FactoryError(f"sids run {run_id}: SIDs of different lengths")
    params = json.loads(info[0]) if isinstance(info[0], str) else info[0]
    meta = {"run_id": run_id, "levels": len(column[0]), "n_levels": info[1],
            "codebook_size": params.get("codebook_size"), "collision_rate": info[2],
            "encoder": info[3]}
    return items.append_column("sid", pa.array(column, pa.list_(pa.int32()))), meta


def item_texts(con: duckdb.DuckDBPyConnection, dataset: str, item_ids: list[str],
               fields: list[str]) -> tuple[list[str], int]:
    """The text embedded for each item, as `factory sids` builds it (so a shared encoder
    finds SID texts in the embedding cache): `title: ...; categories: ...` from `fields`;
    an item with none of them is embedded by its id. Returns (texts, items without text)."""
    from jobs.sids import TEXT_FIELDS, item_text

    bad = [f for f in fields if f not in TEXT_FIELDS]
    if bad:
        raise FactoryError(f"unknown text field(s) {', '.join(bad)} "
                           f"(choose from {', '.join(TEXT_FIELDS)})")
    cur = con.execute("select item_id, title, categories, brand, description from items"
                      " where dataset = ?", [dataset])
    columns = [d[0] for d in cur.description]
    rows = {r[0]: dict(zip(columns, r, strict=True)) for r in cur.fetchall()}
    texts, without = [], 0
    for item_id in item_ids:
        text = item_text(rows.get(item_id, {}), fields)
        without += not text
        texts.append(text or item_id)
    return texts, without


def embedder_text_source(wh: Warehouse, texts: dict[str, str], encoder: str | None = None,
                         *, fields: list[str] | None = None, without_text: int = 0,
                         dtype: str = "float16") -> ItemTextSource:
    """Item text embeddings through the shared embedding cache (factory/embeddings.py);
    `texts` maps item_id -> text. Call it without holding a warehouse connection."""
    from factory.embeddings import Embedder

    embedder = Embedder(wh, encoder)

    def embed(item_ids: list[str], _titles: list[str | None]) -> np.ndarray:
        return embedder.embed([texts[i] for i in item_ids], label="embedding item texts")

    return ItemTextSource(encoder=embedder.encoder_id, embed=embed, dtype=dtype,
                          meta={"text_fields": fields, "items_without_text": without_text})


def export_cache(wh: Warehouse, dataset: str, split: str, out: Path, max_len: int, *,
                 item_text: ItemTextSource | None = None, steps: StepSource | None = None,
                 replace: bool = False, sids: bool = False, sids_run: str | None = None,
                 text_encoder: str | None = None, text_fields: list[str] | None = None,
                 embed_item_text: bool = False) -> dict[str, Any]:
    """Read the split (one short read), then write the cache; returns the manifest.

    `sids` (or a `sids_run`) adds the semantic IDs of that run (default: the dataset's
    latest) as items.parquet's `sid` column; `embed_item_text` writes item_text.npy from
    `text_fields` (default title, categories) through the shared embedding cache with
    `text_encoder` (default: the embedded MiniLM)."""
    if max_len < 1:
        raise FactoryError("--history must be at least 1")
    sid_meta = texts = None
    without = 0
    fields = text_fields or ["title", "categories"]
    with wh.read() as con:
        items, users, train, valid, test, times = read_split(con, dataset, split)
        if sids or sids_run:
            items, sid_meta = attach_sids(con, dataset, items, sids_run)
        if embed_item_text:
            ids = items["item_id"].to_pylist()
            text_list, without = item_texts(con, dataset, ids, fields)
            texts = dict(zip(ids, text_list, strict=True))
    if texts is not None:
        if item_text is not None:
            raise FactoryError("pass either an item_text source or embed_item_text")
        item_text = embedder_text_source(wh, texts, text_encoder, fields=fields,
                                         without_text=without)
    if not users:
        raise FactoryError(f"split {split!r} of {dataset!r} has no interactions")
    parts = build_parts(users, train, valid, test, max_len, times)
    if not len(parts["train"].target):
        raise FactoryError(f"split {split!r} of {dataset!r} has no user with two training "
                           "items: nothing to train on")
    return write_cache(out, dataset=dataset, split=split, items=items, parts=parts,
                       max_len=max_len, item_text=item_text, steps=steps, replace=replace,
                       sid_meta=sid_meta)
