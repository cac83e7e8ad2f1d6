"""factory.console's progress: live bars that fit 80 columns on a terminal, plain periodic
lines anywhere else (log files, pipes), one mechanism for every job."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import TextColumn

from factory.console import Bars, clock


def _bars(terminal: bool, now: list[float], **kw: object) -> tuple[Bars, io.StringIO]:
    out = io.StringIO()
    con = Console(file=out, width=80, force_terminal=terminal, color_system=None)
    return Bars(console=con, get_time=lambda: now[0], **kw), out


def test_plain_lines_every_ten_seconds_and_one_at_the_end() -> None:
    now = [0.0]
    bars, out = _bars(False, now)
    with bars:
        task = bars.add_task("describe-items", total=5000)
        for _ in range(50):
            now[0] += 1.0
            bars.advance(task, 24)
        now[0] += 1.0
        bars.update(task, completed=5000)
    assert out.getvalue().splitlines() == [
        "describe-items 240/5,000 24.0/s ETA 3:19",
        "describe-items 480/5,000 24.0/s ETA 3:09",
        "describe-items 720/5,000 24.0/s ETA 2:59",
        "describe-items 960/5,000 24.0/s ETA 2:49",
        "describe-items 1,200/5,000 24.0/s ETA 2:39",
        "describe-items 5,000/5,000 98.0/s in 0:51"]


def test_a_stopped_task_says_so_and_a_new_stage_closes_the_last() -> None:
    now = [0.0]
    bars, out = _bars(False, now, line_every=100.0)
    with bars:
        task = bars.add_task("train epoch 1/2", total=4)
        for _ in range(4):
            now[0] += 2.0
            bars.advance(task)
        bars.reset(task, total=4, description="train epoch 2/2")
        now[0] += 2.0
        bars.advance(task)
    assert out.getvalue().splitlines() == [
        "train epoch 1/2 4/4 0.5/s in 0:08",
        "train epoch 2/2 1/4 -/s stopped after 0:02"]


def test_a_transient_bar_leaves_no_line() -> None:
    now = [0.0]
    bars, out = _bars(False, now, transient=True)
    with bars:
        bars.add_task("x", total=3)
    assert out.getvalue() == ""


def test_bars_fit_80_columns_with_count_rate_and_eta_whole() -> None:
    now = [0.0]
    out = io.StringIO()
    con = Console(file=out, width=80, force_terminal=True, color_system=None)
    bars = Bars(TextColumn("{task.fields[stats]}"), console=con, get_time=lambda: now[0])
    task = bars.add_task("describe-items (2,105 cached) of a long label", total=5000,
                         stats="cached 1,200 · failed 0 · 1,234 tok/s · $0.0123")
    for _ in range(50):
        now[0] += 1.0
        bars.advance(task, 24)
    shown = Console(file=io.StringIO(), width=80, color_system=None)
    with shown.capture() as cap:
        shown.print(bars.get_renderable())
    lines = cap.get().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80
    assert "1,200/5,000" in lines[0] and "24.0/s" in lines[0] and "ETA 2:39" in lines[0]
    assert "━" in lines[0]                       # the bar itself did not vanish


def test_clock() -> None:
    assert (clock(0), clock(158), clock(3723)) == ("0:00", "2:38", "1:02:03")


def test_messages_to_a_pipe_or_log_are_240_columns_unless_columns_says() -> None:
    """A warning in a log stays one line (rich's own default wrapped it at 80)."""
    import os
    import subprocess
    import sys

    probe = "from factory.console import console; print(console.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    for columns, want in ((None, "240"), ("100", "100")):
        run_env = env if columns is None else {**env, "COLUMNS": columns}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == want
