"""Runs that died do not stay `running`: pid, pid reuse and heartbeat checks, read-only
display, "latest" lookups that skip unfinished runs, and `factory merge` of half runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.errors import FactoryError
from factory.runs import (
    finish_run,
    live_runs,
    liveness,
    process_started,
    reap_dead_runs,
    run_state,
    start_run,
)
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

#: a job in another process: starts a run (and its train_runs row), stores one paid answer
#: and its job row, says the run id, then works on until killed
CHILD = """
import sys, time
from factory.runs import start_run
from factory.teacher.store import write_calls
from factory.warehouse import Warehouse

wh = Warehouse(sys.argv[1])
with wh.write() as con:
    run = start_run(con, sys.argv[2], "toy", {"teacher": {"shard": "1/4"}})
    con.execute("insert into train_runs (run_id, dataset, split, cache_path, backbone, fusion,"
                " status) values (?, 'toy', 'loo', '/nowhere', 'sasrec', 'none', 'running')",
                [run])
    write_calls(con, [{"key": "k-" + run, "model": "m", "backend": "openai", "sample": 0,
                       "draw": 0, "request": "{}", "status": "ok", "text": "paid for",
                       "attempts": 1, "run_id": run}])
    con.execute("insert into item_descriptions values ('toy', 'i1', 'paid for', 'w-' || ?,"
                " 'k-' || ?, ?, 'describe_item', 'h', 'openai', 'm', 0, 1, false, 'ok', null,"
                " current_timestamp)", [run, run, run])
print(run, flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Child:
    """A job process holding a 'running' run in a warehouse."""

    def __init__(self, path: Path, job: str = "describe-items"):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), job],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=_env())
        line = self.proc.stdout.readline().strip()
        assert line, self.proc.stderr.read()
        self.run_id = line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture()
def children():
    started: list[Child] = []

    def start(path: Path, job: str = "describe-items") -> Child:
        child = Child(path, job)
        started.append(child)
        return child

    yield start
    for child in started:
        if child.proc.poll() is None:
            child.kill()


def cli(path: Path, *args: str) -> object:
    return runner.invoke(app, ["--warehouse", str(path), *args])


def rows(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


@contextmanager
def raw(path: Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A plain connection: no migration, no recovery on open."""
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        yield con
    finally:
        con.close()


def status_of(path: Path, run_id: str) -> tuple:
    return rows(path, "select status, finished_at is not null, error from job_runs"
                      " where run_id = ?", [run_id])[0]


def fake_run(wh: Warehouse, job: str = "describe-items", *, host: str | None = None,
             pid: int | None = None, pid_started: float | None = None,
             silent_s: float = 0.0, dataset: str = "toy") -> str:
    """A 'running' row as another process would have left it."""
    with wh.write() as con:
        run = start_run(con, job, dataset, {})
        con.execute("update job_runs set host = ?, pid = ?, pid_started = ?,"
                    " heartbeat_at = current_timestamp::timestamp - to_microseconds(?)"
                    " where run_id = ?",
                    [host, pid, pid_started, int(silent_s * 1e6), run]).fetchall()
    return run


def test_a_killed_job_is_marked_died_by_the_next_command(wh, children) -> None:
    with wh.write():
        pass
    child = children(wh.path)
    child.kill()
    assert status_of(wh.path, child.run_id)[0] == "running"      # nothing wrote since
    # a read-only connection sees it as died, without writing
    con = duckdb.connect(str(wh.path), read_only=True)
    try:
        (row,) = liveness(con, "run_id = ?", [child.run_id])
    finally:
        con.close()
    assert (row.status, run_state(row)) == ("running", "died")
    assert row.death.startswith("pid check: process ")
    # `factory runs` shows it died; the next command that writes marks it, and its train run
    listing = cli(wh.path, "runs")
    assert listing.exit_code == 0, listing.output
    line = next(ln for ln in listing.output.splitlines() if child.run_id in ln)
    assert " died " in line and "pid check" in line
    with Warehouse(wh.path).write():
        pass
    status, finished, error = status_of(wh.path, child.run_id)
    assert (status, finished) == ("died", True)
    assert error.startswith("died (pid check: process ") and "is gone" in error
    assert rows(wh.path, "select status, finished_at is not null from train_runs") == [
        ("died", True)]
    # the paid answer and the job row stay
    assert rows(wh.path, "select count(*) from llm_calls") == [(1,)]


def test_a_live_job_is_never_reaped_and_is_listed_as_live(wh, children, monkeypatch) -> None:
    with wh.write():
        pass
    child = children(wh.path)
    monkeypatch.setenv("FACTORY_RUN_STALE_S", "0.001")   # a live local pid wins over silence
    time.sleep(0.05)
    with Warehouse(wh.path).write() as con:
        mine = start_run(con, "describe-items", "toy", {})
    with raw(wh.path) as con:
        assert reap_dead_runs(con) == []
        live = live_runs(con, "describe-items", "toy")
        assert live_runs(con, "describe-items", "other") == []
        assert live_runs(con, "keywords", "toy") == []
    assert status_of(wh.path, child.run_id)[0] == "running"
    assert status_of(wh.path, mine)[0] == "running"
    assert [(r.run_id, r.host, r.pid, r.shard) for r in live] == [
        (child.run_id, socket.gethostname(), child.proc.pid, "1/4")]      # not our own run
    assert 0 <= live[0].heartbeat_age_s < 60
    from rich.console import Console

    monkeypatch.setattr("factory.cli.stdout_console", lambda: Console(width=110))
    listing = cli(wh.path, "runs")                       # a narrow terminal cuts nothing
    assert listing.exit_code == 0
    line = next(ln for ln in listing.output.splitlines() if child.run_id in ln)
    assert "running (beat" in line and "s ago)" in line


def test_a_silent_run_of_another_host_is_reaped_after_the_bound(wh, monkeypatch) -> None:
    monkeypatch.setenv("FACTORY_RUN_STALE_S", "300")
    lost = fake_run(wh, host="node-lost", pid=4242, silent_s=301)
    quiet = fake_run(wh, host="node-busy", pid=4242, silent_s=200)
    legacy = fake_run(wh, host=None, pid=None, silent_s=400)   # a row from before liveness
    own = fake_run(wh, host=socket.gethostname(), pid=os.getpid(),
                   pid_started=process_started(os.getpid()), silent_s=10_000)
    with raw(wh.path, read_only=True) as con:               # what a reader shows
        shown = {r.run_id: run_state(r) for r in liveness(con)}
    assert shown == {lost: "died", quiet: "running", legacy: "died", own: "running"}
    with raw(wh.path) as con:
        assert sorted(reap_dead_runs(con)) == sorted([lost, legacy])
    status, _, error = status_of(wh.path, lost)
    assert status == "died" and "heartbeat: no sign of life on node-lost for 30" in error
    assert "FACTORY_RUN_STALE_S=300" in error
    assert status_of(wh.path, quiet)[0] == status_of(wh.path, own)[0] == "running"
    # a run taken for dead that shows a sign of life is running again
    from factory.runs import heartbeat
    with Warehouse(wh.path).write() as con:
        heartbeat(con, lost)
    assert status_of(wh.path, lost) == ("running", False, None)


def test_a_reused_pid_does_not_keep_a_dead_run_alive(wh, children) -> None:
    with wh.write():
        pass
    other = children(wh.path, job="keywords")          # a live process with another start
    started = process_started(other.proc.pid)
    reused = fake_run(wh, host=socket.gethostname(), pid=other.proc.pid,
                      pid_started=started - 1000)
    same = fake_run(wh, job="sids", host=socket.gethostname(), pid=other.proc.pid,
                    pid_started=started)
    with raw(wh.path) as con:
        assert reap_dead_runs(con) == [reused]
    status, _, error = status_of(wh.path, reused)
    assert status == "died" and "now belongs to another process" in error
    assert status_of(wh.path, same)[0] == status_of(wh.path, other.run_id)[0] == "running"


def _toy_dataset(wh: Warehouse) -> None:
    with wh.write() as con:
        con.execute("insert into datasets (name, source) values ('toy', 'test')")


def test_latest_lookups_skip_runs_that_did_not_succeed(wh, children) -> None:
    from factory.gvm.report import resolve_run
    from factory.templates import add_discovered, get_template

    _toy_dataset(wh)
    killed = children(wh.path, job="gvm")
    killed.kill()
    show = cli(wh.path, "gvm", "show", "--dataset", "toy")
    assert isinstance(show.exception, FactoryError)
    assert "no finished gvm run for dataset 'toy' (1 that did not finish" in str(show.exception)
    with wh.write() as con:
        done = start_run(con, "gvm", "toy", {})
        add_discovered(con, done, "toy", ["Mine", "Recommend"], "a finished run's")
        finish_run(con, done, "succeeded")
    time.sleep(0.01)
    with wh.write() as con:
        later = start_run(con, "gvm", "toy", {})             # dies after its template
        add_discovered(con, later, "toy", ["Half", "Done"], "a killed run's")
        con.execute("update job_runs set status = 'died' where run_id = ?", [later])
        failed = start_run(con, "gvm", "toy", {})
        finish_run(con, failed, "failed", error="boom")
    with wh.read() as con:
        assert resolve_run(con, "toy", None) == done
        assert resolve_run(con, "toy", later) == later          # still there on request
        assert get_template(con, "discovered", "toy").name == done
        assert get_template(con, later).steps == ("Half", "Done")


def test_merge_refuses_a_live_shard_run_imports_a_dead_one_as_died(wh, children,
                                                                      tmp_path) -> None:
    with wh.write():
        pass
    shard = tmp_path / "shard-1.duckdb"
    shutil.copy(wh.path, shard)
    child = children(shard)
    before = rows(wh.path, "select count(*) from job_runs")
    refused = cli(wh.path, "merge", str(shard))
    assert isinstance(refused.exception, FactoryError)
    message = str(refused.exception)
    assert "\n" not in message and f"its run {child.run_id}" in message
    assert "is still running; wait for it" in message
    assert rows(wh.path, "select count(*) from job_runs") == before
    assert rows(wh.path, "select count(*) from llm_calls") == [(0,)]

    child.kill()
    merged = cli(wh.path, "merge", str(shard))
    assert merged.exit_code == 0, merged.output
    status, finished, error = status_of(wh.path, child.run_id)
    assert (status, finished) == ("died", True) and "found by merge" in error
    assert rows(wh.path, "select status from train_runs") == [("died",)]
    assert rows(wh.path, "select text, run_id from llm_calls") == [("paid for", child.run_id)]
    assert rows(wh.path, "select count(*) from item_descriptions") == [(1,)]
    assert rows(shard, "select status from job_runs") == [("running",)]   # shard not written


def test_merge_upgrades_a_died_run_when_the_shard_run_finished(wh, tmp_path,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("FACTORY_RUN_STALE_S", "60")
    shard = Warehouse(tmp_path / "shard.duckdb")
    run = fake_run(shard, host="node-7", pid=99, silent_s=120)   # node lost, as it seemed
    with wh.write():
        pass
    assert cli(wh.path, "merge", str(shard.path)).exit_code == 0
    assert status_of(wh.path, run)[0] == "died"
    assert cli(wh.path, "merge", str(shard.path)).output.count("nothing new") == 1
    with shard.write() as con:                                     # it was alive after all
        finish_run(con, run, "succeeded", {"items": 3})
    again = cli(wh.path, "merge", str(shard.path))
    assert again.exit_code == 0 and "job_runs 1" in again.output
    assert status_of(wh.path, run) == ("succeeded", True, None)


def test_merge_reads_an_older_shard_without_upgrading_it(wh, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FACTORY_RUN_STALE_S", "60")
    with wh.write():
        pass
    shard = tmp_path / "old.duckdb"
    shutil.copy(wh.path, shard)
    con = duckdb.connect(str(shard))
    for column in ("host", "pid", "pid_started", "heartbeat_at"):    # as before migration 002
        con.execute(f"alter table job_runs drop column {column}")
    con.execute("delete from schema_migrations where version = 2")
    con.execute("insert into job_runs (run_id, job, dataset, status, started_at) values"
                " ('old-run', 'keywords', 'toy', 'running', current_timestamp::timestamp"
                " - interval 5 minutes)")
    con.close()
    merged = cli(wh.path, "merge", str(shard))
    assert merged.exit_code == 0, merged.output
    assert status_of(wh.path, "old-run")[0] == "died"
    assert rows(shard, "select count(*) from schema_migrations where version = 2") == [(0,)]


def test_merge_errors_are_one_line_and_change_nothing(wh, tmp_path) -> None:
    with wh.write() as con:
        run = start_run(con, "describe-items", "toy", {})
        finish_run(con, run, "succeeded")
    good = tmp_path / "good.duckdb"
    shutil.copy(wh.path, good)
    with Warehouse(good).write() as con:
        done = start_run(con, "describe-items", "toy", {})
        finish_run(con, done, "succeeded")
    bad = tmp_path / "typed.duckdb"
    shutil.copy(good, bad)
    con = duckdb.connect(str(bad))
    con.execute("alter table llm_call_rows alter column input_tokens type varchar")
    con.execute("insert into llm_call_rows (key, model, backend, sample, draw, request, status,"
                " attempts, input_tokens) values ('k', 'm', 'openai', 0, 0, '{}', 'ok', 1,"
                " 'many')")
    con.close()
    junk = tmp_path / "notes.duckdb"
    junk.write_text("these are notes, not a warehouse\n" * 100)

    def snapshot() -> list:
        return [rows(wh.path, f"select * from {t} order by all")
                for t in ("job_runs", "llm_calls", "schema_migrations")]

    before = snapshot()
    for shards, expected in [
            ([junk], f"cannot merge {junk}: not a DuckDB database file"),
            ([good, bad], f"cannot merge {bad}: column llm_call_rows.input_tokens is VARCHAR "
                          "there but INTEGER here; nothing was merged from it")]:
        proc = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(wh.path),
                               "merge", *map(str, shards)],
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [f"error: {expected}"]
        assert snapshot() == before            # not even the good shard before the bad one


def test_a_long_step_without_writes_keeps_its_run_alive(wh, monkeypatch) -> None:
    from factory.runs import keep_alive

    monkeypatch.setenv("FACTORY_RUN_STALE_S", "60")
    run = fake_run(wh, "train", host="node-far", pid=1, silent_s=120)
    with raw(wh.path, read_only=True) as con:
        assert [run_state(r) for r in liveness(con)] == ["died"]
    with keep_alive(wh, run, every_s=0.05):
        time.sleep(0.5)
    with raw(wh.path, read_only=True) as con:
        (row,) = liveness(con)
    assert run_state(row) == "running" and row.heartbeat_age_s < 30
