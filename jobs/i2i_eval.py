"""`factory i2i-eval`: the 10-candidate discriminative I2I set of TwiSTAR 6.3.

For every I2I pair (i, j) of a mining run: j plus `distractors` items drawn at random from the
dataset's catalog (never i, never j, no repeats), shuffled, with the answer's position. A
model is shown i and the candidates and must pick j. Seeded, so a re-run with the same
parameters builds the same set (and replaces the earlier copy); `--out` writes JSON lines
with titles and, when the dataset has SIDs, the SIDs of i and of each candidate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import typer

from factory.console import summary
from factory.errors import FactoryError
from factory.runs import finish_run, start_run
from factory.warehouse import Warehouse, require_dataset


def draw_candidates(
    pairs_i: np.ndarray, pairs_j: np.ndarray, n_items: int, distractors: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(candidates (n, distractors + 1) as catalog indices, answer positions (n,)).

    Draws every row at once and redraws only the rows with a repeat or a forbidden item, so
    millions of pairs take seconds."""
    rng = np.random.default_rng(seed)
    n = len(pairs_i)
    neg = np.empty((n, distractors), dtype=np.int64)
    bad = np.arange(n)
    while len(bad):
        neg[bad] = rng.integers(0, n_items, size=(len(bad), distractors))
        rows = neg[bad]
        srt = np.sort(rows, axis=1)
        repeat = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        forbidden = ((rows == pairs_i[bad, None]) | (rows == pairs_j[bad, None])).any(axis=1)
        bad = bad[repeat | forbidden]
    answer = rng.integers(0, distractors + 1, size=n)
    cands = np.empty((n, distractors + 1), dtype=np.int64)
    cols = np.arange(distractors + 1)
    for r in range(distractors + 1):
        at = answer == r
        others = [c for c in cols if c != r]
        cands[at, r] = pairs_j[at]
        cands[np.ix_(at, others)] = neg[at]
    return cands, answer


def run_eval(wh: Warehouse, dataset: str, *, distractors: int = 9, seed: int = 0,
             i2i_run: str | None = None, max_pairs: int | None = None) -> dict[str, Any]:
    """Build and store the candidate sets; returns counts with the eval run id."""
    if distractors < 1:
        raise FactoryError("--distractors must be at least 1")
    with wh.read() as con:
        require_dataset(con, dataset)
        if i2i_run is None:
            row = con.execute("select run_id from i2i_latest where dataset = ?",
                              [dataset]).fetchone()
            if row is None:
                raise FactoryError(f"no I2I pairs for {dataset!r}: run "
                                   f"`factory mine-i2i --dataset {dataset}` first")
            i2i_run = row[0]
        elif not con.execute("select 1 from i2i_runs where run_id = ? and dataset = ?",
                             [i2i_run, dataset]).fetchone():
            raise FactoryError(f"no finished I2I run {i2i_run!r} for {dataset!r}")
        catalog = [r for (r,) in con.execute(
            "select item_id from items where dataset = ? order by item_id", [dataset]
        ).fetchall()]
        pairs = con.execute(
            "select item_i, item_j from i2i_pairs_all where run_id = ?"
            " order by item_i, item_j", [i2i_run]
        ).fetchall()
    if len(catalog) < distractors + 2:
        raise FactoryError(f"{dataset!r} has {len(catalog)} items; {distractors} distractors "
                           f"need at least {distractors + 2}")
    if max_pairs and len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_pairs,
                                                          replace=False))
        pairs = [pairs[k] for k in keep]
    index = {item: k for k, item in enumerate(catalog)}
    pi = np.array([index[i] for i, _ in pairs], dtype=np.int64)
    pj = np.array([index[j] for _, j in pairs], dtype=np.int64)
    cands, answer = draw_candidates(pi, pj, len(catalog), distractors, seed)
    names = np.array(catalog, dtype=object)
    params = {"i2i_run": i2i_run, "distractors": distractors, "seed": seed,
              "max_pairs": max_pairs}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    table = pa.table({
        "item_i": [i for i, _ in pairs],
        "item_j": [j for _, j in pairs],
        "candidates": pa.array(names[cands].tolist(), pa.list_(pa.string())),
        "answer_index": pa.array(answer, pa.int32()),
    })
    with wh.write() as con:
        run_id = start_run(con, "i2i-eval", dataset, {**params, "params_hash": digest})
        old = [r for (r,) in con.execute(
            "select run_id from job_runs where job = 'i2i-eval' and dataset = ?"
            " and params->>'params_hash' = ? and run_id <> ?", [dataset, digest, run_id]
        ).fetchall()]
        for r in old:
            con.execute("delete from i2i_eval_sets where run_id = ?", [r])
        con.register("_sets", table)
        con.execute(
            "insert into i2i_eval_sets select ?, ?, ?, item_i, item_j, candidates,"
            " answer_index, ? from _sets", [dataset, run_id, i2i_run, seed],
        )
        counts = {"run_id": run_id, "i2i_run": i2i_run, "sets": len(pairs),
                  "catalog": len(catalog), "replaced_runs": old}
        finish_run(con, run_id, "succeeded", counts)
    return counts


def export_jsonl(wh: Warehouse, run_id: str, out: Path) -> int:
    """Write the run's sets as JSON lines with titles and (when present) SIDs."""
    with wh.read() as con:
        dataset = con.execute("select dataset from job_runs where run_id = ?",
                              [run_id]).fetchone()[0]
        titles = dict(con.execute("select item_id, title from items where dataset = ?",
                                  [dataset]).fetchall())
        sids = dict(con.execute("select item_id, sid from item_sids where dataset = ?",
                                [dataset]).fetchall())
        rows = con.execute(
            "select item_i, item_j, candidates, answer_index from i2i_eval_sets"
            " where run_id = ? order by item_i, item_j", [run_id]
        ).fetchall()
    with open(out, "w", encoding="utf-8") as fh:
        for i, j, cands, answer in rows:
            rec: dict[str, Any] = {
                "dataset": dataset, "item_i": i, "title_i": titles.get(i), "item_j": j,
                "candidates": cands, "candidate_titles": [titles.get(c) for c in cands],
                "answer_index": answer,
            }
            if sids:
                rec["sid_i"] = sids.get(i)
                rec["candidate_sids"] = [sids.get(c) for c in cands]
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(rows)


def register(app: typer.Typer) -> None:
    @app.command("i2i-eval")
    def i2i_eval_cmd(
        dataset: str = typer.Option(..., "--dataset"),
        distractors: int = typer.Option(9, "--distractors", help="Random distractors per "
                                        "pair (TwiSTAR 6.3: 9, so 10 candidates)."),
        seed: int = typer.Option(0, "--seed"),
        i2i_run: str = typer.Option(None, "--i2i-run", help="Mining run [default: the "
                                    "dataset's latest]."),
        max_pairs: int = typer.Option(None, "--max-pairs", help="Seeded sample of pairs "
                                      "[default: all]."),
        out: Path = typer.Option(None, "--out", help="Also write the sets as JSON lines."),
    ) -> None:
        """Build the 10-candidate I2I discrimination set (TwiSTAR 6.3)."""
        from factory.cli import warehouse

        wh = warehouse()
        c = run_eval(wh, dataset, distractors=distractors, seed=seed, i2i_run=i2i_run,
                     max_pairs=max_pairs)
        rows: dict[str, Any] = {"candidate sets": c["sets"],
                                "candidates per set": distractors + 1,
                                "catalog items": c["catalog"], "from I2I run": c["i2i_run"]}
        if out:
            rows["written"] = f"{export_jsonl(wh, c['run_id'], out):,} lines to {out}"
        rows["run"] = c["run_id"]
        summary(f"I2I evaluation set of {dataset}", rows,
                f"select * from i2i_eval_sets where run_id = '{c['run_id']}' limit 5")
