"""Shared terminal output: one console on stderr, progress bars, end-of-job summaries.

Every long step reports through `progress()`: on a terminal a live bar (label, bar, done/total,
rate, ETA) that fits the console's width; anywhere else (a log file, a pipe, Slurm's output) a
plain line per task every `LINE_EVERY_S` seconds and one when it ends, e.g.
`describe-items 1,200/5,000 24.0/s ETA 2:38`, so that logs never hold a redrawn or squashed frame.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Column
from rich.text import Text


def wide_console(stream: IO[str]) -> Console:
    """A console on `stream`: a terminal's own width; piped or logged, 240 columns instead of
    rich's 80 (so a line stays one line in a log), unless COLUMNS says how wide."""
    err = stream is sys.stderr
    if stream.isatty():
        return Console(stderr=err)
    columns = os.environ.get("COLUMNS", "")
    return Console(stderr=err, width=int(columns) if columns.isdigit() and int(columns) > 0
                   else 240)


#: Progress and summaries go to stderr so that stdout stays clean for data (sql --format csv).
console = wide_console(sys.stderr)

#: seconds between two plain progress lines of one task (output that is not a terminal)
LINE_EVERY_S = 10.0


def clock(seconds: float) -> str:
    """2:38, 1:02:03."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def rate(task: Task) -> float | None:
    """Items per second: over the recent window while running, over the whole task once
    finished (one definition for the bar and the plain lines)."""
    if task.finished and task.elapsed:
        return task.completed / task.elapsed
    return task.speed


def count(task: Task) -> str:
    done = f"{int(task.completed):,}"
    return done if task.total is None else f"{done}/{int(task.total):,}"


def timing(task: Task) -> str:
    """`ETA 2:38` while running, `in 3:28` once finished, `0:12` with no total."""
    if task.finished:
        return f"in {clock(task.finished_time or 0)}"
    if task.total is None or not task.started:
        return clock(task.elapsed or 0)
    left = task.time_remaining
    return "ETA -:--" if left is None else f"ETA {clock(left)}"


def status_line(task: Task, extra: list[str] | None = None) -> str:
    """The plain line of one task: `label 1,200/5,000 24.0/s ETA 2:38 [extra]`."""
    r = rate(task)
    parts = [task.description, count(task), f"{r:,.1f}/s" if r else "-/s", timing(task)]
    return " ".join(p for p in [*parts, *(extra or [])] if p)


class _Col(ProgressColumn):
    def __init__(self, render: Callable[[Task], str], style: str = "") -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self._render, self._style = render, style

    def render(self, task: Task) -> Text:
        return Text(self._render(task), style=self._style)


class RateColumn(_Col):
    """Items per second (rich's own speed column formats bytes)."""

    def __init__(self) -> None:
        super().__init__(lambda t: f"{r:,.1f}/s" if (r := rate(t)) else "-/s", "cyan")


class Bars(Progress):
    """rich's Progress with columns that fit 80 columns and, when the console is not a
    terminal, plain periodic lines instead of a live display (whose last frame would land
    squashed in the log). Used as rich's Progress: add_task, advance, update, reset."""

    def __init__(self, *extra: ProgressColumn, console: Console = console,
                 transient: bool = False, line_every: float = LINE_EVERY_S,
                 get_time: Callable[[], float] | None = None) -> None:
        self.plain = not console.is_terminal
        self.line_every = line_every
        self.extra = extra
        self._next_line: dict[TaskID, float] = {}
        self._ended: set[TaskID] = set()
        # the label and the extra columns give way (ellipsis) before the bar vanishes
        label = TextColumn("[bold]{task.description}", table_column=Column(
            no_wrap=True, overflow="ellipsis", max_width=max(12, console.width // 3)))
        for col in extra:
            col._table_column = Column(no_wrap=True, overflow="ellipsis", ratio=1)
        super().__init__(
            label,
            BarColumn(bar_width=None, table_column=Column(ratio=2, min_width=8)),
            _Col(count, "green"), RateColumn(), _Col(timing, "yellow"), *extra,
            console=console, transient=transient, disable=self.plain, expand=True,
            get_time=get_time)

    # -- plain lines ------------------------------------------------------------------
    def _extra_text(self, task: Task) -> list[str]:
        out = []
        for col in self.extra:
            shown = col.render(task)
            out.append(shown.plain if isinstance(shown, Text) else str(shown))
        return out

    def _line(self, task_id: TaskID) -> None:
        if not self.plain or task_id in self._ended:
            return
        task = self._tasks[task_id]
        now = self.get_time()
        if task.finished:
            self._ended.add(task_id)
        elif now < self._next_line.get(task_id, 0.0):
            return
        self._next_line[task_id] = now + self.line_every
        self.console.print(status_line(task, self._extra_text(task)), markup=False,
                           highlight=False, soft_wrap=True)

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0,
                 completed: int = 0, visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        self._next_line[task_id] = self.get_time() + self.line_every
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def reset(self, task_id: TaskID, **kwargs: Any) -> None:
        """A new stage on the same task: the old one's last line first."""
        if self.plain and task_id not in self._ended and self._tasks[task_id].completed:
            self._final(task_id)
        super().reset(task_id, **kwargs)
        self._ended.discard(task_id)
        self._next_line[task_id] = self.get_time() + self.line_every

    def _final(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        line = status_line(task, self._extra_text(task))
        if not task.finished:      # interrupted, failed, or a total that was an estimate
            line = line.replace(timing(task), f"stopped after {clock(task.elapsed or 0)}", 1)
        self._ended.add(task_id)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        super().stop()
        if self.plain and not self.live.transient:     # transient: an error says it all
            for task_id, task in list(self._tasks.items()):
                if task.visible and task_id not in self._ended:
                    self._final(task_id)


def progress(*extra: ProgressColumn, transient: bool = False) -> Bars:
    """Live bars on a terminal, plain periodic lines elsewhere; extra columns are appended."""
    return Bars(*extra, transient=transient)


def summary(title: str, rows: dict[str, Any], sql_hint: str | None = None) -> None:
    """Print a short end-of-job summary: one `key: value` per line, then where to look."""
    # soft_wrap: a log file gets whole lines, and the look: line pastes as one command
    console.print(f"[bold green]{title}[/]", soft_wrap=True)
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:,.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        console.print(f"  {key}: {value}", soft_wrap=True)
    if sql_hint:
        console.print(f"  look: factory sql \"{sql_hint}\"", soft_wrap=True)
