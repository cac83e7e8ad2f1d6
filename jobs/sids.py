"""`factory sids`: semantic IDs by residual k-means over item text embeddings.

TwiSTAR sec. 3 and E.1: embed each item's text (title and categories by default), quantise
with L levels of k-means, each level clustering the residuals the previous one left
(eq. 2), SID = the L codes (eq. 3), written as tokens `<|sid_begin|><s_a_12><s_b_4><s_c_200>
<|sid_end|>` (App. A.2). Items whose L codes collide get an extra disambiguation code
(SCoTER A.1); when any collision exists every item gets that level (0 where unique), so all
SIDs keep one length, and the level takes the next letter (`<s_d_1>`).

Embeddings come from the shared service (factory/embeddings.py), so a re-run, or another job
embedding the same texts, encodes nothing again. An item with none of the chosen fields is
embedded from its item id, and the run counts and reports such items.
"""

from __future__ import annotations

import hashlib
import json
import string
import time
import warnings
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import typer

from factory.console import console, summary
from factory.embeddings import Embedder, text_key
from factory.errors import FactoryError
from factory.runs import finish_run, start_run
from factory.warehouse import Warehouse, require_dataset

TEXT_FIELDS = ("title", "categories", "brand", "description")
SID_BEGIN, SID_END = "<|sid_begin|>", "<|sid_end|>"
MAX_LEVELS = 25  # letters a..y for code levels, leaving one for the disambiguation level


def item_text(row: dict[str, Any], fields: list[str]) -> str:
    """`title: ...; categories: a, b` from the chosen fields that the item has."""
    parts = []
    for field in fields:
        value = row.get(field)
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value if v)
        if value:
            parts.append(f"{field}: {value}")
    return "; ".join(parts)


def sid_string(codes: list[int]) -> str:
    return SID_BEGIN + "".join(
        f"<s_{string.ascii_lowercase[level]}_{code}>" for level, code in enumerate(codes)
    ) + SID_END


def residual_kmeans(
    x: np.ndarray, levels: int, k: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(codes (n, levels), one (k, d) codebook per level, final residuals (n, d))."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    residual = x.astype(np.float32, copy=True)
    codes = np.zeros((len(x), levels), dtype=np.int32)
    books = []
    for level in range(levels):
        km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed + level)
        with warnings.catch_warnings():
            # fewer distinct residuals than k (duplicate texts): some codes stay unused
            warnings.simplefilter("ignore", ConvergenceWarning)
            codes[:, level] = km.fit_predict(residual)
        book = km.cluster_centers_.astype(np.float32)
        residual -= book[codes[:, level]]
        books.append(book)
    return codes, books, residual


def disambiguate(codes: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, int]:
    """Append a disambiguation code when any L-code SID is shared (SCoTER A.1): within a
    group of equal codes, items closer to the codeword (smaller residual) come first.
    Returns (codes, items in collisions)."""
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    colliding = int((sizes[group] > 1).sum())
    if not colliding:
        return codes, 0
    order = np.lexsort((np.linalg.norm(residual, axis=1), group))
    extra = np.zeros(len(codes), dtype=np.int32)
    starts = np.zeros(len(sizes), dtype=np.int64)
    starts[1:] = np.cumsum(sizes)[:-1]
    ranked_groups = group[order]
    extra[order] = np.arange(len(order)) - starts[ranked_groups]
    return np.column_stack([codes, extra]).astype(np.int32), colliding


def sid_prefix_agreement(
    con: duckdb.DuckDBPyConnection, i2i_run_id: str
) -> tuple[float, float] | None:
    """Shares of the run's pairs whose first / first two SID codes match (TwiSTAR 6.3), using
    the dataset's latest SIDs; None when the dataset has no SIDs."""
    row = con.execute(
        "select count(*), avg((si.codes[1] = sj.codes[1])::double),"
        " avg((si.codes[1:2] = sj.codes[1:2])::double)"
        " from i2i_pairs_all p"
        " join item_sids si on si.dataset = p.dataset and si.item_id = p.item_i"
        " join item_sids sj on sj.dataset = p.dataset and sj.item_id = p.item_j"
        " where p.run_id = ?", [i2i_run_id],
    ).fetchone()
    return (row[1], row[2]) if row[0] else None


def _params(levels: int, k: int, fields: list[str], seed: int, encoder: str) -> dict[str, Any]:
    return {"levels": levels, "codebook_size": k, "text_fields": fields, "seed": seed,
            "encoder": encoder, "kmeans": "sklearn KMeans n_init=1 max_iter=100"}


def run_sids(wh: Warehouse, dataset: str, *, levels: int = 3, codebook_size: int = 256,
             fields: list[str] | None = None, encoder: str | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Embed, quantise, store and publish SIDs for every item of `dataset`."""
    fields = fields or ["title", "categories"]
    bad = [f for f in fields if f not in TEXT_FIELDS]
    if bad:
        raise FactoryError(f"unknown text field(s) {', '.join(bad)} "
                           f"(choose from {', '.join(TEXT_FIELDS)})")
    if not 1 <= levels <= MAX_LEVELS:
        raise FactoryError(f"--levels must be between 1 and {MAX_LEVELS}")
    if codebook_size < 2:
        raise FactoryError("--codebook-size must be at least 2")
    started = time.perf_counter()
    with wh.read() as con:
        require_dataset(con, dataset)
        cur = con.execute(
            "select item_id, title, categories, brand, description from items"
            " where dataset = ? order by item_id", [dataset]
        )
        columns = [d[0] for d in cur.description]
        items = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    if codebook_size > len(items):
        raise FactoryError(f"--codebook-size {codebook_size} is larger than the {len(items)} "
                           f"items of {dataset!r}; use at most {len(items)}")
    embedder = Embedder(wh, encoder)
    params = _params(levels, codebook_size, fields, seed, embedder.encoder_id)
    with wh.write() as con:
        run_id = start_run(con, "sids", dataset, params)
    counts: dict[str, Any] = {"run_id": run_id}
    try:
        texts = []
        for row in items:
            text = item_text(row, fields)
            texts.append(text or row["item_id"])
        counts["items_without_text"] = sum(1 for row in items if not item_text(row, fields))
        vecs = embedder.embed(texts, label="embedding item texts")
        counts.update(texts=embedder.stats.seen, cache_hits=embedder.stats.cache_hits,
                      encoded=embedder.stats.encoded)
        with console.status(f"residual k-means: {levels} levels x {codebook_size} codes"):
            base, books, residual = residual_kmeans(vecs, levels, codebook_size, seed)
        codes, colliding = disambiguate(base, residual)
        usage = [int(len(np.unique(base[:, level]))) for level in range(levels)]
        counts.update(
            items=len(items), levels=codes.shape[1], collisions=colliding,
            collision_rate=colliding / len(items), codes_used=usage,
            max_disambiguation_code=int(codes[:, levels].max()) if colliding else None,
            seconds=round(time.perf_counter() - started, 2),
        )
        with wh.write() as con:
            _store(con, dataset, run_id, items, codes, texts, books)
            counts.update(_publish(con, dataset, run_id, params, counts, codebook_size))
            finish_run(con, run_id, "succeeded", counts)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with wh.write() as con:
            finish_run(con, run_id, status, counts, str(exc).splitlines()[0] if str(exc) else
                       type(exc).__name__)
        raise
    return counts


def _store(con: duckdb.DuckDBPyConnection, dataset: str, run_id: str,
           items: list[dict[str, Any]], codes: np.ndarray, texts: list[str],
           books: list[np.ndarray]) -> None:
    code_lists = codes.tolist()
    con.register("_sids", pa.table({
        "item_id": [r["item_id"] for r in items],
        "codes": pa.array(code_lists, pa.list_(pa.int32())),
        "sid": [sid_string(c) for c in code_lists],
        "h": [text_key(t) for t in texts],
    }))
    con.execute("insert into item_sids_all select ?, ?, item_id, codes, sid, h from _sids",
                [dataset, run_id])
    k, dim = books[0].shape
    con.register("_books", pa.table({
        "level": np.repeat(np.arange(len(books), dtype=np.int32), k),
        "code": np.tile(np.arange(k, dtype=np.int32), len(books)),
        "centroid": pa.array(list(np.concatenate(books)), pa.list_(pa.float32())),
    }))
    con.execute("insert into sid_codebooks select ?, ?, level, code, centroid from _books",
                [dataset, run_id])


def _publish(con: duckdb.DuckDBPyConnection, dataset: str, run_id: str,
             params: dict[str, Any], counts: dict[str, Any], k: int) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    replaced = [r for (r,) in con.execute(
        "select run_id from sid_runs where dataset = ? and params_hash = ?", [dataset, digest]
    ).fetchall()]
    for old in replaced:
        for table in ("item_sids_all", "sid_codebooks", "sid_runs"):
            con.execute(f"delete from {table} where run_id = ?", [old])
    con.execute(
        "insert into sid_runs (run_id, dataset, encoder, params, params_hash, n_items,"
        " n_levels, collision_rate, usage) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, dataset, params["encoder"], json.dumps(params, sort_keys=True), digest,
         counts["items"], counts["levels"], counts["collision_rate"],
         json.dumps([{"level": lvl, "used": used, "of": k}
                     for lvl, used in enumerate(counts["codes_used"])])],
    )
    return {"replaced_runs": replaced}


def register(app: typer.Typer) -> None:
    @app.command("sids")
    def sids_cmd(
        dataset: str = typer.Option(..., "--dataset"),
        levels: int = typer.Option(3, "--levels", help="Quantisation levels L (TwiSTAR: 3)."),
        codebook_size: int = typer.Option(256, "--codebook-size",
                                          help="Codes per level K (TwiSTAR: 256)."),
        text_fields: str = typer.Option("title,categories", "--text-fields",
                                        help=f"Comma-separated, from {', '.join(TEXT_FIELDS)}."),
        encoder: str = typer.Option(None, "--encoder", help="sentence-transformers model "
                                    "path or name [default: embedded all-MiniLM-L6-v2]."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Semantic IDs by residual k-means over item text (TwiSTAR 3, E.1; SCoTER A.1)."""
        from factory.cli import warehouse

        wh = warehouse()
        fields = [f.strip() for f in text_fields.split(",") if f.strip()]
        c = run_sids(wh, dataset, levels=levels, codebook_size=codebook_size, fields=fields,
                     encoder=encoder, seed=seed)
        rows: dict[str, Any] = {
            "items": c["items"],
            "texts encoded / from cache": f"{c['encoded']:,} / {c['cache_hits']:,}",
            "codes used per level": ", ".join(f"{u}/{codebook_size}" for u in c["codes_used"]),
            "collision rate": f"{c['collision_rate']:.2%} ({c['collisions']:,} items)",
            "SID length": f"{c['levels']} codes"
                          + (" (with disambiguation level)" if c["levels"] > levels else ""),
        }
        if c["items_without_text"]:
            rows["items without text (embedded by id)"] = c["items_without_text"]
        with wh.read() as con:
            latest = con.execute("select run_id from i2i_latest where dataset = ?",
                                 [dataset]).fetchone()
            agree = sid_prefix_agreement(con, latest[0]) if latest else None
        if agree:
            rows["I2I pairs with same first / first two codes"] = (
                f"{agree[0]:.2%} / {agree[1]:.2%}")
        rows.update(seconds=c["seconds"], run=c["run_id"])
        summary(f"semantic IDs of {dataset}", rows,
                f"select item_id, sid from item_sids where dataset = '{dataset}' limit 10")
