"""What the teacher engine's outcome of an item means for the job's verdict column.

One rule for every job that parses teacher text: an answer the engine parsed may be kept
(the job may still reject it on its own grounds); an answer cut short (finish_reason
`length` or `content_filter`, or a `<think>` block that never closed) is `truncated`, with
the engine's reason naming the budget ("cut at max_tokens=1024; raise --max-tokens"): it is
never kept, never exported and never re-drawn at the same budget; anything else is `failed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from factory.teacher import Outcome, Report

KEPT = "kept"
FAILED = "failed"
TRUNCATED = "truncated"     # == the engine's Outcome.status for a cut answer
TRUNCATED_ROW = "truncated (not kept)"
TRUNCATED_HINT = ("cut at the token limit (raise --max-tokens), by a content filter, or ended "
                  "inside <think>; the reason column says which")


def outcome_verdict(outcome: Outcome) -> tuple[str, str | None]:
    """(verdict, reason) from the engine's view alone: kept (parsed), truncated or failed."""
    if outcome.ok:
        return KEPT, None
    if outcome.status == TRUNCATED:
        return TRUNCATED, outcome.error
    return FAILED, outcome.error


def truncated_note(n: int) -> str:
    """A summary cell for `n` truncated answers, with what to do about them."""
    return f"{n:,} ({TRUNCATED_HINT})"


def report_rows(report: Report, **extra: Any) -> dict[str, Any]:
    """The engine's summary rows (the truncated count with its hint included), then the
    job's `extra` rows."""
    return {**report.rows(), **extra}
