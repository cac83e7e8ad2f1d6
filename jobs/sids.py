"""`factory sids`: semantic IDs by residual k-means over item text embeddings.

TwiSTAR sec. 3 and E.1: embed each item's text (title and categories by default), quantise
with L levels of k-means, each level clustering the residuals the previous one left
(eq. 2), SID = the L codes (eq. 3), written as tokens `<|sid_begin|><s_a_12><s_b_4><s_c_200>
<|sid_end|>` (App. A.2). Each level runs spherical k-means on the directions of the centred
residuals (Euclidean k-means on raw residuals let one near-origin centroid take most items at
levels 2-3: issue 12); `--balanced` caps every code at ceil(n/K) items. Collisions (equal L
codes): `strict` (default, A.2's exactly-L-token format) keeps the item nearest its codeword
and moves the others to the nearest last-level code free under their prefix; `extra-level`
appends a disambiguation code to every item (TIGER; SCoTER A.1's RQ-VAE baseline), `<s_d_1>`.

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
from factory.runs import finish_run, start_run, timed
from factory.vocabulary import DatasetOpt
from factory.warehouse import Warehouse, require_dataset

TEXT_FIELDS = ("title", "categories", "brand", "description")
SID_BEGIN, SID_END = "<|sid_begin|>", "<|sid_end|>"
MAX_LEVELS = 25  # letters a..y for code levels, leaving one for the disambiguation level
METHODS = ("cosine", "euclidean")
COLLISIONS = ("strict", "extra-level")


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


def _unit(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norm, 1e-12)


def balanced_assign(sim: np.ndarray, cap: int) -> np.ndarray:
    """Capacity-constrained assignment: every item to its most similar code that still has
    room (at most `cap` items a code). Rounds: items bid for their best open code, a code
    keeps its most similar bidders up to its room, the rest bid again without the full codes."""
    n, k = sim.shape
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    full = np.zeros(k, dtype=bool)
    todo = np.arange(n)
    while len(todo):
        s = sim[todo].copy()
        s[:, full] = -np.inf
        best = s.argmax(1)
        score = s[np.arange(len(todo)), best]
        order = np.lexsort((-score, best))            # by code, most similar first
        ranked = best[order]
        starts = np.searchsorted(ranked, ranked, side="left")
        rank = np.arange(len(order)) - starts
        take = rank < (cap - load[ranked])
        labels[todo[order[take]]] = ranked[take]
        np.add.at(load, ranked[take], 1)
        full = load >= cap
        todo = todo[order[~take]]
    return labels


def row_sums(labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(k, d) sums of `rows` per label, bit-identical to `np.add.at(zeros, labels, rows)`,
    so SIDs do not change: the same additions in the same order (0 + a code's first row +
    its second ...), done for all codes at once, one rank at a time. add.at is unbuffered
    and element-wise: a quarter to half of k-means' own time on ml-1m (K=256 / K=64); this
    is 4-5x faster there. (np.add.reduceat is faster still but may sum pairwise: not
    bit-identical.)"""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k)
    starts = np.cumsum(counts) - counts
    sums = np.zeros((k, rows.shape[1]), dtype=rows.dtype)
    codes = np.argsort(-counts, kind="stable")      # largest code first
    sizes = counts[codes]
    for rank in range(int(sizes[0]) if len(sizes) else 0):
        live = codes[:np.searchsorted(-sizes, -rank, side="left")]   # codes with > rank rows
        sums[live] += rows[order[starts[live] + rank]]
    return sums


def spherical_kmeans(u: np.ndarray, k: int, seed: int, *, balanced: bool = False,
                     iters: int = 50) -> np.ndarray:
    """Codes of unit rows `u` by k-means on the sphere: k-means++ seeding in cosine distance,
    cosine assignment to unit-norm centroids (capacity ceil(n/k) with `balanced`)."""
    rng = np.random.default_rng(seed)
    n = len(u)
    first = int(rng.integers(n))
    chosen = [first]
    dist = np.maximum(1.0 - u @ u[first], 0.0)
    for _ in range(k - 1):
        total = dist.sum()
        pick = int(rng.choice(n, p=dist / total)) if total > 1e-12 else int(rng.integers(n))
        chosen.append(pick)
        dist = np.minimum(dist, np.maximum(1.0 - u @ u[pick], 0.0))
    centroids = u[chosen].copy()
    cap = -(-n // k)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(iters):
        sim = u @ centroids.T
        new = balanced_assign(sim, cap) if balanced else sim.argmax(1)
        if (new == labels).all():
            break
        labels = new
        sums = row_sums(labels, u, k)
        empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
        if len(empty):                 # reseed empty codes with the worst-fitting items
            fit = sim[np.arange(n), labels]
            sums[empty] = u[np.argsort(fit, kind="stable")[:len(empty)]]
        centroids = _unit(sums)
    return labels


def residual_kmeans(
    x: np.ndarray, levels: int, k: int, seed: int, *, method: str = "cosine",
    balanced: bool = False,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(codes (n, levels), one (k, d) codebook per level, final residuals (n, d)).

    `cosine` (default): each level clusters the directions of the centred residuals by
    spherical k-means; a code's codeword is the mean residual of its items, so
    x = sum of codewords + residual. `euclidean`: the earlier sklearn KMeans on raw
    residuals (n_init=1), kept to reproduce old runs: in high dimension its residuals are
    near-orthogonal and one centroid near the origin takes most items (issue 12)."""
    if method not in METHODS:
        raise FactoryError(f"unknown quantiser {method!r} (choose from {', '.join(METHODS)})")
    if method == "euclidean" and balanced:
        raise FactoryError("--balanced needs the cosine quantiser")
    residual = x.astype(np.float64 if method == "cosine" else np.float32, copy=True)
    codes = np.zeros((len(x), levels), dtype=np.int32)
    books = []
    for level in range(levels):
        if method == "euclidean":
            codes[:, level], book = _sklearn_level(residual, k, seed + level)
        else:
            codes[:, level] = spherical_kmeans(_unit(residual - residual.mean(0)), k,
                                               seed + level, balanced=balanced)
            book = row_sums(codes[:, level], residual, k)
            book /= np.maximum(np.bincount(codes[:, level], minlength=k), 1)[:, None]
        residual -= book[codes[:, level]]
        books.append(book.astype(np.float32))
    return codes, books, residual.astype(np.float32)


def _sklearn_level(residual: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed)
    with warnings.catch_warnings():
        # fewer distinct residuals than k (duplicate texts): some codes stay unused
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(residual)
    return labels, km.cluster_centers_.astype(np.float32)


def level_stats(codes: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Per level: codes used of K, largest bucket share, code entropy (bits) and perplexity
    (2**entropy: the number of equally used codes with the same entropy), and the share of
    items whose prefix up to this level is shared with another item."""
    n = len(codes)
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=k)
        p = counts[counts > 0] / n
        entropy = float(-(p * np.log2(p)).sum())
        _, inv, sizes = np.unique(codes[:, :level + 1], axis=0, return_inverse=True,
                                  return_counts=True)
        out.append({"level": level, "used": int((counts > 0).sum()), "of": k,
                    "largest_share": round(float(counts.max() / n), 4),
                    "entropy_bits": round(entropy, 3), "perplexity": round(2 ** entropy, 1),
                    "prefix_collision_rate": round(float((sizes[inv.reshape(-1)] > 1).mean()),
                                                   4)})
    return out


def colliding_items(codes: np.ndarray) -> int:
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return int((sizes[group.reshape(-1)] > 1).sum())


def resolve_strict(codes: np.ndarray, books: list[np.ndarray],
                   residual: np.ndarray) -> tuple[np.ndarray, int]:
    """TwiSTAR A.2's strict L tokens: within a group of items with equal codes the item
    nearest its last codeword keeps the code; each other one moves to the nearest last-level
    codeword not used by an item with the same first L-1 codes. Returns (codes, items moved).
    Raises when more items share the first L-1 codes than the last level has codes."""
    codes = codes.copy()
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    if not (sizes > 1).any():
        return codes, 0
    last = books[-1]
    k = len(last)
    before = residual + last[codes[:, -1]]         # what the last level quantised
    _, prefix = np.unique(codes[:, :-1], axis=0, return_inverse=True) if codes.shape[1] > 1 \
        else (None, np.zeros(len(codes), dtype=np.int64))
    prefix = prefix.reshape(-1)
    norm = np.linalg.norm(residual, axis=1)
    moved = 0
    for p in np.unique(prefix[sizes[group] > 1]):
        members = np.flatnonzero(prefix == p)
        if len(members) > k:
            raise FactoryError(
                f"{len(members)} items share their first {codes.shape[1] - 1} codes but the "
                f"last level has {k} codes: strict SIDs are impossible; raise --codebook-size "
                "or use --collisions extra-level")
        order = members[np.lexsort((norm[members], group[members]))]
        taken: set[int] = set()
        losers = []
        for i in order:
            c = int(codes[i, -1])
            if c in taken:
                losers.append(i)
            else:
                taken.add(c)
        for i in sorted(losers, key=lambda j: norm[j]):
            dist = np.linalg.norm(last - before[i], axis=1)
            for c in np.argsort(dist, kind="stable"):
                if int(c) not in taken:
                    codes[i, -1] = c
                    taken.add(int(c))
                    moved += 1
                    break
    return codes, moved


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


def _params(levels: int, k: int, fields: list[str], seed: int, encoder: str, method: str,
            balanced: bool, collisions: str) -> dict[str, Any]:
    kmeans = ("spherical k-means on centred unit residuals, k-means++ seeding, max_iter=50"
              if method == "cosine" else "sklearn KMeans n_init=1 max_iter=100")
    return {"levels": levels, "codebook_size": k, "text_fields": fields, "seed": seed,
            "encoder": encoder, "kmeans": kmeans, "quantiser": method, "balanced": balanced,
            "collisions": collisions}


def suggested_codebook_size(n_items: int) -> int:
    """The power of two nearest to at most 2*sqrt(n): K^2 <= 4n keeps every level's codes
    shared by several items (the factory's rule of thumb, not a paper's)."""
    return max(2, 1 << int(np.floor(np.log2(2 * np.sqrt(n_items)))))


def codebook_warning(n_items: int, k: int) -> str | None:
    if k * k <= 4 * n_items:
        return None
    return (f"--codebook-size {k} is large for {n_items:,} items (K^2 = {k * k:,} >> items: "
            f"{n_items / k:.1f} items per first-level code, so later levels split groups of a "
            f"few items); about {suggested_codebook_size(n_items)} suits this catalogue")


def run_sids(wh: Warehouse, dataset: str, *, levels: int = 3, codebook_size: int = 256,
             fields: list[str] | None = None, encoder: str | None = None,
             seed: int = 0, method: str = "cosine", balanced: bool = False,
             collisions: str = "strict") -> dict[str, Any]:
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
    if collisions not in COLLISIONS:
        raise FactoryError(f"unknown --collisions {collisions!r} "
                           f"(choose from {', '.join(COLLISIONS)})")
    if method not in METHODS:
        raise FactoryError(f"unknown --quantiser {method!r} (choose from {', '.join(METHODS)})")
    if method == "euclidean" and balanced:
        raise FactoryError("--balanced needs the cosine quantiser")
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
    if collisions == "strict" and codebook_size ** levels < len(items):
        raise FactoryError(f"--collisions strict needs K^L >= items: {codebook_size}^{levels} < "
                           f"{len(items)}; raise --codebook-size or use --collisions extra-level")
    embedder = Embedder(wh, encoder)
    params = _params(levels, codebook_size, fields, seed, embedder.encoder_id, method,
                     balanced, collisions)
    with wh.write() as con:
        run_id = start_run(con, "sids", dataset, params)
    counts: dict[str, Any] = {"run_id": run_id}
    try:
        texts = []
        for row in items:
            text = item_text(row, fields)
            texts.append(text or row["item_id"])
        counts["items_without_text"] = sum(1 for row in items if not item_text(row, fields))
        counts["duplicate_texts"] = len(texts) - len(set(texts))
        # where the time goes (issue 18): stored with the run, printed in the summary
        phases = {"prepare": round(time.perf_counter() - started, 3)}
        with timed(phases, "embed"):
            vecs = embedder.embed(texts, label="embedding item texts")
        counts.update(texts=embedder.stats.seen, cache_hits=embedder.stats.cache_hits,
                      encoded=embedder.stats.encoded)
        with timed(phases, "kmeans"), console.status(
                f"residual k-means: {levels} levels x {codebook_size} codes"):
            base, books, residual = residual_kmeans(vecs, levels, codebook_size, seed,
                                                    method=method, balanced=balanced)
        with timed(phases, "collisions"):
            colliding = colliding_items(base)
            stats = level_stats(base, codebook_size)
            if collisions == "strict":
                codes, moved = resolve_strict(base, books, residual)
                extra = None
            else:
                codes, _ = disambiguate(base, residual)
                moved = 0
                extra = int(codes[:, levels].max()) if colliding else None
            counts.update(
                items=len(items), levels=codes.shape[1], collisions=colliding,
                collision_rate=colliding / len(items), codes_used=[s["used"] for s in stats],
                level_stats=stats, collision_mode=collisions, moved_to_free_code=moved,
                max_disambiguation_code=extra,
                warning=codebook_warning(len(items), codebook_size),
            )
        with wh.write() as con:
            with timed(phases, "store"):
                _store(con, dataset, run_id, items, codes, texts, books)
                counts.update(_publish(con, dataset, run_id, params, counts, codebook_size))
            counts.update(seconds=round(time.perf_counter() - started, 2),
                          phase_seconds=phases)
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
        " n_levels, collision_rate, usage, collisions, colliding_items, moved_items,"
        " level_stats) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, dataset, params["encoder"], json.dumps(params, sort_keys=True), digest,
         counts["items"], counts["levels"], counts["collision_rate"],
         json.dumps([{"level": lvl, "used": used, "of": k}
                     for lvl, used in enumerate(counts["codes_used"])]),
         counts["collision_mode"], counts["collisions"], counts["moved_to_free_code"],
         json.dumps(counts["level_stats"])],
    )
    return {"replaced_runs": replaced}


def register(app: typer.Typer) -> None:
    @app.command("sids")
    def sids_cmd(
        dataset: str = DatasetOpt,
        levels: int = typer.Option(3, "--levels", help="Quantisation levels L (TwiSTAR: 3)."),
        codebook_size: int = typer.Option(256, "--codebook-size",
                                          help="Codes per level K (TwiSTAR: 256)."),
        text_fields: str = typer.Option("title,categories", "--text-fields",
                                        help=f"Comma-separated, from {', '.join(TEXT_FIELDS)}."),
        encoder: str = typer.Option(None, "--encoder", help="sentence-transformers model "
                                    "path or name [default: embedded all-MiniLM-L6-v2]."),
        seed: int = typer.Option(0, "--seed"),
        collisions: str = typer.Option(
            "strict", "--collisions", help="strict: exactly L tokens (TwiSTAR A.2), a "
            "colliding item moves to the nearest free last-level code; extra-level: one more "
            "disambiguation token for every item (TIGER, SCoTER's RQ-VAE baseline A.1)."),
        balanced: bool = typer.Option(False, "--balanced", help="Capacity-constrained "
                                      "assignment: at most ceil(items/K) items per code."),
        quantiser: str = typer.Option("cosine", "--quantiser", help="cosine: spherical "
                                      "k-means on centred residual directions; euclidean: the "
                                      "pre-issue-12 sklearn k-means (collapses; for comparison)."),
    ) -> None:
        """Semantic IDs by residual k-means over item text (TwiSTAR 3, E.1, A.2; SCoTER A.1)."""
        from factory.cli import warehouse

        wh = warehouse()
        fields = [f.strip() for f in text_fields.split(",") if f.strip()]
        c = run_sids(wh, dataset, levels=levels, codebook_size=codebook_size, fields=fields,
                     encoder=encoder, seed=seed, method=quantiser, balanced=balanced,
                     collisions=collisions)
        if c["warning"]:
            console.print(f"[yellow]warning:[/yellow] {c['warning']}")
        rows: dict[str, Any] = {
            "items": c["items"],
            "texts encoded / from cache": f"{c['encoded']:,} / {c['cache_hits']:,}",
        }
        if c["duplicate_texts"]:
            rows["items whose text an earlier item has"] = c["duplicate_texts"]
        for st in c["level_stats"]:
            rows[f"level {st['level'] + 1}"] = (
                f"codes used {st['used']}/{st['of']}, largest code {st['largest_share']:.1%} "
                f"of items, perplexity {st['perplexity']:g} ({st['entropy_bits']:.2f} bits), "
                f"prefix shared by {st['prefix_collision_rate']:.1%}")
        rows["collision rate (full L codes)"] = (
            f"{c['collision_rate']:.2%} ({c['collisions']:,} items)")
        if collisions == "strict":
            rows["SID length"] = (f"{c['levels']} codes (strict; {c['moved_to_free_code']:,} "
                                  "items moved to the nearest free last-level code)")
        else:
            rows["SID length"] = f"{c['levels']} codes" + (
                " (with disambiguation level)" if c["levels"] > levels else "")
        if c["items_without_text"]:
            rows["items without text (embedded by id)"] = c["items_without_text"]
        with wh.read() as con:
            latest = con.execute("select run_id from i2i_latest where dataset = ?",
                                 [dataset]).fetchone()
            agree = sid_prefix_agreement(con, latest[0]) if latest else None
        if agree:
            rows["I2I pairs with same first / first two codes"] = (
                f"{agree[0]:.2%} / {agree[1]:.2%}")
        rows["seconds"] = f"{c['seconds']:g} (" + ", ".join(
            f"{k} {v:.1f}" for k, v in c["phase_seconds"].items()) + ")"
        rows["run"] = c["run_id"]
        summary(f"semantic IDs of {dataset}", rows,
                f"select item_id, sid from item_sids where dataset = '{dataset}' limit 10")
