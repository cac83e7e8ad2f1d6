"""Shared terminal output: one console on stderr, progress bars, end-of-job summaries."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

#: Progress and summaries go to stderr so that stdout stays clean for data (sql --format csv).
console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column formats bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f}/s" if speed else "-/s", style="cyan")


def progress(*extra: Any) -> Progress:
    """A progress bar with done/total, rate, elapsed and ETA; extra columns are appended."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra,
        console=console,
        transient=False,
    )


def summary(title: str, rows: dict[str, Any], sql_hint: str | None = None) -> None:
    """Print a short end-of-job summary: one `key: value` per line, then where to look."""
    console.print(f"[bold green]{title}[/]")
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:,.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        console.print(f"  {key}: {value}")
    if sql_hint:
        console.print(f"  look: factory sql \"{sql_hint}\"")
