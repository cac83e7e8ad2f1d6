"""`factory explain-i2i`: teacher explanations of mined I2I pairs (TwiSTAR 4.3, E.1.3).

For each pair of the latest `mine-i2i` run, the paper's instruction with both items' text
(title and category) is sent `--answers-per-pair` times (sample index 0..S-1, so each is a distinct,
cached request). TwiSTAR's "20,000 final triples after filtering" counts kept triples, so the
job works toward `--target-kept` kept explanations (default 20,000), in rounds of pairs, and
stops there; `--pairs` only caps the pairs considered. Every answer is judged
(factory.quality): shorter than 30 tokens (the paper's filter), refusal, names neither
item, or a near-duplicate (embedding cosine) of an earlier kept sample of the same pair;
each verdict is stored with its reason.

The near-duplicate check needs all samples of a pair, so it runs after the teacher round over
every pair the run touched, and again on every re-run: after merging `--shard` outputs, a
`--cache-only` re-run applies it across shards without sending a request.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import typer

from factory.console import console, summary
from factory.teacher.options import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt

if TYPE_CHECKING:
    from factory.teacher import Outcome, Report
    from factory.warehouse import Warehouse

JOB = "explain-i2i"
TABLE = "i2i_explanations"
PROMPT = "twistar_i2i_explain"


def explain_i2i(
    dataset: str = DatasetOpt,
    samples: int = typer.Option(3, "--answers-per-pair", min=1, help="Diverse teacher "
                                "answers per pair."),
    target_kept: int = typer.Option(20000, "--target-kept", min=0, help="Stop once this many "
                                    "explanations are kept (TwiSTAR E.1.3: \"20,000 final "
                                    "triples after filtering\"); pairs are explained in rounds "
                                    "in --pairs order, each sized from the keep rate so far. "
                                    "Resumable: a re-run replays its cached answers and "
                                    "continues. 0: no target, explain every pair up to "
                                    "--pairs."),
    pairs: int = typer.Option(None, "--pairs", min=1, help="At most this many pairs: each "
                              "source item's best partner first (rank 1 of every item, then "
                              "rank 2, ...), ties by score [default: all of the latest "
                              "mine-i2i run]."),
    i2i_run: str = typer.Option(None, "--i2i-run", help="Mining run: an id, a unique prefix "
                                "of one, or latest [default: the dataset's latest]."),
    split: str = typer.Option(None, "--split", help="The latest mining run of this split "
                              "[default: of any split]."),
    min_tokens: int = typer.Option(30, "--min-tokens", help="Shorter answers are rejected "
                                   "(TwiSTAR E.1.3: 30)."),
    duplicate_cosine: float = typer.Option(0.95, "--duplicate-cosine", help="A sample this "
                                           "close to an earlier kept one of the pair is "
                                           "rejected."),
    encoder: str = typer.Option(None, "--encoder", help="Sentence encoder for the duplicate "
                                "check [default: embedded all-MiniLM-L6-v2]."),
    *, teacher: TeacherOptions,
) -> None:
    """Ask the teacher why users who buy item i also buy item j; filter and store."""
    from factory.cli import warehouse
    from factory.verdicts import report_rows

    result = run_explain_i2i(warehouse(), dataset, teacher, samples=samples, pairs=pairs,
                             min_tokens=min_tokens, duplicate_cosine=duplicate_cosine,
                             encoder=encoder, target_kept=target_kept or None,
                             i2i_run=i2i_run, split=split)
    report = result["report"]
    if report.dry_run:
        return
    rows = report_rows(report, **{"pairs": result["pairs"],
                                  "pairs explained": result["explained"],
                                  "pairs skipped (item without text)": result["skipped"]})
    if target_kept:
        rows["kept / target"] = f"{result['kept']:,} / {target_kept:,}" + (
            "" if result["kept"] >= target_kept else
            " (not reached: " + (report.stopped or "every pair explained") + ")")
    rows.update({f"verdict {k}": v for k, v in result["verdicts"].items()})
    summary(f"explained I2I pairs of {dataset}", rows,
            f"select verdict, reason, count(*) from {TABLE} where dataset = '{dataset}'"
            f" and run_id = '{report.run_id}' group by all order by 3 desc")


def parse_explanation(text: str) -> str:
    """The answer without a reasoning model's <think> block. Nothing left, or no word at all
    (garbage), is malformed and re-drawn; a short or evasive answer is a verdict, not this."""
    from factory.answers import MalformedAnswer, split_thinking

    thinking, answer = split_thinking(text)
    if not answer:
        raise MalformedAnswer("no answer after the reasoning" if thinking else "empty answer")
    if not any(ch.isalpha() for ch in answer):
        raise MalformedAnswer("no words in the answer")
    return answer


def run_explain_i2i(wh: Warehouse, dataset: str, teacher: TeacherOptions, *, samples: int = 3,
                    pairs: int | None = None, min_tokens: int = 30,
                    duplicate_cosine: float = 0.95, encoder: str | None = None,
                    target_kept: int | None = None, i2i_run: str | None = None,
                    split: str | None = None) -> dict[str, Any]:
    """Explain the pairs of a mining run (the latest, of `split` when given), best first; at
    most `pairs` of them.

    With `target_kept`, pairs are explained in rounds until this run holds that many kept
    explanations (or the pairs run out): the first round takes ceil(target / samples) pairs
    (enough if every sample were kept), each later one the missing count divided by the kept
    explanations per pair so far. The rounds depend only on the answers, so a re-run replays
    the same rounds from the cache (nothing is sent twice) and a higher target continues
    where the last run stopped; the run may end a little above the target (a round's pairs
    are all judged, and each pair's samples are judged together)."""
    from factory.errors import FactoryError
    from factory.i2i import resolve_i2i_run
    from factory.itemtext import load_items
    from factory.prompts import load_prompt
    from factory.quality import count_tokens, judge_text
    from factory.teacher import Sampling, TeacherJob, Work
    from factory.verdicts import outcome_verdict
    from factory.warehouse import require_dataset

    if target_kept is not None and target_kept < 1:
        raise FactoryError("--target-kept must be at least 1 (0 on the command line: none)")
    if target_kept and (teacher.shard or teacher.limit):
        raise FactoryError("--target-kept counts the kept explanations of one run: it cannot "
                           "be combined with --shard or --limit (to split the work, use "
                           "--target-kept 0 with --pairs)")
    prompt = load_prompt(PROMPT)
    with wh.read() as con:
        require_dataset(con, dataset)
        run = resolve_i2i_run(con, dataset, i2i_run, split)
        rows = con.execute(
            "select item_i, item_j, split, run_id, score from i2i_pairs_all where run_id = ?"
            " order by rank, score desc, item_i, item_j"
            + (" limit ?" if pairs else ""), [run, pairs] if pairs else [run]
        ).fetchall()
        if not rows:
            raise FactoryError(f"mining run {run} of {dataset!r} has no pairs")
        items = load_items(con, dataset, {i for r in rows for i in r[:2]})
    shown, skipped = [], 0
    for item_i, item_j, split, pairs_run, score in rows:
        text_i = items[item_i].text() if item_i in items else None
        text_j = items[item_j].text() if item_j in items else None
        if not (text_i and text_j):
            skipped += 1
            continue
        shown.append((text_i, text_j, (item_i, item_j, split, pairs_run, score)))
    if not shown:
        raise FactoryError(f"none of the {len(rows):,} pairs of {dataset!r} has text for "
                           "both items")

    def works_for(chunk: list[tuple]) -> list[Work]:
        return [Work(id=f"{d[0]}\t{d[1]}", sample=s, vars={"item_i": ti, "item_j": tj},
                     data=d) for ti, tj, d in chunk for s in range(samples)]

    def row(o: Outcome) -> dict[str, Any]:
        item_i, item_j, split, pairs_run, score = o.work.data
        base = {"dataset": dataset, "item_i": item_i, "item_j": item_j, "pairs_split": split,
                "pairs_run": pairs_run, "pair_score": score, "explanation": o.value}
        if not o.ok:    # failed, or truncated: never judged, never kept
            verdict, reason = outcome_verdict(o)
            return {**base, "n_tokens": None, "verdict": verdict, "reason": reason}
        v = judge_text(o.value, items[item_i].title, items[item_j].title, min_tokens)
        return {**base, "n_tokens": count_tokens(o.value), "verdict": v.verdict,
                "reason": v.reason}

    def dedupe(chunk: list[tuple]) -> None:
        keys = sorted({d[:2] for _, _, d in chunk})
        mark_near_duplicates(wh, dataset, keys, duplicate_cosine, encoder)

    params = {"dataset": dataset, "samples": samples, "pairs": len(rows),
              "pairs_without_text": skipped, "min_tokens": min_tokens,
              "duplicate_cosine": duplicate_cosine, "encoder": encoder,
              "target_kept": target_kept}
    run = {"prompt": prompt, "parse": parse_explanation, "table": TABLE, "row": row}
    kept, done = 0, 0
    with TeacherJob(wh, JOB, dataset=dataset, options=teacher, params=params,
                    defaults=Sampling(temperature=0.8, max_tokens=4096)) as job:
        if not target_kept:
            report: Report = job.run(works_for(shown), **run)
            done = len(shown)
        else:
            while kept < target_kept and done < len(shown):
                per_pair = samples if not done else max(kept / done, 0.1)
                chunk = shown[done:done + math.ceil((target_kept - kept) / per_pair)]
                report = job.run(works_for(chunk), **run)
                done += len(chunk)
                if report.dry_run:
                    console.print("dry run: the first round only (as if every sample were "
                                  "kept); later rounds depend on the keep rate")
                    break
                dedupe(chunk)
                kept = run_kept(wh, job.run_id)
                if report.stopped or report.not_done:
                    break
            if not report.dry_run:
                report = job.totals
    verdicts: dict[str, int] = {}
    if not report.dry_run:
        if not target_kept:
            dedupe(shown)
        verdicts = run_verdicts(wh, report.run_id)
        kept = verdicts.get("kept", 0)
    return {"report": report, "pairs": len(rows), "skipped": skipped, "explained": done,
            "kept": kept, "verdicts": verdicts}


def run_kept(wh: Warehouse, run_id: str | None) -> int:
    with wh.read() as con:
        return con.execute(f"select count(*) from {TABLE} where run_id = ? and verdict = 'kept'",
                           [run_id]).fetchone()[0]


def mark_near_duplicates(wh: Warehouse, dataset: str, pair_keys: list[tuple[str, str]],
                         threshold: float, encoder: str | None) -> int:
    """Re-judge near-duplicates among the kept samples of each pair; returns rows changed.

    Candidates are the samples that passed the other checks (kept now, or rejected as a
    near-duplicate before), in (sample, work_key) order, so the verdicts do not depend on how
    often or in which shards the job ran."""
    import pyarrow as pa

    from factory.embeddings import Embedder
    from factory.quality import KEPT, Verdict, dedupe_samples

    keys = pa.table({"item_i": [k[0] for k in pair_keys], "item_j": [k[1] for k in pair_keys]})
    with wh.read() as con:
        con.register("_pairs", keys)
        rows = con.execute(
            "select e.item_i, e.item_j, e.work_key, e.sample, e.explanation, e.verdict, e.reason"
            f" from {TABLE} e join _pairs p using (item_i, item_j) where e.dataset = ?"
            "  and (e.verdict = 'kept' or e.reason like 'near-duplicate%')"
            " order by e.item_i, e.item_j, e.sample, e.work_key", [dataset]).fetchall()
        con.unregister("_pairs")
    if not rows:
        return 0
    groups: dict[tuple[str, str], list[tuple]] = {}
    for r in rows:
        groups.setdefault((r[0], r[1]), []).append(r)
    multi = [g for g in groups.values() if len(g) > 1]
    texts = [r[4] for g in multi for r in g]
    vectors = Embedder(wh, encoder).embed(texts, label="embedding explanations") if texts \
        else None
    changes, offset = [], 0
    for g in groups.values():
        if len(g) > 1:
            vecs = vectors[offset:offset + len(g)]
            offset += len(g)
            new = dedupe_samples([Verdict(KEPT)] * len(g), vecs, [r[3] for r in g], threshold)
        else:
            new = [Verdict(KEPT)]
        for r, v in zip(g, new, strict=True):
            if (v.verdict, v.reason) != (r[5], r[6]):
                changes.append((v.verdict, v.reason, dataset, r[0], r[1], r[2]))
    if changes:
        with wh.write() as con:
            con.executemany(f"update {TABLE} set verdict = ?, reason = ? where dataset = ?"
                            " and item_i = ? and item_j = ? and work_key = ?", changes)
    return len(changes)


def run_verdicts(wh: Warehouse, run_id: str | None) -> dict[str, int]:
    """Rows of this run per verdict, rejections per kind of reason."""
    with wh.read() as con:
        rows = con.execute(
            "select case when verdict = 'rejected' then 'rejected: '"
            "  || regexp_replace(reason, '( of |:|\\().*', '') else verdict end, count(*)"
            f" from {TABLE} where run_id = ? group by 1 order by 2 desc", [run_id]).fetchall()
    return dict(rows)


def register(app: typer.Typer) -> None:
    app.command(JOB)(teacher_options(explain_i2i))
