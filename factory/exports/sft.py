"""Supervised fine-tuning sets in chat format: TwiSTAR collaborative explanations mixed with
SID/text alignment, and ThinkRec reasoning traces mixed with Yes/No recommendation examples.

Output, per part (train / valid / test): `<stem>.<part>.jsonl` with one
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` per line (the format TRL's
SFTTrainer and OpenAI fine-tuning read), or `<stem>.<part>.parquet` with the same `messages`
column plus where each example came from; and `<stem>.manifest.json` with the parameters,
the counts and the files. Only kept rows are exported. Every random choice draws from one
seeded generator over rows in a fixed order, so the same warehouse and seed give the same
bytes.

Mixing, I2I: the collaborative explanations of the train part are all used once; alignment
examples are sampled to the requested ratio, without replacement while the pool lasts, then
in further passes (recorded as `alignment_passes` in the manifest).

Mixing, ThinkRec: every recommendation instance is used once (the paper trains on all of
them; its 0.2/0.8 is the rate at which reasoning and recommendation examples are sampled).
The train part's reasoning share is reached by repeating the (few thousand) traces: whole
shuffled passes, then a sample without replacement for the remainder, so each trace appears
`reasoning_passes` or one fewer times. Repetition rather than per-example weights because
chat JSONL and TRL's SFTTrainer carry no weight; a shuffled file with 20% reasoning rows is
what the paper's sampler draws. When there are more traces than the share needs, a sample
of them is used. The manifest's notes record traces, examples, passes, the recommendation
count and the share reached.

TwiSTAR M_fast (4.2, eq. 6): every prefix of a user's train-part sequence with at least one
earlier item becomes (SIDs of the last `history` items -> the item's SID), prompt and answer in
App. A.2's token form and nothing else (4.2: "the input contains only the SID tokens of
historical items"). Valid rows show the user's train items before the valid item; test rows
the train and valid items before the test item, so no train row ever names a held-out target.
SIDs are the dataset's latest `factory sids` run. Built in DuckDB and written from there (no
per-row Python), shuffled by a seeded hash of (user, position).

Parts: ThinkRec examples take the part of their target interaction in the split (reasoning
traces are made from the train part only, so valid/test hold recommendation examples).
I2I pairs are mined from the split's train part and have no part of their own: a seeded share
of unordered pairs is held out for valid and for test (`holdout`), so a fine-tuned model can
be checked on pairs it never saw; alignment examples go to train.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from factory.errors import FactoryError
from factory.itemtext import (
    HistoryEntry,
    item_noun,
    latest_keywords,
    load_items,
    plural,
    render_history,
)
from factory.thinkrec import candidates, load_instances, require_labels

PARTS = ("train", "valid", "test")
FORMATS = ("chat-jsonl", "parquet")
KINDS = ("i2i", "thinkrec", "twistar-fast", "twistar-ranker", "twistar-planner")
#: kinds built as a DuckDB table and written from there (no per-row Python)
TABLE_KINDS = ("twistar-fast", "twistar-ranker", "twistar-planner")
# --history when not given: ThinkRec's 10 items (factory's long-standing default); TwiSTAR
# gives no history length for M_fast (4.2, E.1.2 only cap sequences at 512 tokens, E.1.1),
# so 20 items (100 SID tokens at L = 3 plus the markers, well inside 512)
DEFAULT_HISTORY = {"thinkrec": 10, "twistar-fast": 20, "twistar-ranker": 20,
                   "twistar-planner": 20}
TWISTAR_FAST_KIND = "next-item"
TWISTAR_PLANNER_KIND = "planner"


@dataclass
class Example:
    """One fine-tuning example and the warehouse rows it came from."""

    part: str
    kind: str                       # collaborative | alignment | reasoning | recommendation
    prompt: str
    answer: str
    item_id: str | None = None
    other_item_id: str | None = None
    user_id: str | None = None
    position: int | None = None
    sample_index: int | None = None
    label: bool | None = None
    run_id: str | None = None
    group_id: int | None = None

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.answer}]


@dataclass
class ExportResult:
    files: list[Path]
    counts: dict[str, dict[str, int]]             # part -> kind -> examples
    notes: dict[str, Any] = field(default_factory=dict)


def unit_hash(*parts: Any) -> float:
    """A stable number in [0, 1) for a key (the same on every machine and Python run)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def take(pool: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`n` indices into a pool of `pool`: whole shuffled passes, then a sample without
    replacement for the remainder. Returns the indices and the number of passes started."""
    if n <= 0 or pool == 0:
        return np.empty(0, dtype=np.int64), 0
    full, rest = divmod(n, pool)
    chunks = [rng.permutation(pool) for _ in range(full)]
    if rest:
        chunks.append(rng.choice(pool, size=rest, replace=False))
    return np.concatenate(chunks), full + (1 if rest else 0)


def parse_mix(spec: str) -> float:
    """`alignment:R` -> R alignment examples per collaborative explanation (E.1.3: 1:1)."""
    name, sep, value = spec.partition(":")
    if name.strip() != "alignment" or not sep:
        raise FactoryError(f"--mix {spec!r}: expected alignment:RATIO, e.g. alignment:1")
    try:
        ratio = float(value)
    except ValueError:
        raise FactoryError(f"--mix {spec!r}: RATIO must be a number") from None
    if ratio < 0:
        raise FactoryError(f"--mix {spec!r}: RATIO must not be negative")
    return ratio


# -- TwiSTAR: collaborative explanations + SID/text alignment -----------------------------------
def sid_tokens(con: duckdb.DuckDBPyConnection, dataset: str) -> dict[str, str]:
    """Each item's SID in TwiSTAR App. A.2 token form, from the latest `sids` run."""
    rows = con.execute("select item_id, sid from item_sids where dataset = ?",
                       [dataset]).fetchall()
    return {str(i): t for i, t in rows}


def i2i_examples(con: duckdb.DuckDBPyConnection, dataset: str, split: str, *, mix: float,
                 holdout: float, seed: int, model: str | None = None) -> tuple[
                     list[Example], dict[str, Any]]:
    from factory.prompts import load_prompt

    rows = con.execute(
        "select e.item_i, e.item_j, e.sample,"
        "  json_extract_string(c.request, '$.messages[#-1].content'), e.explanation, e.run_id"
        " from i2i_explanations e join llm_calls c on c.key = e.call_key"
        " where e.dataset = ? and e.pairs_split = ? and e.verdict = 'kept'"
        " and (? is null or e.model = ?) order by e.item_i, e.item_j, e.sample, e.work_key",
        [dataset, split, model, model]).fetchall()
    if not rows:
        raise FactoryError(
            f"no kept I2I explanations of {dataset!r} for pairs of split {split!r}"
            f"{f' from model {model!r}' if model else ''}: run `factory explain-i2i` first")
    examples = []
    for item_i, item_j, sample, prompt, text, run_id in rows:
        h = unit_hash(seed, *sorted((item_i, item_j)))
        part = "test" if h < holdout else "valid" if h < 2 * holdout else "train"
        examples.append(Example(part, "collaborative", prompt, text, item_i, item_j,
                                sample_index=sample, run_id=run_id))
    rng = np.random.default_rng(seed)
    notes: dict[str, Any] = {"alignment_per_explanation": mix}
    n_collab = sum(e.part == "train" for e in examples)
    n_align = round(n_collab * mix)
    if n_align:
        sids = sid_tokens(con, dataset)
        items = load_items(con, dataset, sids)
        to_text = load_prompt("twistar_align_sid_to_text")
        to_sid = load_prompt("twistar_align_text_to_sid")
        pool: list[tuple[str, str, str]] = []       # (item_id, prompt, answer), fixed order
        for item_id in sorted(sids):
            text = items[item_id].text() if item_id in items else None
            if not text:
                continue
            pool.append((item_id, _user(to_text.render(sid=sids[item_id])), text))
            pool.append((item_id, _user(to_sid.render(text=text)), sids[item_id]))
        if not pool:
            raise FactoryError(f"no items of {dataset!r} have both a SID and text: run "
                               "`factory sids` first, or pass --mix alignment:0")
        picked, passes = take(len(pool), n_align, rng)
        examples += [Example("train", "alignment", pool[k][1], pool[k][2], pool[k][0])
                     for k in picked]
        notes.update(alignment_pool=len(pool), alignment_passes=passes)
    return examples, notes


def _user(messages: list[dict[str, str]]) -> str:
    """The prompt text of a one-turn template (factory's prompts have no system block here)."""
    return "\n\n".join(m["content"] for m in messages)


# -- TwiSTAR M_fast: SID history -> next item's SID ----------------------------------------
def twistar_fast_table(con: duckdb.DuckDBPyConnection, dataset: str, split: str, *,
                       history: int, seed: int, table: str = "_twistar_fast") -> dict[str, Any]:
    """Every M_fast example into the temporary table `table`, one row per target with the
    export's Parquet columns plus `_order` (the seeded shuffle key); returns the notes.
    Fails when the dataset has no SID run, or the run lacks an item of the split."""
    from factory.exports.cache import resolve_sids_run

    run_id = resolve_sids_run(con, dataset, None)
    missing, example = con.execute(
        "select count(distinct i.item_id), min(i.item_id) from split_interactions i"
        " anti join item_sids_all s on s.dataset = i.dataset and s.run_id = ?"
        "  and s.item_id = i.item_id where i.dataset = ? and i.split = ?",
        [run_id, dataset, split]).fetchone()
    if missing:
        raise FactoryError(f"sids run {run_id} has no SID for {missing:,} items of split "
                           f"{split!r} (e.g. {example!r}); re-run `factory sids --dataset "
                           f"{dataset}`")
    levels = con.execute("select max(len(codes)) from item_sids_all where dataset = ?"
                         " and run_id = ?", [dataset, run_id]).fetchone()[0]
    n = int(history)
    sql = f"""
        create or replace temp table {table} as
        with seq as (
            select i.part, i.user_id, i.position, i.item_id, s.sid
            from split_interactions i join item_sids_all s
              on s.dataset = i.dataset and s.run_id = $run and s.item_id = i.item_id
            where i.dataset = $dataset and i.split = $split),
        train as (               -- 4.2: each train prefix, the last {n} earlier train items
            select part, user_id, position, item_id, sid, list(sid) over (
                partition by user_id order by position
                rows between {n} preceding and 1 preceding) as hist
            from seq where part = 'train'),
        held_out as (            -- valid: train before it; test: train and valid before it
            select t.part, t.user_id, t.position, t.item_id, t.sid, h.sid as h_sid,
                   h.position as h_pos, row_number() over (
                       partition by t.user_id, t.position order by h.position desc) as back
            from seq t join seq h on h.user_id = t.user_id and h.position < t.position
              and (h.part = 'train' or (t.part = 'test' and h.part = 'valid'))
            where t.part in ('valid', 'test')),
        examples as (
            select * from train where len(hist) > 0
            union all
            select part, user_id, position, item_id, sid, list(h_sid order by h_pos)
            from held_out where back <= {n} group by all)
        select [{{'role': 'user', 'content': array_to_string(hist, '')}},
                {{'role': 'assistant', 'content': sid}}] as messages,
               part, '{TWISTAR_FAST_KIND}' as kind, item_id, null::varchar as other_item_id,
               user_id, position::integer as position, null::integer as sample_index,
               null::boolean as label, $run as run_id, null::integer as group_id,
               md5(concat_ws(chr(31), $seed, user_id, position)) as _order
        from examples"""
    notes = {"sids_run": run_id, "sid_levels": levels, "history": n,
             "prompt": "the SIDs of the history, oldest first (TwiSTAR 4.2)"}
    con.execute(sql, {"run": run_id, "dataset": dataset, "split": split, "seed": seed})
    # targets left out for want of an earlier item: each user's first train item, and any
    # valid/test item with nothing allowed before it
    notes["targets_without_history"] = dict(con.execute(
        f"select p.part, count(*) filter (where t.position is null) from split_parts p"
        f" left join {table} t on t.user_id = p.user_id and t.position = p.position"
        " where p.dataset = ? and p.split = ? group by p.part order by p.part",
        [dataset, split]).fetchall())
    return notes


def write_table(con: duckdb.DuckDBPyConnection, table: str, paths: dict[str, Path],
                fmt: str) -> dict[str, dict[str, int]]:
    """Write the rows of `table` (Parquet columns + `_order`) per part, in `_order`, from
    DuckDB: `messages` only as chat JSONL, every column as Parquet; atomically."""
    for part, path in paths.items():
        rows = f"select * exclude (_order) from {table} where part = '{part}' order by _order"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if fmt == "chat-jsonl":
            con.execute(f"copy (select messages from ({rows})) to '{_sql_path(tmp)}'"
                        " (format json)")
        else:
            import pyarrow.parquet as pq

            pq.write_table(con.sql(rows).to_arrow_table().cast(_parquet_schema()), tmp)
        os.replace(tmp, path)


def table_counts(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, dict[str, int]]:
    """part -> kind -> rows of an export table (every part present, empty ones too)."""
    counts: dict[str, dict[str, int]] = {p: {} for p in PARTS}
    for part, kind, n in con.execute(f"select part, kind, count(*) from {table}"
                                     " group by all order by all").fetchall():
        counts[part][kind] = int(n)
    return counts


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


# -- ThinkRec: reasoning traces + Yes/No recommendation ---------------------------------------
def thinkrec_examples(con: duckdb.DuckDBPyConnection, dataset: str, split: str, *,
                      share: float, history: int, seed: int, exclude_revealed: bool,
                      groups: dict[str, int] | None, noun: str | None,
                      model: str | None = None) -> tuple[list[Example], dict[str, Any]]:
    """Reasoning traces (kept, train) and recommendation examples of every part, B.2 prompt."""
    from factory.prompts import load_prompt

    require_labels(con, dataset)
    prompt = load_prompt("thinkrec_recommendation")
    noun = noun or item_noun(con, dataset)
    items = load_items(con, dataset)
    keywords = latest_keywords(con, dataset)

    fill = prompt.renderer(("history", "target_title"), noun=noun, nouns=plural(noun))

    def render(entries: Sequence[HistoryEntry], target: str) -> str:
        return _user(fill(history=render_history(entries, features=True), target_title=target))

    traces = con.execute(
        "select t.user_id, t.position, t.item_id, t.label, t.history, t.explanation, t.run_id"
        " from thinkrec_traces t join split_parts p on p.dataset = t.dataset"
        "  and p.split = t.split and p.user_id = t.user_id and p.position = t.position"
        " where t.dataset = ? and t.split = ? and t.verdict = 'kept' and p.part = 'train'"
        " and (? is null or t.model = ?) and not (? and t.label_revealed)"
        " order by t.user_id, t.position, t.work_key",
        [dataset, split, model, model, exclude_revealed]).fetchall()
    notes: dict[str, Any] = {"reasoning_share": share, "history": history, "noun": noun,
                             "exclude_revealed": exclude_revealed}
    # traces made on an earlier version of the split (`split --replace`) whose instance is no
    # longer in its train part: left out, and counted so that the loss is visible
    notes["traces_not_in_split_train"] = con.execute(
        "select count(*) from thinkrec_traces t where t.dataset = ? and t.split = ?"
        " and t.verdict = 'kept' and (? is null or t.model = ?) and not exists ("
        "  select 1 from split_parts p where p.dataset = t.dataset and p.split = t.split"
        "  and p.user_id = t.user_id and p.position = t.position and p.part = 'train')",
        [dataset, split, model, model]).fetchone()[0]
    if not traces and share > 0:
        raise FactoryError(f"no kept ThinkRec traces of {dataset!r} in split {split!r}: "
                           "run `factory thinkrec` first")
    reasoning = []
    for user_id, position, item_id, label, hist, text, run_id in traces:
        if groups is not None and user_id not in groups:
            continue
        entries = [HistoryEntry.from_json(h) for h in json.loads(hist)]
        reasoning.append(Example("train", "reasoning", render(entries, items[item_id].title),
                                 text, item_id, user_id=user_id, position=position,
                                 label=label, run_id=run_id))

    keys = candidates(con, dataset, split, need_history=False)
    if groups is not None:
        keys = [k for k in keys if k[1] in groups]
    if share >= 1:                       # reasoning only: no recommendation rows in train
        keys = [k for k in keys if k[0] != "train"]
    recommendation = [
        Example(i.part, "recommendation", render(i.history, items[i.item_id].title),
                "Yes" if i.label else "No", i.item_id, user_id=i.user_id,
                position=i.position, label=i.label)
        for i in load_instances(con, dataset, split, keys, history, items, keywords,
                                need_history=False)]
    # every recommendation instance is used once; the train part's reasoning share is
    # reached by repeating traces, within each group (or the whole set), so every exported
    # set has the share (see the module docstring)
    group_of = (lambda user: groups[user]) if groups is not None else (lambda user: None)
    by_group: dict[Any, list[Example]] = {}
    for e in reasoning:
        by_group.setdefault(group_of(e.user_id), []).append(e)
    n_train: dict[Any, int] = {}
    for e in recommendation:
        if e.part == "train":
            n_train[group_of(e.user_id)] = n_train.get(group_of(e.user_id), 0) + 1
    rng = np.random.default_rng(seed)
    mixed: list[Example] = []
    passes = 0
    for g in sorted(set(by_group) | set(n_train), key=lambda g: -1 if g is None else g):
        traces_g, n_rec = by_group.get(g, []), n_train.get(g, 0)
        if share <= 0:
            n_reasoning = 0
        elif share >= 1 or n_rec == 0:
            n_reasoning = len(traces_g)      # nothing to mix with: each trace once
        else:
            n_reasoning = round(n_rec * share / (1 - share))
        picked, p = take(len(traces_g), n_reasoning, rng)
        passes = max(passes, p)
        mixed += [traces_g[k] for k in picked]
    n_rec_train = sum(n_train.values())
    notes.update(
        mixing="every recommendation instance once; reasoning traces repeated to the share",
        reasoning_traces=len(reasoning), reasoning_examples=len(mixed),
        reasoning_passes=passes, recommendation_train=n_rec_train,
        train_reasoning_share=round(len(mixed) / (len(mixed) + n_rec_train), 6)
        if mixed or n_rec_train else None)
    return mixed + recommendation, notes


def user_group_ids(con: duckdb.DuckDBPyConnection, dataset: str, grouping: str) -> dict[str, int]:
    rows = con.execute("select user_id, group_id from user_groups where dataset = ?"
                       " and grouping = ?", [dataset, grouping]).fetchall()
    if not rows:
        raise FactoryError(f"no user grouping {grouping!r} for {dataset!r}: run "
                           "`factory user-groups` first")
    return {u: g for u, g in rows}


# -- writing ------------------------------------------------------------------------------------
def output_paths(out: Path, fmt: str, suffix: str = "") -> dict[str, Path]:
    """`data.jsonl` -> data.train.jsonl, data.valid.jsonl, data.test.jsonl (+ `suffix`)."""
    ext = ".jsonl" if fmt == "chat-jsonl" else ".parquet"
    stem = out.name[:-len(out.suffix)] if out.suffix in (".jsonl", ".parquet", ".json") \
        else out.name
    return {p: out.with_name(f"{stem}{suffix}.{p}{ext}") for p in PARTS}


def manifest_path(out: Path) -> Path:
    stem = out.name[:-len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.manifest.json")


def write_examples(examples: list[Example], paths: dict[str, Path], fmt: str,
                   seed: int) -> dict[str, dict[str, int]]:
    """Shuffle each part with the seed and write it atomically (temp file, then rename)."""
    counts: dict[str, dict[str, int]] = {}
    for part, path in paths.items():
        rows = [e for e in examples if e.part == part]
        order = np.random.default_rng([seed, PARTS.index(part)]).permutation(len(rows))
        rows = [rows[k] for k in order]
        counts[part] = {}
        for e in rows:
            counts[part][e.kind] = counts[part].get(e.kind, 0) + 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if fmt == "chat-jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for e in rows:
                    f.write(json.dumps({"messages": e.messages()}, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            meta = [{k: v for k, v in asdict(e).items() if k not in ("prompt", "answer")}
                    for e in rows]
            table = pa.Table.from_pylist(
                [{"messages": e.messages(), **m} for e, m in zip(rows, meta, strict=True)],
                schema=_parquet_schema())
            pq.write_table(table, tmp)
        os.replace(tmp, path)
    return counts


def _parquet_schema() -> Any:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([
        ("messages", pa.list_(message)), ("part", pa.string()), ("kind", pa.string()),
        ("item_id", pa.string()), ("other_item_id", pa.string()), ("user_id", pa.string()),
        ("position", pa.int32()), ("sample_index", pa.int32()), ("label", pa.bool_()),
        ("run_id", pa.string()), ("group_id", pa.int32()),
    ])



def export_sft(wh: Any, dataset: str, kind: str, out: Path, *, fmt: str = "chat-jsonl",
               split: str | None = None, seed: int = 0, mix: float = 1.0,
               holdout: float = 0.05,
               share: float = 0.2, history: int | None = None,
               exclude_revealed: bool = False,
               grouping: str | None = None, noun: str | None = None,
               model: str | None = None, k1: int = 10, k2: int = 50,
               source: str | None = None) -> ExportResult:
    """Build, mix and write one SFT export; recorded as an `export-sft` job run."""
    from factory.console import console
    from factory.runs import finish_run, start_run
    from factory.splits import thinkrec_split
    from factory.warehouse import require_dataset, require_split

    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise FactoryError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    history = DEFAULT_HISTORY.get(kind, 10) if history is None else history
    if history < 1:
        raise FactoryError("--history must be at least 1")
    if not 0 <= holdout < 0.5:
        raise FactoryError("--holdout must be in [0, 0.5): it is the share of pairs for "
                           "valid and again for test")
    if not 0 <= share <= 1:
        raise FactoryError("--reasoning-share must be in [0, 1]")
    if grouping and kind != "thinkrec":
        raise FactoryError("--grouping splits users into groups; I2I examples have no user"
                           if kind == "i2i" else "--grouping is for thinkrec exports")
    with wh.write() as con:
        require_dataset(con, dataset)
        if kind == "thinkrec":
            split, chosen = thinkrec_split(con, dataset, split)
            if chosen:
                console.print(chosen)
        split = split or "loo"
        require_split(con, dataset, split)
        params = {"kind": kind, "out": str(out), "format": fmt, "split": split, "seed": seed,
                  "mix": mix, "holdout": holdout, "reasoning_share": share,
                  "history": history, "exclude_revealed": exclude_revealed,
                  "grouping": grouping, "noun": noun, "model": model}
        if kind in ("twistar-ranker", "twistar-planner"):
            params.update(k1=k1, k2=k2, source=source)
        run_id = start_run(con, "export-sft", dataset, params)
    try:
        with wh.read() as con:
            groups = user_group_ids(con, dataset, grouping) if grouping else None
            examples: list[Example] = []
            if kind == "twistar-fast":
                notes = twistar_fast_table(con, dataset, split, history=history, seed=seed)
                counts_fast = table_counts(con, "_twistar_fast")
                if not any(counts_fast.values()):
                    raise FactoryError(f"nothing to export for {dataset!r} ({kind}, split "
                                       f"{split!r}): no target has an earlier item")
                paths = output_paths(out, fmt)
                write_table(con, "_twistar_fast", paths, fmt)
            elif kind == "twistar-ranker":
                from factory.exports.twistar import ranker_table, write_rows

                notes = ranker_table(con, dataset, k1=k1, k2=k2, seed=seed, history=history,
                                     source=source)
                # DIN rows, not chat: chat-jsonl writes the same columns as JSON lines
                paths = output_paths(out, fmt)
                counts_fast = {p: {"ranker": n} for p, n in
                               write_rows(con, "_twistar_ranker", paths, fmt).items()}
            elif kind == "twistar-planner":
                from factory.exports.twistar import planner_table

                notes = planner_table(con, dataset, history=history, seed=seed,
                                      holdout=holdout, noun=noun)
                counts_fast = table_counts(con, "_twistar_planner")
                paths = output_paths(out, fmt)
                write_table(con, "_twistar_planner", paths, fmt)
            elif kind == "i2i":
                examples, notes = i2i_examples(con, dataset, split, mix=mix, holdout=holdout,
                                               seed=seed, model=model)
            else:
                examples, notes = thinkrec_examples(
                    con, dataset, split, share=share, history=history, seed=seed,
                    exclude_revealed=exclude_revealed, groups=groups, noun=noun, model=model)
        if not examples and kind not in TABLE_KINDS:
            raise FactoryError(f"nothing to export for {dataset!r} ({kind}, split {split!r})")
        files: list[Path] = []
        counts: dict[str, Any] = {}
        if kind in TABLE_KINDS:
            counts = counts_fast
            files += paths.values()
        elif groups is None:
            paths = output_paths(out, fmt)
            counts = write_examples(examples, paths, fmt, seed)
            files += paths.values()
        else:
            for e in examples:
                e.group_id = groups[e.user_id]
            for g in sorted(set(groups.values())):
                paths = output_paths(out, fmt, f".group{g}")
                counts[f"group{g}"] = write_examples(
                    [e for e in examples if e.group_id == g], paths, fmt, seed)
                files += paths.values()
        manifest = {"dataset": dataset, "run_id": run_id, "params": params, "counts": counts,
                    "notes": notes, "files": [f.name for f in files]}
        mpath = manifest_path(out)
        tmp = mpath.with_name(f".{mpath.name}.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, mpath)
        files.append(mpath)
        with wh.write() as con:
            finish_run(con, run_id, "succeeded", {"counts": counts, **notes})
    except BaseException as exc:
        with wh.write() as con:
            finish_run(con, run_id, "interrupted" if isinstance(exc, KeyboardInterrupt)
                       else "failed", error=str(exc) or type(exc).__name__)
        raise
    return ExportResult(files, counts, {**notes, "split": split})
