"""`factory i2i-eval`: the 10-candidate discriminative I2I set of TwiSTAR 6.3.

For every I2I pair (i, j) of a mining run: j plus `distractors` items drawn at random from the
dataset's catalog (never i, never j, no repeats, and never another mined partner of i in either
direction: a true partner is no distractor), shuffled, with the answer's position. A source
with fewer non-partner items than `distractors` gets no set (counted). A
model is shown i and the candidates and must pick j. Seeded, so a re-run with the same
parameters builds the same set (and replaces the earlier copy); `--out` writes JSON lines
with titles and, when the dataset has SIDs, the SIDs of i and of each candidate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import typer

from factory.console import summary
from factory.errors import FactoryError
from factory.i2i import resolve_i2i_run
from factory.runs import finish_run, start_run
from factory.teacher.options import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt
from factory.warehouse import Warehouse, require_dataset


def draw_candidates(
    pairs_i: np.ndarray, pairs_j: np.ndarray, n_items: int, distractors: int, seed: int,
    forbidden: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(candidates (n, distractors + 1) as catalog indices, answer positions (n,)).

    A distractor is never i, never j, never repeated and, with `forbidden` (sorted codes
    `source * n_items + item`), never an item forbidden for the row's source i (its mined
    partners). Every row is drawn at once and only the offending entries are redrawn, so
    millions of pairs take seconds; by symmetry each row's distractors are a uniform sample of
    the items allowed for it. Each row must have at least `distractors` allowed items."""
    rng = np.random.default_rng(seed)
    n = len(pairs_i)
    neg = rng.integers(0, n_items, size=(n, distractors))
    while True:
        bad = (neg == pairs_i[:, None]) | (neg == pairs_j[:, None])
        if forbidden is not None and len(forbidden):
            codes = pairs_i[:, None] * n_items + neg
            at = np.minimum(np.searchsorted(forbidden, codes), len(forbidden) - 1)
            bad |= forbidden[at] == codes
        order = np.argsort(neg, axis=1, kind="stable")      # a repeat of an earlier entry
        srt = np.take_along_axis(neg, order, axis=1)
        dup = np.zeros_like(bad)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        repeat = np.zeros_like(bad)
        np.put_along_axis(repeat, order, dup, axis=1)
        bad |= repeat
        if not bad.any():
            break
        r, c = np.nonzero(bad)
        neg[r, c] = rng.integers(0, n_items, size=len(r))
    answer = rng.integers(0, distractors + 1, size=n)
    cands = np.empty((n, distractors + 1), dtype=np.int64)
    cols = np.arange(distractors + 1)
    for r in range(distractors + 1):
        at = answer == r
        others = [c for c in cols if c != r]
        cands[at, r] = pairs_j[at]
        cands[np.ix_(at, others)] = neg[at]
    return cands, answer


def partner_codes(pairs: list[tuple[str, str]], index: dict[str, int]) -> np.ndarray:
    """Sorted codes `i * n_items + p` for every mined partner p of every source i, in either
    direction (p after i, or i after p): the items that must not be distractors for i."""
    n = len(index)
    a = np.array([index[i] for i, _ in pairs], dtype=np.int64)
    b = np.array([index[j] for _, j in pairs], dtype=np.int64)
    return np.unique(np.concatenate([a * n + b, b * n + a]))


def run_eval(wh: Warehouse, dataset: str, *, distractors: int = 9, seed: int = 0,
             i2i_run: str | None = None, max_pairs: int | None = None,
             reuse: bool = False) -> dict[str, Any]:
    """Build and store the candidate sets; returns counts with the eval run id.

    With `reuse`, a finished run with the same parameters is returned as it is (the sets are
    seeded, so rebuilding would give the same ones under a new run id)."""
    if distractors < 1:
        raise FactoryError("--distractors must be at least 1")
    with wh.read() as con:
        require_dataset(con, dataset)
        i2i_run = resolve_i2i_run(con, dataset, i2i_run)
        params = {"i2i_run": i2i_run, "distractors": distractors, "seed": seed,
                  "max_pairs": max_pairs, "exclude_partners": True}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        if reuse:
            row = con.execute(
                "select run_id, counts from job_runs where job = 'i2i-eval' and dataset = ?"
                " and status = 'succeeded' and params->>'params_hash' = ?"
                " and run_id in (select run_id from i2i_eval_sets)"
                " order by started_at desc limit 1", [dataset, digest]).fetchone()
            if row is not None:
                return {**json.loads(row[1]), "reused": True}
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
    index = {item: k for k, item in enumerate(catalog)}
    forbidden = partner_codes(pairs, index)
    # items allowed as distractors for source i: all but i and its partners (either direction)
    sources, n_partners = np.unique(forbidden // len(catalog), return_counts=True)
    allowed = dict(zip(sources.tolist(), (len(catalog) - 1 - n_partners).tolist(),
                       strict=True))
    too_few = [p for p in pairs if allowed[index[p[0]]] < distractors]
    if too_few:
        pairs = [p for p in pairs if allowed[index[p[0]]] >= distractors]
    if not pairs:
        raise FactoryError(f"no candidate set can be built from I2I run {i2i_run!r}: "
                           f"{len(too_few):,} pairs, none with {distractors} non-partner items")
    if max_pairs and len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_pairs,
                                                          replace=False))
        pairs = [pairs[k] for k in keep]
    pi = np.array([index[i] for i, _ in pairs], dtype=np.int64)
    pj = np.array([index[j] for _, j in pairs], dtype=np.int64)
    cands, answer = draw_candidates(pi, pj, len(catalog), distractors, seed, forbidden)
    names = np.array(catalog, dtype=object)
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
                  "catalog": len(catalog), "replaced_runs": old,
                  "skipped_too_few_non_partners": len(too_few)}
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


# -- RQ3: ask a model to pick the partner, score the accuracy -------------------------------

SCORE_JOB = "i2i-eval-score"
SCORE_TABLE = "i2i_eval_answers"
SCORE_PROMPT = "twistar_i2i_discriminate"
#: how items are shown: TwiSTAR 6.3 shows i by its SID (optionally with text) and the candidates
#: by their SIDs; `text` (titles and categories only) is the factory's, for a model without
#: SID tokens (e.g. a general teacher as a reference point)
VIEWS = ("sid", "sid+text", "text")
_Z95 = 1.959963984540054
_CHOICE = re.compile(r"(?:answer|candidate|option|number|choice)\W{0,3}(?:is\W{0,3})?#?(\d+)",
                     re.I)


def parse_choice(text: str, n: int) -> int:
    """The candidate an answer picks, 0-based. A bare number, or the number after "answer",
    "candidate", "option" ... (the last such), or the only number in range in the answer;
    anything else is malformed (re-drawn)."""
    from factory.answers import MalformedAnswer, split_thinking

    _, answer = split_thinking(text)
    answer = (answer or "").strip()
    if not answer:
        raise MalformedAnswer("empty answer")
    bare = re.fullmatch(r"\W*(\d+)\W*", answer)
    named = _CHOICE.findall(answer)
    numbers = {int(x) for x in re.findall(r"\b(\d+)\b", answer)} & set(range(1, n + 1))
    if bare:
        pick = int(bare.group(1))
    elif named:
        pick = int(named[-1])
    elif len(numbers) == 1:
        pick = numbers.pop()
    else:
        raise MalformedAnswer(f"no single candidate number (1..{n}) in the answer")
    if not 1 <= pick <= n:
        raise MalformedAnswer(f"candidate {pick} is not in 1..{n}")
    return pick - 1


def wilson_interval(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def score_eval(wh: Warehouse, eval_run: str, teacher: TeacherOptions, *,
               show: str = "sid") -> dict[str, Any]:
    """Ask the model for every set of `eval_run`, store one row per set in i2i_eval_answers
    and return the accuracy (over answered sets) with its 95% Wilson interval."""
    from factory.itemtext import load_items
    from factory.prompts import load_prompt
    from factory.teacher import Sampling, TeacherJob, Work

    if show not in VIEWS:
        raise FactoryError(f"--show {show!r}: one of {', '.join(VIEWS)}")
    prompt = load_prompt(SCORE_PROMPT)
    with wh.read() as con:
        row = con.execute("select dataset from job_runs where run_id = ? and job = 'i2i-eval'",
                          [eval_run]).fetchone()
        if row is None:
            raise FactoryError(f"no i2i-eval run {eval_run!r}")
        dataset = row[0]
        sets = con.execute(
            "select item_i, item_j, candidates, answer_index from i2i_eval_sets"
            " where run_id = ? order by item_i, item_j", [eval_run]).fetchall()
        if not sets:
            raise FactoryError(f"i2i-eval run {eval_run!r} has no candidate sets")
        needed = {x for i, _, c, _ in sets for x in (i, *c)}
        items = load_items(con, dataset, needed) if show != "sid" else {}
        sids: dict[str, str] = {}
        sid_run = None
        if show != "text":
            sids = dict(con.execute("select item_id, sid from item_sids where dataset = ?",
                                    [dataset]).fetchall())
            if not sids:
                raise FactoryError(f"no SIDs for {dataset!r} (TwiSTAR 6.3 shows items by SID):"
                                   f" run `factory sids --dataset {dataset}` first, or score "
                                   "with --show text")
            sid_run = con.execute("select run_id from sid_latest where dataset = ?",
                                  [dataset]).fetchone()[0]

    def text(item: str) -> str | None:
        return items[item].text() if item in items else None

    def as_item(item: str) -> str | None:
        if show == "text":
            return text(item)
        if show == "sid+text":
            return f"{sids[item]} {text(item)}" if item in sids and text(item) else None
        return sids.get(item)

    def as_candidate(item: str) -> str | None:
        return text(item) if show == "text" else sids.get(item)

    works, skipped = [], 0
    n = len(sets[0][2])
    for item_i, item_j, cands, answer in sets:
        shown_i = as_item(item_i)
        shown = [as_candidate(c) for c in cands]
        if shown_i is None or any(x is None for x in shown):
            skipped += 1
            continue
        works.append(Work(id=f"{item_i}\t{item_j}", vars={"item": shown_i, "candidates": shown,
                                                           "n": len(cands)},
                          data=(item_i, item_j, answer, len(cands))))
    if not works:
        raise FactoryError(f"none of the {len(sets):,} sets of {eval_run!r} can be shown as "
                           f"{show!r} (items without {'text' if show == 'text' else 'SID'})")

    def parse(text_: str) -> tuple[int, str]:
        from factory.answers import split_thinking

        return parse_choice(text_, n), split_thinking(text_)[1].strip()

    def row(o: Any) -> dict[str, Any]:
        item_i, item_j, answer, k = o.work.data
        chosen, said = o.value if o.ok else (None, None)
        return {"dataset": dataset, "eval_run": eval_run, "item_i": item_i, "item_j": item_j,
                "answer_index": answer, "n_candidates": k, "item_view": show,
                "chosen_index": chosen, "correct": None if chosen is None else chosen == answer,
                "answer": said}

    params = {"dataset": dataset, "eval_run": eval_run, "show": show, "sid_run": sid_run,
              "sets": len(sets), "sets_not_shown": skipped}
    with TeacherJob(wh, SCORE_JOB, dataset=dataset, options=teacher, params=params,
                    defaults=Sampling(temperature=0.0, max_tokens=1024)) as job:
        report = job.run(works, prompt=prompt, parse=parse, table=SCORE_TABLE, row=row)
    out: dict[str, Any] = {"report": report, "dataset": dataset, "eval_run": eval_run,
                           "sets": len(sets), "skipped": skipped, "n_candidates": n}
    if report.dry_run:
        return out
    with wh.read() as con:
        answered, correct, failed = con.execute(
            f"select count(correct), count(*) filter (where correct), count(*) - count(correct)"
            f" from {SCORE_TABLE} where run_id = ?", [report.run_id]).fetchone()
    lo, hi = wilson_interval(correct, answered)
    out.update(answered=answered, correct=correct, failed=failed,
               accuracy=correct / answered if answered else None, ci95=(lo, hi))
    return out


#: teacher options of --score (all but --seed, which is the set's seed here)
_TEACHER = ("teacher_url", "teacher_model", "backend", "concurrency", "rpm", "tpm", "timeout",
            "min_tokens_per_s",
            "stall_timeout", "attempts", "temperature", "top_p", "max_tokens", "price_table",
            "dry_run", "max_cost", "cache_only", "refresh", "limit", "shard")


def i2i_eval(
    dataset: str = DatasetOpt,
    distractors: int = typer.Option(9, "--distractors", help="Random distractors per pair "
                                    "(TwiSTAR 6.3: 9, so 10 candidates); never i or a mined "
                                    "partner of i."),
    seed: int = typer.Option(0, "--sample-seed", help="Seed of the pair sample, the "
                             "distractors and their positions."),
    i2i_run: str = typer.Option(None, "--i2i-run", help="Mining run: an id, a unique prefix "
                                "of one, or latest [default: the dataset's latest]."),
    max_pairs: int = typer.Option(None, "--pairs", min=1, help="Seeded sample of pairs "
                                  "[default: all]."),
    out: Path = typer.Option(None, "--out", help="Also write the sets as JSON lines."),
    score: bool = typer.Option(False, "--score", help="Ask the model (the teacher options "
                               "below: a server with the model under test) to pick the "
                               "partner in every set; store the answers in i2i_eval_answers "
                               "and report the accuracy with its 95% interval (TwiSTAR RQ3). "
                               "Reuses the set built with the same parameters."),
    show: str = typer.Option("sid", "--show", help="--score: how items are shown: sid (TwiSTAR "
                             "6.3: i and the candidates by SID), sid+text (i also with its "
                             "title and category, the paper's option), text (titles and "
                             "categories only; the factory's, for a model without SIDs)."),
    *, teacher: TeacherOptions,
) -> None:
    """Build the 10-candidate I2I discrimination set (TwiSTAR 6.3); --score runs RQ3."""
    from factory.cli import warehouse

    wh = warehouse()
    if score and show not in VIEWS:
        raise FactoryError(f"--show {show!r}: one of {', '.join(VIEWS)}")
    c = run_eval(wh, dataset, distractors=distractors, seed=seed, i2i_run=i2i_run,
                 max_pairs=max_pairs, reuse=score)
    rows: dict[str, Any] = {"candidate sets": c["sets"],
                            "candidates per set": distractors + 1,
                            "catalog items": c["catalog"], "from I2I run": c["i2i_run"]}
    if c.get("skipped_too_few_non_partners"):
        rows["pairs without enough non-partner items"] = c["skipped_too_few_non_partners"]
    if out:
        rows["written"] = f"{export_jsonl(wh, c['run_id'], out):,} lines to {out}"
    rows["run"] = c["run_id"] + (" (reused)" if c.get("reused") else "")
    if not score:
        summary(f"I2I evaluation set of {dataset}", rows,
                f"select * from i2i_eval_sets where run_id = '{c['run_id']}' limit 5")
        return
    r = score_eval(wh, c["run_id"], teacher, show=show)
    report = r["report"]
    if report.dry_run:
        return
    from factory.verdicts import report_rows

    lo, hi = r["ci95"]
    acc = "-" if r["accuracy"] is None else (
        f"{r['accuracy']:.2%} (95% CI {lo:.2%} - {hi:.2%}, Wilson)")
    srows = report_rows(report, **{"candidate sets": r["sets"],
                                    "sets not shown (no SID/text)": r["skipped"]})
    srows.update({"answered": r["answered"], "correct": r["correct"],
                  "failed (not scored)": r["failed"], "accuracy": acc,
                  "chance": f"{1 / r['n_candidates']:.0%}", "items shown as": show,
                  "evaluation set": c["run_id"]})
    summary(f"I2I discrimination accuracy on {dataset} (TwiSTAR RQ3)", srows,
            f"select * from i2i_eval_accuracy where eval_run = '{c['run_id']}'")


def register(app: typer.Typer) -> None:
    app.command("i2i-eval")(teacher_options(i2i_eval, only=_TEACHER))
