"""`factory keywords`: up to ten keywords per item from its metadata (ThinkRec 3.2.1, B.1).

ThinkRec summarises noisy metadata into keywords that enrich each item's text in the
reasoning prompts. Items with no usable text (neither title nor description) are skipped and
counted: the teacher would only invent keywords for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from factory.console import summary
from factory.teacher.options import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt

if TYPE_CHECKING:
    from factory.teacher import Outcome, Report
    from factory.warehouse import Warehouse

JOB = "keywords"
TABLE = "item_keywords"
PROMPT = "thinkrec_keywords"


def keywords(
    dataset: str = DatasetOpt,
    noun: str = typer.Option(None, "--noun", help="What the prompt calls an item "
                             "[default: movie for MovieLens, else item; ThinkRec: book]."),
    *, teacher: TeacherOptions,
) -> None:
    """Extract up to ten keywords per item with the teacher; stored in item_keywords."""
    from factory.cli import warehouse
    from factory.verdicts import report_rows

    report, skipped = run_keywords(warehouse(), dataset, teacher, noun=noun)
    if not report.dry_run:
        summary(f"keywords for {report.ok:,} items of {dataset}",
                report_rows(report, **{"items without text (skipped)": skipped}),
                f"select item_id, keywords, verdict, reason from {TABLE} where dataset ="
                f" '{dataset}' and run_id = '{report.run_id}'")


def run_keywords(wh: Warehouse, dataset: str, teacher: TeacherOptions, *,
                 noun: str | None = None) -> tuple[Report, int]:
    """Ask for every item with text; returns the teacher report and the items skipped."""
    from factory.answers import parse_keywords
    from factory.errors import FactoryError
    from factory.itemtext import item_noun, load_items
    from factory.prompts import load_prompt
    from factory.teacher import Sampling, TeacherJob, Work
    from factory.verdicts import outcome_verdict
    from factory.warehouse import require_dataset

    prompt = load_prompt(PROMPT)
    with wh.read() as con:
        require_dataset(con, dataset)
        noun = noun or item_noun(con, dataset)
        items = load_items(con, dataset)
    if not items:
        raise FactoryError(f"dataset {dataset!r} has no items")
    works, skipped = [], 0
    for item_id in sorted(items):
        profile = items[item_id].profile()
        if profile is None:
            skipped += 1
            continue
        works.append(Work(id=item_id, vars={"profile": profile, "noun": noun}))
    if not works:
        raise FactoryError(f"none of the {len(items):,} items of {dataset!r} has a title or "
                           "description to extract keywords from")

    def row(o: Outcome) -> dict:
        verdict, reason = outcome_verdict(o)
        return {"dataset": dataset, "item_id": o.work.id, "keywords": o.value,
                "verdict": verdict, "reason": reason}

    params = {"dataset": dataset, "noun": noun, "items": len(items),
              "items_without_text": skipped}
    with TeacherJob(wh, JOB, dataset=dataset, options=teacher, params=params,
                    defaults=Sampling(temperature=0.3, max_tokens=96)) as job:
        report = job.run(works, prompt=prompt, parse=parse_keywords, table=TABLE, row=row)
    return report, skipped


def register(app: typer.Typer) -> None:
    app.command(JOB)(teacher_options(keywords))
