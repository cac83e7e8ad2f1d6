"""TwiSTAR second-stage exports, built in DuckDB from the warehouse's candidates, hard samples
and planner labels (factory/twistar/stage2.py), written per part with a manifest:

- `export sft --kind twistar-ranker` (4.2): DIN rows for M_rank. Per sequence the positive
  (the target, inserted when M_fast missed it) and K1-1 negatives drawn, seeded, from M_fast's
  top K2 (never the target, never an item the user interacts with later in the split).
  train <- train-part candidates, valid (AUC for early stopping, 4.2) <- valid, test <- test.
- `export sft --kind twistar-planner` (4.4, App. B): chat rows, prompt = recent history and
  the question, answer = the label's tool-call JSON. Labels of the test part go to test; the
  others (the held-out parts of M_fast) to train, with a seeded share of users to valid.
- `export rl --kind twistar-slow` (4.3, E.1.3): M_slow's GRPO prompts, one per hard sample,
  with `prompt` in chat format and `reference_sid` as rewards.py reads it. train <- hard
  samples of the train part (the paper's "training sequences"), valid/test <- their parts.

Histories are the items the sequence may see (train rows: the train items before the last;
valid: train items; test: train and valid items), so no train row names a held-out target.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb

from factory.errors import FactoryError
from factory.twistar.stage2 import candidate_source, history_sql, unit_sql

PARTS = ("train", "valid", "test")
# 4.2 / E.1.2 give no history length for DIN or the planner; 20 as for M_fast's export
DEFAULT_HISTORY = 20


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _skeleton(name: str, markers: tuple[str, ...], **constants: Any) -> str:
    """A prompt's user text with `\\x00name\\x00` where each marker goes (filled in SQL)."""
    from factory.prompts import load_prompt

    messages = load_prompt(name).render(**constants, **{m: f"\x00{m}\x00" for m in markers})
    return "\n\n".join(m["content"] for m in messages)


# -- M_rank (4.2) ----------------------------------------------------------------------------
def ranker_table(con: duckdb.DuckDBPyConnection, dataset: str, *, k1: int, k2: int,
                 seed: int, history: int, source: str | None = None,
                 table: str = "_twistar_ranker") -> dict[str, Any]:
    """Every ranker row into temp table `table` (the export's columns plus `_order`)."""
    src = candidate_source(con, dataset, source)
    if not 2 <= k1 <= k2 <= src["k"]:
        raise FactoryError(f"--k1 {k1} --k2 {k2}: need 2 <= K1 <= K2 <= the candidates' K "
                           f"({src['k']}): one positive and K1-1 negatives from the top K2")
    d, s = _lit(dataset), _lit(src["split"])
    rows = (f"select part, user_id, target_position, target_item_id, item_ids, hit_rank"
            f" from twistar_candidates where dataset = {d} and source_kind = "
            f"{_lit(src['source_kind'])}")
    pick = unit_sql(seed, "'negative'", "c.part", "c.user_id", "u.item")
    con.execute(f"""create or replace temp table {table} as
        with c as ({rows}),
        later as (    -- items the user interacts with after the target: never a negative
            select c.part, c.user_id, i.item_id from c join split_interactions i
              on i.dataset = {d} and i.split = {s} and i.user_id = c.user_id
             and i.position > c.target_position),
        neg as (
            select c.part, c.user_id, u.item as item_id, u.rank::integer as fast_rank
            from c, unnest(c.item_ids[1:{k2}]) with ordinality as u(item, rank)
            where u.item <> c.target_item_id
              and not exists (select 1 from later l where l.part = c.part
                              and l.user_id = c.user_id and l.item_id = u.item)
            qualify row_number() over (partition by c.part, c.user_id
                                       order by {pick}, u.item) <= {k1 - 1}),
        cand as (
            select part, user_id, target_item_id as item_id, 1 as label,
                   case when hit_rank <= {k2} then hit_rank end as fast_rank from c
            union all
            select part, user_id, item_id, 0, fast_rank from neg),
        hist as ({history_sql(dataset, src['split'], rows, history)})
        select x.part, x.user_id, coalesce(h.history, []::varchar[]) as history,
               x.item_id, x.label, x.fast_rank::integer as fast_rank,
               coalesce(c.hit_rank <= {k2}, false) as retrieved,
               {unit_sql(seed, "'order'", "x.part", "x.user_id", "x.item_id")} as _order
        from cand x join c using (part, user_id)
        left join hist h using (part, user_id)""")
    short = con.execute(f"select count(*) from (select part, user_id from {table}"
                        f" group by all having count(*) < {k1})").fetchone()[0]
    return {"candidates": src, "k1": k1, "k2": k2, "history": history,
            "sequences_with_fewer_than_k1": short,
            "rows": "one positive (label 1) and K1-1 negatives (label 0) per sequence; "
                    "fast_rank: the item's rank in M_fast's list (null: positive inserted)"}


# -- planner (4.4) -----------------------------------------------------------------------------
def planner_table(con: duckdb.DuckDBPyConnection, dataset: str, *, history: int, seed: int,
                  holdout: float, noun: str | None = None,
                  table: str = "_twistar_planner") -> dict[str, Any]:
    """Every planner SFT row into temp table `table` (sft's Parquet columns + `_order`)."""
    from factory.exports.sft import TWISTAR_PLANNER_KIND
    from factory.itemtext import item_noun, plural

    meta = con.execute(
        "select any_value(l.source_kind), any_value(l.trained_on), any_value(l.k1),"
        " any_value(l.k2), any_value(l.seed), any_value(l.run_id), count(*)"
        " from twistar_planner_labels l where l.dataset = ?", [dataset]).fetchone()
    if not meta[-1]:
        raise FactoryError(f"no planner labels for {dataset!r}: run `factory twistar "
                           f"planner-labels --dataset {dataset}` first")
    kind, trained_on, k1, k2, label_seed, label_run, _ = meta
    src = candidate_source(con, dataset, kind)
    noun = noun or item_noun(con, dataset)
    skeleton = _skeleton("twistar_planner", ("history",), noun=noun, nouns=plural(noun))
    rows = ("select part, user_id, target_position from twistar_planner_labels"
            f" where dataset = {_lit(dataset)}")
    d = _lit(dataset)
    hold = unit_sql(seed, "'holdout'", "l.user_id")
    con.execute(f"""create or replace temp table {table} as
        with hist as (
            select h.part, h.user_id, string_agg('- ' || coalesce(i.title, u.item)
                       || coalesce(' (' || nullif(array_to_string(i.categories, ', '), '')
                       || ')', ''), chr(10) order by u.k) as text
            from ({history_sql(dataset, src['split'], rows, history)}) h,
                 unnest(h.history) with ordinality as u(item, k)
            left join items i on i.dataset = {d} and i.item_id = u.item
            group by all)
        select [{{'role': 'user', 'content': replace($skel, chr(0) || 'history' || chr(0),
                                                     coalesce(hist.text, '(none)'))}},
                {{'role': 'assistant', 'content': l.label}}] as messages,
               case when l.part = 'test' then 'test' when {hold} < $holdout then 'valid'
                    else 'train' end as part,
               '{TWISTAR_PLANNER_KIND}' as kind, l.target_item_id as item_id,
               null::varchar as other_item_id, l.user_id, l.target_position::integer
               as position, l.path::integer as sample_index, l.flipped as label,
               l.run_id, l.original_path::integer as group_id,
               {unit_sql(seed, "'order'", "l.part", "l.user_id")} as _order
        from twistar_planner_labels l left join hist using (part, user_id)
        where l.dataset = {d}""", {"skel": skeleton, "holdout": holdout})
    return {"labels_run": label_run, "candidates": src, "trained_on": trained_on,
            "k1": k1, "k2": k2, "label_seed": label_seed, "history": history, "noun": noun,
            "holdout": holdout,
            "parts": "test <- test-part labels; the other labels (parts M_fast did not train "
                     "on) -> train, a seeded share of users -> valid",
            "columns": "sample_index = path (1/2/3), label = flipped, group_id = original "
                       "path",
            "prompt": "titles and categories of the recent history (prompts/twistar_planner)"}


# -- M_slow's GRPO prompts (4.3, E.1.3) --------------------------------------------------------
def slow_table(con: duckdb.DuckDBPyConnection, dataset: str, *, history: int, seed: int,
               noun: str | None = None, table: str = "_twistar_slow") -> dict[str, Any]:
    """One GRPO prompt per hard sample into temp table `table` (columns + `_order`)."""
    from factory.exports.cache import resolve_sids_run
    from factory.itemtext import item_noun, plural

    meta = con.execute("select any_value(source_kind), any_value(k2), any_value(run_id),"
                       " count(*) from twistar_hard_samples where dataset = ?",
                       [dataset]).fetchone()
    if not meta[-1]:
        raise FactoryError(f"no hard samples for {dataset!r}: run `factory twistar "
                           f"hard-samples --dataset {dataset}` first")
    kind, k2, hard_run, _ = meta
    src = candidate_source(con, dataset, kind)
    sids_run = resolve_sids_run(con, dataset, None)
    d = _lit(dataset)
    rows = ("select part, user_id, target_position, target_item_id from twistar_hard_samples"
            f" where dataset = {d}")
    con.execute(f"""create or replace temp table _slow_hist as
        select h.part, h.user_id, u.item, u.k from
            ({history_sql(dataset, src['split'], rows, history)}) h,
            unnest(h.history) with ordinality as u(item, k)""")
    missing = con.execute(
        f"""select count(distinct item), min(item) from (
                select item from _slow_hist union all select target_item_id from ({rows}))
            where item not in (select item_id from item_sids_all
                               where dataset = {d} and run_id = ?)""", [sids_run]).fetchone()
    if missing[0]:
        raise FactoryError(f"sids run {sids_run} has no SID for {missing[0]:,} items of the "
                           f"hard samples (e.g. {missing[1]!r}); re-run `factory sids "
                           f"--dataset {dataset}`")
    levels = con.execute("select max(len(codes)) from item_sids_all where dataset = ? and"
                         " run_id = ?", [dataset, sids_run]).fetchone()[0]
    sid_format = ("<|sid_begin|>" + "".join(f"<s_{chr(97 + k)}_#>" for k in range(levels))
                  + "<|sid_end|>")
    noun = noun or item_noun(con, dataset)
    skeleton = _skeleton("twistar_slow_recommend", ("history",), noun=noun,
                         nouns=plural(noun), sid_format=sid_format)
    con.execute(f"""create or replace temp table {table} as
        with sid as (select item_id, sid from item_sids_all where dataset = {d}
                     and run_id = $run),
        hist as (
            select h.part, h.user_id, string_agg(s.sid || coalesce(' ' || i.title, ''),
                                                 chr(10) order by h.k) as text
            from _slow_hist h join sid s on s.item_id = h.item
            left join items i on i.dataset = {d} and i.item_id = h.item
            group by all)
        select [{{'role': 'user', 'content': replace($skel, chr(0) || 'history' || chr(0),
                                                     coalesce(hist.text, '(none)'))}}]
                   as prompt,
               t.sid as reference_sid, x.part, x.user_id, x.target_item_id,
               x.target_position::integer as target_position, x.hit_rank::integer
                   as hit_rank,
               {unit_sql(seed, "'order'", "x.part", "x.user_id")} as _order
        from twistar_hard_samples x join sid t on t.item_id = x.target_item_id
        left join hist using (part, user_id)
        where x.dataset = {d}""", {"run": sids_run, "skel": skeleton})
    con.execute("drop table _slow_hist")
    return {"hard_samples_run": hard_run, "k2": k2, "candidates": src, "sids_run": sids_run,
            "sid_levels": levels, "history": history, "noun": noun,
            "prompt": "SID then title per history item, oldest first "
                      "(prompts/twistar_slow_recommend; TwiSTAR 4.3, App. A)",
            "reward": "factory.twistar.rewards.slow_reward reads the column reference_sid"}


# -- writing -----------------------------------------------------------------------------------
def write_rows(con: duckdb.DuckDBPyConnection, table: str, paths: dict[str, Path],
               fmt: str) -> dict[str, int]:
    """Each part of `table` (without `_order`, in `_order`) to its file: Parquet, or JSON
    lines of the same columns; atomically (temporary name, then rename)."""
    counts = {}
    for part, path in paths.items():
        rows = (f"select * exclude (_order) from {table} where part = '{part}'"
                " order by _order")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        target = str(tmp).replace("'", "''")
        con.execute(f"copy ({rows}) to '{target}' (format "
                    f"{'parquet' if fmt == 'parquet' else 'json'})")
        os.replace(tmp, path)
        counts[part] = con.execute(f"select count(*) from {table} where part = '{part}'"
                                   ).fetchone()[0]
    return counts


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


RL_KINDS = ("twistar-slow",)
RL_FORMATS = ("parquet", "jsonl")


def export_rl(wh: Any, dataset: str, kind: str, out: Path, *, fmt: str = "parquet",
              history: int = DEFAULT_HISTORY, seed: int = 0,
              noun: str | None = None) -> tuple[list[Path], dict[str, int], dict[str, Any]]:
    """M_slow's GRPO prompt set, recorded as an `export-rl` job run."""
    from factory.exports.sft import manifest_path
    from factory.runs import finish_run, start_run
    from factory.warehouse import require_dataset

    if kind not in RL_KINDS:
        raise FactoryError(f"--kind {kind!r}: expected one of {', '.join(RL_KINDS)}")
    if fmt not in RL_FORMATS:
        raise FactoryError(f"--format {fmt!r}: expected parquet or jsonl")
    if history < 1:
        raise FactoryError("--history must be at least 1")
    params = {"kind": kind, "out": str(out), "format": fmt, "history": history,
              "seed": seed, "noun": noun}
    with wh.write() as con:
        require_dataset(con, dataset)
        run_id = start_run(con, "export-rl", dataset, params)
    try:
        with wh.read() as con:
            notes = slow_table(con, dataset, history=history, seed=seed, noun=noun)
            stem = out.name[:-len(out.suffix)] if out.suffix in (".jsonl", ".parquet") \
                else out.name
            ext = ".parquet" if fmt == "parquet" else ".jsonl"
            paths = {p: out.with_name(f"{stem}.{p}{ext}") for p in PARTS}
            counts = write_rows(con, "_twistar_slow", paths, fmt)
        mpath = manifest_path(out)
        write_manifest(mpath, {"dataset": dataset, "run_id": run_id, "params": params,
                               "counts": counts, "notes": notes,
                               "files": [p.name for p in paths.values()]})
        with wh.write() as con:
            finish_run(con, run_id, "succeeded", {"counts": counts})
    except BaseException as exc:
        with wh.write() as con:
            finish_run(con, run_id, "interrupted" if isinstance(exc, KeyboardInterrupt)
                       else "failed", error=str(exc) or type(exc).__name__)
        raise
    return [*paths.values(), mpath], counts, {**notes, "run_id": run_id}
