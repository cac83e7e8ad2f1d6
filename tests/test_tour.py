"""The README tour (README.md's "## Tour") walked command by command
against the simulated teacher (`factory testing serve`), each as its own subprocess: every
command must exit 0 and say something. Commands that need files, a cluster or minutes of CPU
are listed in tests/tour.py's SKIP with the reason; SHRINK below gives a few long jobs
smaller settings in the walk only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tour import SKIP, TourWalk, skip_reason, strip_comment, tour_commands, tour_text

#: (doc text, what the walk runs instead, why): sizes only, never what a command does
SHRINK: list[tuple[str, str, str]] = [
    ("--target-kept 300", "--target-kept 60", "each kept explanation is embedded"),
    ("--limit 300", "--limit 60", "fewer items and sequences"),
    ("--instances 300", "--instances 60", "fewer ThinkRec instances"),
    ("--epochs 5", "--epochs 1", "an ml-100k epoch is ~40 s on 2 busy cores"),
]


def test_the_tour_parses_and_every_skip_names_a_tour_command() -> None:
    """The walk's SKIP list and the doc agree, and the tour is ml-100k throughout (other
    datasets only where ML-1M's own protocol or the user's files are the point)."""
    commands = [c.line for c in tour_commands()]
    assert len(commands) > 40
    for prefix in SKIP:
        assert any(c.startswith(prefix) for c in commands), \
            f"SKIP {prefix!r} is not in the README's tour"
    for doc, _, _ in SHRINK:
        assert any(doc in c for c in commands), f"SHRINK {doc!r} is not in the README's tour"
    for c in commands:
        for name in re.findall(r"--(?:dataset|to) (\S+)", c):
            assert name == "ml-100k" or skip_reason(c), c
    serve = next(i for i, c in enumerate(commands) if c.startswith("factory testing serve"))
    teacher_jobs = ("factory teacher check", "factory describe-items", "factory explain-i2i",
                    "factory keywords", "factory thinkrec", "factory gvm --",
                    "factory distill teach", "i2i-eval --dataset ml-100k --score")
    assert all(i > serve for i, c in enumerate(commands) if any(j in c for j in teacher_jobs))
    text = tour_text()
    assert "--teacher-model simulated-teacher" in text or "FACTORY_TEACHER_MODEL=simulated" in text


def test_strip_comment_keeps_quoted_hashes() -> None:
    assert strip_comment('factory sql "select 1 # not a comment"  # comment') == \
        'factory sql "select 1 # not a comment"'


@pytest.mark.slow
@pytest.mark.tour
def test_walk_the_tour(tmp_path: Path) -> None:
    """Every tour command, in order, in one working directory (./factory.duckdb)."""
    walk = TourWalk(tmp_path)
    failures, ran = [], []
    try:
        for cmd in tour_commands():
            if skip_reason(cmd.line):
                continue
            line = cmd.line
            for doc, small, _ in SHRINK:
                line = line.replace(doc, small)
            result = walk.run(line)
            ran.append((line, round(result.seconds, 1)))
            target = re.search(r"--out (\S+)|> (\S+)$|^cp \S+ (\S+)$", line)
            produced = target and any(tmp_path.glob(next(filter(None, target.groups())) + "*"))
            if result.rc != 0 or not (result.output.strip() or produced):
                failures.append(f"{line}\n  rc={result.rc}: {result.output[-600:]}")
    finally:
        walk.close()
    assert not failures, "\n".join(failures)
    assert len(ran) > 35
