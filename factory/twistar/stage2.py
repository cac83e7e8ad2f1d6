"""TwiSTAR's second stage as warehouse data (4.2-4.4, App. B, E.1.3-E.1.4): M_fast's top-K
candidates per sequence, the hard samples M_slow trains on, and the planner's pseudo-labels.

Everything is set-based SQL on the warehouse connection; Python only checks arguments and
formats one-line errors. Seeded choices use `unit_sql`, a hash of (seed, key) in [0, 1), so
the same warehouse and seed give the same rows on every machine.

Candidates come from a `factory train --predict` run (its model trained on the split's train
part) or from a user's file of the same columns (`--trained-on` says what its model saw).
A sequence of the split is one (part, user) row of a leave-one-out split, as in the training
caches: train = (train items but the last -> the last train item), valid = (train items ->
the valid item), test = (train + valid items -> the test item).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from factory.errors import FactoryError
from factory.twistar.rewards import valid_tool_sequence
from train.format import sha256_file

PARTS = ("train", "valid", "test")
SOURCE_KINDS = ("train", "file")
TRAINED_ON = ("train", "none")
# E.1.2 / 5: M_fast's beam width is 50; E.1.3: hard = not in the top 50
DEFAULT_K2 = 50
DEFAULT_K1 = 10          # 4.4 gives no K1; 10 is the cut-off every reported metric uses (R/N@10)
DEFAULT_FLIP = 0.2       # App. B, Alg. 1 line 6: "With 20% probability, flip path 1 to 2 or 3"


def unit_sql(seed: int, *keys: str) -> str:
    """SQL for a stable number in [0, 1) from the seed and the key columns (md5, 48 bits)."""
    cols = ", ".join(["'" + str(int(seed)) + "'", *keys])
    return f"(('0x' || left(md5(concat_ws(chr(31), {cols})), 12))::bigint / 281474976710656.0)"


def _q(path: Path | str) -> str:
    return str(path).replace("'", "''")


# -- the split's sequences -------------------------------------------------------------------
def targets_sql(dataset: str, split: str) -> str:
    """One row per (part, user): the target's position and item (a cache row's target)."""
    d, s = dataset.replace("'", "''"), split.replace("'", "''")
    return f"""
        select i.part, i.user_id, i.position as target_position, i.item_id as target_item_id
        from split_interactions i
        where i.dataset = '{d}' and i.split = '{s}'
        qualify row_number() over (partition by i.part, i.user_id order by
            case when i.part = 'train' then -i.position else i.position end) = 1"""


def history_sql(dataset: str, split: str, rows: str, n: int) -> str:
    """Per row of `rows` (part, user_id, target_position): the last `n` items before the
    target that the part may see (train and valid rows: train items; test rows: train and
    valid items), oldest first, as `history` (item ids) and their positions."""
    d, s = dataset.replace("'", "''"), split.replace("'", "''")
    return f"""
        select part, user_id, list(item_id order by position) as history from (
            select r.part, r.user_id, h.item_id, h.position
            from ({rows}) r join split_interactions h
              on h.dataset = '{d}' and h.split = '{s}' and h.user_id = r.user_id
             and h.position < r.target_position
             and (h.part = 'train' or (r.part = 'test' and h.part = 'valid'))
            qualify row_number() over (partition by r.part, r.user_id
                                       order by h.position desc) <= {int(n)})
        group by part, user_id"""


# -- candidates --------------------------------------------------------------------------------
def candidate_source(con: duckdb.DuckDBPyConnection, dataset: str,
                     source: str | None) -> dict[str, Any]:
    """The candidate set a later step reads: `source` (train | file), else the newest."""
    if source is not None and source not in SOURCE_KINDS:
        raise FactoryError(f"--source {source!r}: expected train or file")
    row = con.execute(
        "select source_kind, source, split, model, trained_on, k, run_id, sha256"
        " from twistar_candidate_sets where dataset = ? and (? is null or source_kind = ?)"
        " order by created_at desc limit 1", [dataset, source, source]).fetchone()
    if row is None:
        which = f" from --source {source}" if source else ""
        raise FactoryError(f"no TwiSTAR candidates{which} for {dataset!r}: run `factory "
                           f"twistar candidates --dataset {dataset} --from-train RUN` (or "
                           "--from-file) first")
    keys = ("source_kind", "source", "split", "model", "trained_on", "k", "run_id", "sha256")
    return dict(zip(keys, row, strict=True))


def resolve_train_candidates(con: duckdb.DuckDBPyConnection, dataset: str,
                             run: str) -> dict[str, Any]:
    """The candidates file of a `factory train --predict` run, its split, model and K."""
    from factory.runs import resolve_run

    run_id = resolve_run(con, "train", dataset, run, option="--from-train",
                         first=f"factory train --dataset {dataset} --backbone tiger "
                               "--protocol masked --beam 50 --predict --top-k 50")
    row = con.execute("select split, backbone, fusion, out_dir, status, params"
                      " from train_runs where run_id = ?", [run_id]).fetchone()
    if row is None:
        raise FactoryError(f"{run_id} is not a `factory train` run")
    split, backbone, fusion, out_dir, status, params = row
    if status != "succeeded":
        raise FactoryError(f"train run {run_id} {status}: it wrote no candidates to trust")
    metrics = Path(out_dir or "") / "metrics.json"
    if not metrics.is_file():
        raise FactoryError(f"train run {run_id}: no {metrics} (was its output moved?)")
    path = json.loads(metrics.read_text(encoding="utf-8")).get("candidates")
    if not path:
        raise FactoryError(f"train run {run_id} ran without --predict: no candidates; run "
                           f"`factory train --dataset {dataset} ... --predict --top-k 50`")
    if not Path(path).is_file():
        raise FactoryError(f"train run {run_id}: its candidates file {path} is gone")
    top_k = json.loads(params or "{}").get("top_k")
    return {"source": run_id, "path": Path(path), "split": split,
            "model": backbone + ("" if fusion in (None, "none") else f"+{fusion}"),
            "trained_on": "train", "k": top_k}


def import_candidates(con: duckdb.DuckDBPyConnection, dataset: str, *, source_kind: str,
                      source: str, path: Path, split: str, model: str | None,
                      trained_on: str, k: int | None, run_id: str) -> dict[str, Any]:
    """Validate the Parquet file at `path` against the dataset and its split, then replace
    the dataset's candidates of `source_kind` with it. Call inside one write transaction:
    a bad file raises a one-line FactoryError naming its first bad row, and nothing is
    stored. Returns the set's summary (K, rows and recall per part)."""
    if trained_on not in TRAINED_ON:
        raise FactoryError(f"--trained-on {trained_on!r}: expected train or none")
    name = path.name
    try:
        cols = {r[0] for r in con.execute(
            f"describe select * from read_parquet('{_q(path)}')").fetchall()}
    except duckdb.Error as exc:
        raise FactoryError(f"{name}: not a readable Parquet file "
                           f"({str(exc).splitlines()[0]})") from None
    need = ("part", "user_id", "target_item_id", "item_ids")
    missing = [c for c in need if c not in cols]
    if missing:
        raise FactoryError(f"{name}: no column {missing[0]!r} (expected part, user_id, "
                           "target_item_id, item_ids best first[, scores])")
    scores = "scores::float[]" if "scores" in cols else "null::float[]"
    con.execute(f"""create or replace temp table _cands as
        select file_row_number + 1 as file_row, part::varchar as part,
               user_id::varchar as user_id, target_item_id::varchar as target_item_id,
               item_ids::varchar[] as item_ids, {scores} as scores
        from read_parquet('{_q(path)}', file_row_number = true)""")
    n = con.execute("select count(*) from _cands").fetchone()[0]
    if not n:
        raise FactoryError(f"{name}: no rows")

    def first(sql: str) -> tuple | None:
        return con.execute(sql + " order by file_row limit 1").fetchone()

    def at(row: tuple) -> str:
        return f"{name} row {row[0]:,}"

    bad = first("select file_row, part from _cands where part is null"
                " or part not in ('train', 'valid', 'test')")
    if bad:
        raise FactoryError(f"{at(bad)}: part {bad[1]!r} is not train, valid or test")
    bad = first("select file_row, part, user_id from _cands where user_id is null or"
                " target_item_id is null or item_ids is null")
    if bad:
        raise FactoryError(f"{at(bad)}: user_id, target_item_id and item_ids must not be null")
    bad = first("select file_row, part, user_id from _cands qualify row_number() over ("
                "partition by part, user_id order by file_row) > 1")
    if bad:
        raise FactoryError(f"{at(bad)}: a second row for part {bad[1]}, user {bad[2]!r} "
                           "(one row per sequence)")
    con.execute(f"create or replace temp table _targets as {targets_sql(dataset, split)}")
    bad = first("select c.file_row, c.part, c.user_id, c.target_item_id, t.target_item_id"
                " from _cands c left join _targets t using (part, user_id)"
                " where t.target_item_id is distinct from c.target_item_id")
    if bad:
        want = (f"its {bad[1]} target in split {split!r} is {bad[4]!r}" if bad[4] else
                f"split {split!r} has no {bad[1]} item for that user")
        raise FactoryError(f"{at(bad)}: user {bad[2]!r}, target_item_id {bad[3]!r}: {want}")
    bad = first(f"""select c.file_row, u.item, u.rank from _cands c,
            unnest(c.item_ids) with ordinality as u(item, rank)
        where u.item is null or not exists (select 1 from items i
            where i.dataset = '{dataset.replace("'", "''")}' and i.item_id = u.item)""")
    if bad:
        raise FactoryError(f"{at(bad)}: item {bad[1]!r} (rank {bad[2]}) is not in "
                           f"{dataset}'s catalogue")
    bad = first("select file_row from _cands where len(list_distinct(item_ids))"
                " < len(item_ids)")
    if bad:
        raise FactoryError(f"{at(bad)}: an item appears twice in item_ids")
    bad = first("select file_row, len(scores), len(item_ids) from _cands"
                " where scores is not null and len(scores) <> len(item_ids)")
    if bad:
        raise FactoryError(f"{at(bad)}: {bad[1]} scores for {bad[2]} items")
    longest = con.execute("select max(len(item_ids)) from _cands").fetchone()[0]
    k = int(k or longest)
    if k < 1:
        raise FactoryError(f"{name}: every item_ids list is empty")
    bad = first(f"select file_row, len(item_ids) from _cands where len(item_ids) > {k}")
    if bad:
        raise FactoryError(f"{at(bad)}: {bad[1]} items, more than K = {k}")
    short, = con.execute(f"select count(*) from _cands where len(item_ids) < {k}").fetchone()
    if short:
        bad = first(f"select file_row, len(item_ids) from _cands where len(item_ids) < {k}")
        raise FactoryError(f"{name}: {short:,} of {n:,} rows have fewer than K = {k} items "
                           f"(first: row {bad[0]:,}, {bad[1]} items); every list needs K")
    # what was derived from the replaced candidates goes with them, in the same transaction:
    # hard samples or labels of one model must never be exported under another's name
    dropped = {}
    for table in ("twistar_hard_samples", "twistar_planner_labels"):
        dropped[table] = con.execute(f"select count(*) from {table} where dataset = ? and"
                                     " source_kind = ?", [dataset, source_kind]).fetchone()[0]
        con.execute(f"delete from {table} where dataset = ? and source_kind = ?",
                    [dataset, source_kind])
    con.execute("delete from twistar_candidates where dataset = ? and source_kind = ?",
                [dataset, source_kind])
    con.execute("delete from twistar_candidate_sets where dataset = ? and source_kind = ?",
                [dataset, source_kind])
    con.execute("""insert into twistar_candidates
        select $dataset, $kind, c.part, c.user_id, t.target_position, c.target_item_id,
               c.item_ids, c.scores, list_position(c.item_ids, c.target_item_id)
        from _cands c join _targets t using (part, user_id)""",
                {"dataset": dataset, "kind": source_kind})
    rows = dict(con.execute("select part, count(*) from _cands group by 1 order by 1")
                .fetchall())
    con.execute("insert into twistar_candidate_sets (dataset, source_kind, source, path,"
                " sha256, split, model, trained_on, k, rows, run_id)"
                " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [dataset, source_kind, source, str(path.resolve()), sha256_file(path), split,
                 model, trained_on, k, json.dumps(rows), run_id])
    # a file may rank only some sequences (one part, a sample of users): said, not refused
    sequences = dict(con.execute("select part, count(*) from _targets group by 1").fetchall())
    con.execute("drop table _cands")
    return {"k": k, "rows": rows, "recall": recall_by_part(con, dataset, source_kind),
            "dropped": dropped, "sequences": sequences}


def recall_by_part(con: duckdb.DuckDBPyConnection, dataset: str,
                   source_kind: str) -> dict[str, dict[str, float]]:
    """Recall@10 and @50 (@K when K < 50: null) per part: the share of targets retrieved."""
    out: dict[str, dict[str, float]] = {}
    for part, n, r10, r50, k in con.execute(
            "select c.part, count(*), avg(coalesce(hit_rank <= 10, false)::int),"
            " avg(coalesce(hit_rank <= 50, false)::int),"
            " min(s.k) from twistar_candidates c join twistar_candidate_sets s"
            "  using (dataset, source_kind) where dataset = ? and source_kind = ?"
            " group by 1 order by 1", [dataset, source_kind]).fetchall():
        out[part] = {"rows": int(n), "recall@10": r10 if k >= 10 else None,
                     "recall@50": r50 if k >= 50 else None}
    return out


# -- hard samples (4.3, E.1.3) ---------------------------------------------------------------
def store_hard_samples(con: duckdb.DuckDBPyConnection, dataset: str, src: dict[str, Any],
                       k2: int, run_id: str) -> dict[str, dict[str, Any]]:
    """Replace the dataset's hard samples: sequences whose target is not in the top `k2`.
    Returns per part: sequences, hard, share."""
    if not 1 <= k2 <= src["k"]:
        raise FactoryError(f"--k2 {k2}: must be between 1 and the candidates' K ({src['k']})")
    con.execute("delete from twistar_hard_samples where dataset = ?", [dataset])
    con.execute("""insert into twistar_hard_samples
        select dataset, source_kind, $k2, part, user_id, target_position, target_item_id,
               hit_rank, $run from twistar_candidates
        where dataset = $dataset and source_kind = $kind
          and (hit_rank is null or hit_rank > $k2)""",
                {"dataset": dataset, "kind": src["source_kind"], "k2": k2, "run": run_id})
    return {part: {"sequences": int(n), "hard": int(h), "share": h / n if n else None}
            for part, n, h in con.execute(
                "select c.part, count(*), count(h.user_id) from twistar_candidates c"
                " left join twistar_hard_samples h using (dataset, part, user_id)"
                " where c.dataset = ? and c.source_kind = ? group by 1 order by 1",
                [dataset, src["source_kind"]]).fetchall()}


def category_levels(con: duckdb.DuckDBPyConnection, dataset: str) -> tuple[str, str] | None:
    """(SQL giving each item's second-level categories as `cats`, what that means), or None
    when the dataset's items have no categories. Amazon's categories are a path (store,
    department, ...): the second level is its second entry. MovieLens' are genres, one flat
    level below "movies", so each genre of a film counts (a film may have several)."""
    (source,) = con.execute("select source from datasets where name = ?", [dataset]).fetchone()
    (with_cats,) = con.execute("select count(*) from items where dataset = ? and"
                               " len(categories) > 0", [dataset]).fetchone()
    if not with_cats:
        return None
    d = dataset.replace("'", "''")
    if str(source).startswith("movielens"):
        return (f"select item_id, categories as cats from items where dataset = '{d}'",
                "MovieLens genres (flat: each genre of a film counts as its second level)")
    return (f"select item_id, case when len(categories) >= 2 then [categories[2]] else [] end"
            f" as cats from items where dataset = '{d}'",
            "the second entry of each item's category path")


def easy_hard_report(con: duckdb.DuckDBPyConnection, dataset: str, src: dict[str, Any],
                     k2: int, history: int) -> dict[str, Any] | None:
    """6.4's split of sequences by the distinct second-level categories in the history (the
    last `history` items): easy < 2, hard >= 3 (2: neither, as in the paper). Per part and
    class: sequences, share, M_fast's Recall@10 and the share of hard samples (miss @k2)."""
    levels = category_levels(con, dataset)
    if levels is None:
        return None
    cats_sql, meaning = levels
    rows = ("select part, user_id, target_position, hit_rank from twistar_candidates"
            f" where dataset = '{dataset.replace(chr(39), chr(39) * 2)}'"
            f" and source_kind = '{src['source_kind']}'")
    d, s = dataset.replace("'", "''"), src["split"].replace("'", "''")
    sql = f"""
        with r as ({rows}),
        h as (select r.part, r.user_id, h.item_id from r join split_interactions h
                on h.dataset = '{d}' and h.split = '{s}' and h.user_id = r.user_id
               and h.position < r.target_position
               and (h.part = 'train' or (r.part = 'test' and h.part = 'valid'))
              qualify row_number() over (partition by r.part, r.user_id
                                         order by h.position desc) <= {int(history)}),
        n as (select h.part, h.user_id, count(distinct c.cat) as n_cats
              from h join ({cats_sql}) i using (item_id), unnest(i.cats) as c(cat)
              group by all),
        cls as (select r.part, r.hit_rank, case when coalesce(n.n_cats, 0) < 2 then 'easy'
                       when n.n_cats >= 3 then 'hard' else 'middle' end as class
                from r left join n using (part, user_id))
        select part, class, count(*), count(*) / sum(count(*)) over (partition by part),
               avg(coalesce(hit_rank <= 10, false)::int),
               avg((hit_rank is null or hit_rank > {k2})::int)
        from cls group by part, class order by part, class"""
    report: dict[str, Any] = {"second_level": meaning, "history": history}
    for part, cls, n, share, r10, miss in con.execute(sql).fetchall():
        report.setdefault(part, {})[cls] = {"sequences": int(n), "share": share,
                                            "recall@10": r10, "hard_sample_share": miss}
    return report


# -- planner pseudo-labels (4.4, App. B, E.1.4) ----------------------------------------------
def tool_calls(path: int, k1: int, k2: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tool-call sequence of a path (4.4): 1 fast_rec(K1); 2 fast_rec(K2) then
    rank_candidates(K2, K1) (the ranker reorders the K2 retrieved and keeps K1); 3
    think_and_rec(K1) (M_slow's K1 beams are the final top-K1)."""
    return {1: [("fast_rec", (k1,))],
            2: [("fast_rec", (k2,)), ("rank_candidates", (k2, k1))],
            3: [("think_and_rec", (k1,))]}[path]


ARG_NAMES = {"fast_rec": ("k",), "rank_candidates": ("m", "n"), "think_and_rec": ("j",)}


def label_json(path: int, k1: int, k2: int) -> str:
    """The label: {"tool_calls": [{"name", "arguments", "call"}]}. `call` is the call as
    text (`rank_candidates(50, 10)`), which rewards.parse_tool_calls reads, so a planner
    that writes its label earns the process reward (eq. 7)."""
    calls = tool_calls(path, k1, k2)
    assert valid_tool_sequence(calls)
    return json.dumps({"tool_calls": [
        {"name": name, "arguments": dict(zip(ARG_NAMES[name], args, strict=True)),
         "call": f"{name}({', '.join(map(str, args))})"} for name, args in calls]})


def label_parts(trained_on: str, parts: list[str] | None) -> list[str]:
    """The parts to label. 4.4: labels come from evaluating M_fast "on a held-out set": a
    part the candidate model trained on would give in-sample (too easy) paths, so it is
    refused. Default: the non-test parts it did not train on."""
    if parts:
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise FactoryError(f"--parts {unknown[0]!r}: expected train, valid or test")
        if trained_on == "train" and "train" in parts:
            raise FactoryError("--parts train: these candidates come from a model trained on "
                               "the train part, so its hits there are in-sample; label valid "
                               "(and test), the sequences it never saw (TwiSTAR 4.4)")
        return sorted(set(parts), key=PARTS.index)
    return ["valid"] if trained_on == "train" else ["train", "valid"]


def store_planner_labels(con: duckdb.DuckDBPyConnection, dataset: str, src: dict[str, Any], *,
                         k1: int, k2: int, flip: float, seed: int, parts: list[str],
                         run_id: str) -> dict[str, Any]:
    """Replace the dataset's planner labels (Alg. 1 lines 3-8); returns counts per part."""
    if not 1 <= k1 <= k2 <= src["k"]:
        raise FactoryError(f"--k1 {k1} --k2 {k2}: need 1 <= K1 <= K2 <= the candidates' K "
                           f"({src['k']})")
    if not 0 <= flip <= 1:
        raise FactoryError(f"--flip {flip}: a probability, in [0, 1]")
    u_flip = unit_sql(seed, "'flip'", "part", "user_id")
    u_to = unit_sql(seed, "'to'", "part", "user_id")
    con.execute("delete from twistar_planner_labels where dataset = ?", [dataset])
    con.execute(f"""insert into twistar_planner_labels
        with c as (
            select *, case when hit_rank <= $k1 then 1 when hit_rank <= $k2 then 2 else 3
                      end as original_path,
                   {u_flip} as u_flip, {u_to} as u_to
            from twistar_candidates where dataset = $dataset and source_kind = $kind
              and part in (select unnest($parts::varchar[]))),
        p as (
            -- App. B line 6: Path 1 flipped to 2 or 3 (the paper gives no ratio: half each)
            select *, original_path = 1 and u_flip < $flip as flipped from c)
        select dataset, source_kind, $trained_on, part, user_id, target_position,
               target_item_id, hit_rank, $k1, $k2, original_path, path,
               flipped, case path when 1 then $l1 when 2 then $l2 else $l3 end, $seed, $run
        from (select *, case when flipped then (case when u_to < 0.5 then 2 else 3 end)
                             else original_path end as path from p)""",
                {"dataset": dataset, "kind": src["source_kind"], "k1": k1, "k2": k2,
                 "flip": flip, "parts": parts, "trained_on": src["trained_on"],
                 "l1": label_json(1, k1, k2), "l2": label_json(2, k1, k2),
                 "l3": label_json(3, k1, k2), "seed": seed, "run": run_id})
    counts: dict[str, Any] = {}
    for part, orig, path, flipped, n in con.execute(
            "select part, original_path, path, flipped, count(*) from twistar_planner_labels"
            " where dataset = ? group by all order by all", [dataset]).fetchall():
        c = counts.setdefault(part, {"rows": 0, "original": {}, "path": {}, "flipped": 0})
        c["rows"] += n
        c["original"][orig] = c["original"].get(orig, 0) + n
        c["path"][path] = c["path"].get(path, 0) + n
        c["flipped"] += n if flipped else 0
    return counts
