"""The GVM phases over the warehouse: prune, validate, mine, evaluate (SCoTER Alg. 1).

The teacher engine stores the parsed answers (gvm_chains); each phase then reads what the
previous one wrote for a run and writes its own results in one short transaction, so
`factory sql` can watch a run and a phase can be re-run alone.
Embeddings come from an `Encode` function (the shared, cached embedding service): rows are
L2-normalised, so a dot product is a cosine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from factory.gvm.mine import (
    Choice,
    Clustering,
    ClusterStats,
    choose_pattern,
    cluster_paths,
    nearest_to_centroid,
    prune_near_duplicates,
    rate_clusters,
)
from factory.gvm.parse import Generation
from factory.gvm.sequences import Sequence as UserSequence
from factory.gvm.sequences import item_info, item_text
from factory.gvm.validate import score, top1
from factory.warehouse import Warehouse

Encode = Callable[[Sequence[str]], np.ndarray]
FREE = "free"  # the template column of chains from the open Fig. 9 prompt


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Append dicts to a table in one statement (columns by name)."""
    if not rows:
        return
    data = pa.Table.from_pylist(rows)
    con.register("_rows", data)
    try:
        cols = ", ".join(data.column_names)
        con.execute(f"insert into {table} ({cols}) select {cols} from _rows")
    finally:
        con.unregister("_rows")


def store_sequences(wh: Warehouse, run_id: str, dataset: str, split: str,
                    sequences: list[UserSequence]) -> None:
    with wh.write() as con:
        insert_rows(con, "gvm_sequences", [
            {"run_id": run_id, "dataset": dataset, "split": split, "user_id": s.user_id,
             "history": s.history, "target": s.target} for s in sequences])


def chain_columns(template: str, user_id: str, g: Generation | None) -> dict[str, Any]:
    """A chain's own columns (the teacher adds its provenance and ok/failed status)."""
    return {"template": template, "user_id": user_id,
            "cot_path": g.cot_path if g else None, "steps": g.steps if g else None,
            "reason_text": g.reason if g else None, "items": g.items if g else None,
            "warnings": g.warnings if g else None}


def prune_run(wh: Warehouse, run_id: str, encode: Encode, threshold: float,
              scope: str) -> dict[str, int]:
    """Mark near-duplicate paths 'pruned' (SCoTER gamma): scope 'global' across all the run's
    paths (Alg. 1 line 10, the default of `factory gvm`), 'user' among a user's samples."""
    with wh.read() as con:
        rows = con.execute(
            "select user_id, sample, cot_path from gvm_chains where run_id = ? and"
            " template = ? and status = 'ok' order by user_id, sample",
            [run_id, FREE]).fetchall()
    if not rows:
        return {"kept": 0, "pruned": 0}
    vectors = encode([r[2] for r in rows])
    groups = [r[0] for r in rows] if scope == "user" else [0] * len(rows)
    verdicts = prune_near_duplicates(vectors, groups, threshold)
    update = pa.Table.from_pylist([
        {"user_id": u, "sample": s, "pruned": not v.keep,
         "dup_user": None if v.keep else rows[v.duplicate_of][0],
         "dup_sample": None if v.keep else rows[v.duplicate_of][1],
         "dup_cos": v.cosine}
        for (u, s, _), v in zip(rows, verdicts, strict=True)],
        schema=pa.schema([("user_id", pa.string()), ("sample", pa.int32()),
                          ("pruned", pa.bool_()), ("dup_user", pa.string()),
                          ("dup_sample", pa.int32()), ("dup_cos", pa.float64())]))
    with wh.write() as con:
        con.register("_prune", update)
        con.execute(
            "update gvm_chains c set pruned = p.pruned, duplicate_user = p.dup_user,"
            " duplicate_sample = p.dup_sample, duplicate_cos = p.dup_cos from _prune p"
            " where c.run_id = ? and c.template = ? and c.user_id = p.user_id"
            " and c.sample = p.sample", [run_id, FREE])
        con.unregister("_prune")
    pruned = sum(not v.keep for v in verdicts)
    return {"kept": len(rows) - pruned, "pruned": pruned}


class Catalog:
    """A dataset's items for top-1 mapping, embedded on first use of `vectors`: Validate
    needs every item's vector once any description is to be mapped (the top-1 is over the
    whole catalogue), and none when nothing is (no answer parsed), so such a run never loads
    the encoder. Vectors come through the shared cache, so a catalogue that
    any earlier job embedded with the same encoder and item text is read, not encoded."""

    def __init__(self, wh: Warehouse, dataset: str, encode: Encode) -> None:
        self.wh, self.dataset, self.encode = wh, dataset, encode
        self._ids: list[str] | None = None
        self._texts: list[str] = []
        self._vectors: np.ndarray | None = None
        #: wall seconds spent getting the vectors (None: never asked for)
        self.seconds: float | None = None

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            with self.wh.read() as con:
                info = item_info(con, self.dataset)
            self._ids = sorted(info)
            self._texts = [item_text(info[i]) for i in self._ids]
        return self._ids

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:
            started = time.perf_counter()
            ids = self.ids
            self._vectors = self.encode(self._texts) if ids else np.zeros((0, 1), np.float32)
            self.seconds = time.perf_counter() - started
        return self._vectors


def catalog(wh: Warehouse, dataset: str, encode: Encode) -> tuple[list[str], np.ndarray]:
    """Item ids and their embeddings (title, categories, brand), embedded now (benches and
    test fixtures warm the cache with it; jobs pass a lazy `Catalog` to `validate_run`)."""
    cat = Catalog(wh, dataset, encode)
    return cat.ids, cat.vectors


def validate_run(wh: Warehouse, run_id: str, templates: list[str], encode: Encode,
                 catalogue: Catalog, k: int = 20) -> dict[str, int]:
    """Map every kept chain's descriptions to catalog items and score it on its user's
    validation target (from gvm_sequences; the test part is never read). The catalogue is
    embedded only when there is a description to map."""
    with wh.read() as con:
        chains = con.execute(
            "select c.template, c.user_id, c.sample, c.items, s.target"
            " from gvm_chains c join gvm_sequences s using (run_id, user_id)"
            " where c.run_id = ? and c.template in (select unnest(?)) and c.status = 'ok'"
            " and not c.pruned order by c.template, c.user_id, c.sample",
            [run_id, templates]).fetchall()
    texts = list(dict.fromkeys(d for row in chains for d in row[3]))
    if not texts:
        return {"chains": 0, "descriptions": 0, "hits": 0}
    index, cosine = top1(encode(texts), catalogue.vectors)
    where = {t: (catalogue.ids[i], float(c)) for t, i, c in zip(texts, index, cosine, strict=True)}
    recs, scores = [], []
    for template, user, sample, items, target in chains:
        mapped = [where[d][0] for d in items]
        s = score(mapped, target)
        scores.append({"template": template, "user_id": user, "sample": sample,
                       "hit_rank": s.hit_rank, "score": s.recall(k), "ndcg": s.ndcg(k)})
        recs.extend({"run_id": run_id, "template": template, "user_id": user,
                     "sample": sample, "rank": r, "description": d,
                     "item_id": where[d][0], "cosine": where[d][1]}
                    for r, d in enumerate(items, start=1))
    with wh.write() as con:
        con.execute("delete from gvm_recommendations where run_id = ? and"
                    " template in (select unnest(?))", [run_id, templates])
        insert_rows(con, "gvm_recommendations", recs)
        con.register("_scores", pa.Table.from_pylist(scores, schema=pa.schema([
            ("template", pa.string()), ("user_id", pa.string()), ("sample", pa.int32()),
            ("hit_rank", pa.int32()), ("score", pa.float64()), ("ndcg", pa.float64())])))
        con.execute("update gvm_chains c set hit_rank = s.hit_rank, score = s.score,"
                    " ndcg = s.ndcg from _scores s where c.run_id = ? and"
                    " c.template = s.template and c.user_id = s.user_id and"
                    " c.sample = s.sample", [run_id])
        con.unregister("_scores")
    return {"chains": len(chains), "descriptions": sum(len(r[3]) for r in chains),
            "distinct descriptions": len(texts), "hits": int(sum(s["score"] for s in scores))}


@dataclass(frozen=True)
class Mined:
    clustering: Clustering
    stats: list[ClusterStats]
    choice: Choice
    exemplars: list[str]  # of the chosen cluster, nearest the centroid first
    verdict: str  # the choice's verdict, prefixed by any clustering note


def mine_run(wh: Warehouse, run_id: str, dataset: str, encode: Encode, *, method: str,
             k_min: int, k_max: int, min_cluster_size: int, n_exemplars: int,
             seed: int) -> Mined:
    """Cluster the kept, scored paths, rate the clusters, choose P*, pick its exemplars."""
    with wh.read() as con:
        rows = con.execute(
            "select user_id, sample, cot_path, score from gvm_chains where run_id = ?"
            " and template = ? and status = 'ok' and not pruned and score is not null"
            " order by user_id, sample", [run_id, FREE]).fetchall()
    paths = [r[2] for r in rows]
    vectors = encode(paths) if rows else np.zeros((0, 1), dtype=np.float32)
    clustering = cluster_paths(vectors, method, k_min, k_max, min_cluster_size, seed)
    stats = rate_clusters(clustering.labels, np.array([r[3] for r in rows], dtype=float),
                          min_cluster_size)
    choice = choose_pattern(stats, min_cluster_size)
    exemplars_of = {
        s.cluster: [paths[i] for i in nearest_to_centroid(
            vectors, clustering.labels == s.cluster, paths, n_exemplars)]
        for s in stats}
    verdict = choice.verdict if clustering.note is None \
        else f"{clustering.note}; {choice.verdict}"
    with wh.write() as con:
        for table in ("gvm_clusters", "gvm_patterns"):
            con.execute(f"delete from {table} where run_id = ?", [run_id])
        insert_rows(con, "gvm_clusters", [
            {"run_id": run_id, "dataset": dataset, "cluster": s.cluster, "n": s.n,
             "hits": s.hits, "quality": s.quality, "ci_low": s.ci_low, "ci_high": s.ci_high,
             "eligible": s.eligible, "chosen": choice.best is not None
             and s.cluster == choice.best.cluster, "exemplars": exemplars_of[s.cluster]}
            for s in stats])
        if rows:
            con.register("_labels", pa.table({
                "user_id": [r[0] for r in rows],
                "sample": pa.array([r[1] for r in rows], pa.int32()),
                "cluster": pa.array(clustering.labels.tolist(), pa.int32())}))
            con.execute("update gvm_chains c set cluster = l.cluster from _labels l"
                        " where c.run_id = ? and c.template = ? and c.user_id = l.user_id"
                        " and c.sample = l.sample", [run_id, FREE])
            con.unregister("_labels")
        con.execute(
            "insert into gvm_patterns (run_id, dataset, method, k, silhouettes, n_paths,"
            " min_cluster_size, chosen_cluster, verdict) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, dataset, clustering.method, clustering.k,
             json.dumps({str(k): v for k, v in clustering.silhouettes.items()}), len(rows),
             min_cluster_size, choice.best.cluster if choice.best else None, verdict])
    best = choice.best
    return Mined(clustering, stats, choice, exemplars_of[best.cluster] if best else [], verdict)


def record_template(wh: Warehouse, run_id: str, dataset: str, steps: list[str] | None,
                    error: str | None, description: str) -> str | None:
    """Store the abstracted Optimal CoT Template, or why there is none, for a mined run."""
    from factory.templates import add_discovered

    with wh.write() as con:
        name = add_discovered(con, run_id, dataset, steps, description).name if steps else None
        con.execute("update gvm_patterns set template = ?, error = ? where run_id = ?",
                    [name, error, run_id])
    return name


@dataclass(frozen=True)
class Evaluation:
    template: str
    users: int  # sequences x samples asked
    answered: int
    recall: float
    ndcg: float
    ci_low: float
    ci_high: float


def evaluate_templates(wh: Warehouse, run_id: str, dataset: str,
                       templates: dict[str, tuple[list[str], str | None]],
                       samples: int) -> list[Evaluation]:
    """LLM-as-recommender quality per template (SCoTER Table 11): Recall@20 and NDCG@20 over
    every (user, sample) asked; an answer that failed to parse counts as a miss.

    `templates`: name -> (steps, dataset the template was mined on, if any).
    """
    from factory.gvm.mine import wilson

    evals = []
    with wh.write() as con:
        (n_users,) = con.execute("select count(*) from gvm_sequences where run_id = ?",
                                 [run_id]).fetchone()
        asked = n_users * samples
        con.execute("delete from gvm_evals where run_id = ?", [run_id])
        for name, (steps, source) in templates.items():
            answered, hits, ndcg = con.execute(
                "select count(*) filter (where status = 'ok'), coalesce(sum(score), 0),"
                " coalesce(sum(ndcg), 0) from gvm_chains where run_id = ? and template = ?",
                [run_id, name]).fetchone()
            lo, hi = wilson(int(hits), asked)
            e = Evaluation(name, asked, answered, hits / asked if asked else 0.0,
                           ndcg / asked if asked else 0.0, lo, hi)
            con.execute(
                "insert into gvm_evals (run_id, dataset, template, template_dataset, steps,"
                " users, answered, recall, ndcg, ci_low, ci_high)"
                " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, dataset, name, source, steps, e.users, e.answered, e.recall, e.ndcg,
                 e.ci_low, e.ci_high])
            evals.append(e)
    return evals
