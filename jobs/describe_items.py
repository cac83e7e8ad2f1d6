"""`factory describe-items`: a one-sentence description of each item, from the teacher.

A demonstration of the teacher platform end to end (the paper jobs follow the same shape):
items from the warehouse -> prompt `describe_item` -> teacher -> parser -> `item_descriptions`
with provenance. Runs on the embedded SmolLM2 when no --teacher-url is given.
"""

from __future__ import annotations

import re

import typer

from factory.teacher.options import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt

JOB = "describe-items"
TABLE = "item_descriptions"
#: a sentence end: . ! or ? (maybe closed by a quote or bracket) before a space or the end,
#: not the dot of a common abbreviation (Mr. Holland's Opus)
_SENTENCE_END = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bJr)(?<!\bvs)"
    r"[.!?][\"')\]]?(?=\s|$)")


def parse_description(text: str) -> str:
    """The answer as one clean sentence; ValueError (-> a new draw) when it is not one.

    Whitespace is collapsed and wrapping quotes dropped; an unfinished last sentence is
    dropped and the complete ones kept. (An answer cut at the token limit never gets here:
    the teacher engine records it as truncated.) Nothing is invented: an unusable answer is
    rejected.
    """
    sentence = " ".join(text.split()).strip("\"'“” ")
    if not sentence:
        raise ValueError("empty answer")
    ends = list(_SENTENCE_END.finditer(sentence))
    if not ends or ends[-1].end() != len(sentence):
        if not ends:
            raise ValueError(f"no complete sentence in {sentence[:60]!r}")
        sentence = sentence[: ends[-1].end()]
    words = [w for w in sentence.split() if any(ch.isalpha() for ch in w)]
    if len(words) < 4:
        raise ValueError(f"too short to describe anything: {sentence[:60]!r}")
    if len(words) > 80:
        raise ValueError(f"{len(words)} words: not one short sentence")
    return sentence


def describe_items(dataset: str = DatasetOpt,
                   *, teacher: TeacherOptions) -> None:
    """One-sentence description of each item, stored with provenance in item_descriptions."""
    import json

    from factory.cli import warehouse
    from factory.console import summary
    from factory.prompts import load_prompt
    from factory.teacher import Sampling, TeacherJob, Work
    from factory.verdicts import report_rows
    from factory.warehouse import require_dataset

    wh = warehouse()
    prompt = load_prompt("describe_item")
    with wh.read() as con:
        require_dataset(con, dataset)
        items = con.execute(
            "select item_id, title, categories, attrs from items where dataset = ?"
            " order by try_cast(item_id as bigint) nulls last, item_id", [dataset]).fetchall()
    works = []
    for item_id, title, categories, attrs in items:
        if not title:        # nothing to describe; the teacher would only invent
            continue
        year = json.loads(attrs).get("year") if attrs else None
        works.append(Work(id=item_id, vars={"title": title, "categories": categories,
                                            "year": year}))

    with TeacherJob(wh, JOB, dataset=dataset, options=teacher,
                    params={"dataset": dataset, "items_without_title": len(items) - len(works)},
                    defaults=Sampling(temperature=0.0, max_tokens=64)) as job:
        report = job.run(works, prompt=prompt, parse=parse_description, table=TABLE,
                         row=lambda o: {"dataset": dataset, "item_id": o.work.id,
                                        "description": o.value})
    if not report.dry_run:
        summary(f"described {report.ok:,} items of {dataset}", report_rows(report),
                f"select item_id, description, status, error from {TABLE} where dataset ="
                f" '{dataset}' and run_id = '{report.run_id}'")


def register(app: typer.Typer) -> None:
    app.command(JOB)(teacher_options(describe_items))
