"""The teacher engine under the conditions a real run meets: kill -9, SIGTERM, a reader holding
the warehouse, a full disk, a trickling or hung server, bursts of failures, a second process.

Each test counts on the server side (factory.testing.openai_server records every request), so
"nothing answered is requested twice" is checked where it is paid for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from factory.testing.openai_server import Faults, OpenAIServer
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    for name in ("FACTORY_TEACHER_URL", "FACTORY_TEACHER_API_KEY", "OPENAI_API_KEY"):
        e.pop(name, None)
    e.update(extra)
    return e


def job_cmd(wh: Warehouse, server: OpenAIServer, *extra: str) -> list[str]:
    return [sys.executable, "-m", "factory", "--warehouse", str(wh.path), "describe-items",
            "--dataset", "ml-100k", "--teacher-url", server.url, "--teacher-model", "m",
            *extra]


def rows(wh: Warehouse, sql: str) -> list[tuple]:
    with Warehouse(wh.path, lock_timeout=30).read() as con:
        return con.execute(sql).fetchall()


def wait_until(cond, what: str, proc: subprocess.Popen | None = None, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc is None or proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"waited {limit:g}s for {what}"
        time.sleep(0.02)


#: a notebook's idle read-only connection (it gets in between the job's short writes)
READER = """
import duckdb, time
while True:
    try:
        con = duckdb.connect({path!r}, read_only=True)
        break
    except duckdb.Error:
        time.sleep(0.01)
print('held', flush=True)
time.sleep({hold})
"""


def answered(server: OpenAIServer) -> set[str]:
    with server._lock:
        return {r.key for r in server.records if r.outcome == "ok" and r.delivered and r.done}


def received(wh: Warehouse) -> set[str]:
    """Answers the job had recorded when it stopped (stored in llm_calls or in a journal), as
    the 8-character server key each default answer names."""
    import json
    import re

    from factory.teacher.journal import journal_dir

    texts = [t for (t,) in rows(wh, "select text from llm_calls where status = 'ok'")]
    for path in journal_dir(wh.path).glob("*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        texts += [row["text"] for row in lines if row.get("status") == "ok"]
    return {m.group(1) for t in texts if (m := re.search(r"canned answer (\w{8})", t))}


def in_flight(server: OpenAIServer) -> int:
    with server._lock:
        return sum(not r.done for r in server.records)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_signalled_job_resends_at_most_what_was_in_flight(ml100k, sig):
    """kill -9 and SIGTERM at concurrency 16: on resume, no answer the job had recorded is
    re-sent; what is re-sent was in flight at the signal: on the server, or answered and not
    yet read by the job (the old engine re-sent up to a second's worth)."""
    with OpenAIServer(latency=0.1) as server:
        cmd = job_cmd(ml100k, server, "--limit", "400", "--concurrency", "16")
        job = subprocess.Popen(cmd, env=env(FACTORY_STOP_GRACE="5"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: server.count("ok") >= 120, "120 answers", job)
            job.send_signal(sig)
            flying = in_flight(server)
            out, _ = job.communicate(timeout=60)
        finally:
            if job.poll() is None:
                job.kill()
        before = answered(server)
        seen = len(server.records)
        kept = received(ml100k)
        rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        resent = [r for r in server.records[seen:] if r.key in before]
    assert len(kept) >= 100                  # 120 answers had arrived
    assert not {r.key[:8] for r in resent} & kept
    # the server had answered and the job not yet read: in flight from the job's side
    in_transit = len({k[:8] for k in before} - kept)
    assert in_transit <= 16
    assert len(resent) <= flying + in_transit, (len(resent), flying, in_transit)
    assert rows(ml100k, "select status, count(*) from item_descriptions group by 1") == [
        ("ok", 400)]
    first = rows(ml100k, "select status from job_runs where job = 'describe-items'"
                         " order by started_at limit 1")[0][0]
    if sig == signal.SIGTERM:
        assert job.returncode == 143
        assert first == "interrupted"
        lines = [ln for ln in out.splitlines() if "interrupted" in ln]
        assert lines and "re-run the same command to resume" in lines[-1], out
        assert "Traceback" not in out
        assert resent == []          # a SIGTERM waits for what is in flight (5 s grace here)
    else:
        assert first in ("running", "died")      # marked died once liveness lands


def test_a_reader_holding_the_warehouse_loses_nothing(ml100k):
    """A notebook's idle read-only connection, held in another process while the job runs:
    the job keeps its answers, waits, stores them all once the reader lets go."""
    with OpenAIServer(latency=0.02) as server:
        cmd = job_cmd(ml100k, server, "--limit", "300", "--concurrency", "8")
        job = subprocess.Popen(cmd, env=env(FACTORY_LOCK_TIMEOUT="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: server.count("ok") >= 20, "20 answers", job)
            reader = subprocess.Popen(
                [sys.executable, "-c", READER.format(path=str(ml100k.path), hold=6)],
                stdout=subprocess.PIPE, text=True)
            assert reader.stdout.readline().strip() == "held"
            reader.wait(timeout=30)
            out, _ = job.communicate(timeout=120)
        finally:
            for p in (job,):
                if p.poll() is None:
                    p.kill()
        assert job.returncode == 0, out
        keys = [r.key for r in server.records]
    assert len(keys) == len(set(keys))          # nothing paid for twice
    assert rows(ml100k, "select count(*) from item_descriptions where status = 'ok'") == [(300,)]
    assert rows(ml100k, "select count(*) from llm_calls where status = 'ok'") == [(len(keys),)]


def test_failed_writes_keep_every_answer_until_they_succeed(ml100k, openai_server, monkeypatch):
    """Injected write errors (as a lock, a long query or I/O would raise): nothing received is
    dropped, later batches are not discarded, and the run ends with everything stored."""
    from factory.teacher import engine

    real = engine._RunState._write_locked
    failures = {"left": 3}

    def flaky(self, calls, outcomes):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise duckdb.IOException("IO Error: injected write failure")
        return real(self, calls, outcomes)

    monkeypatch.setattr(engine._RunState, "_write_locked", flaky)
    from typer.testing import CliRunner

    from factory.cli import app
    result = CliRunner().invoke(app, ["--warehouse", str(ml100k.path), "describe-items",
                                      "--dataset", "ml-100k", "--limit", "120", "--teacher-url",
                                      openai_server.url, "--teacher-model", "m"])
    assert result.exit_code == 0, result.output
    assert failures["left"] == 0
    assert openai_server.count("ok") == 120
    assert rows(ml100k, "select count(*) from item_descriptions where status = 'ok'") == [(120,)]
    assert rows(ml100k, "select count(*) from llm_calls where status = 'ok'") == [(120,)]


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    where = Path(f"/tmp/factory-tmpfs-{os.getpid()}")
    where.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def test_a_full_disk_stops_with_one_line_and_loses_nothing(ml100k_warehouse):
    """The warehouse on a small tmpfs that fills while the job runs: one line, exit 1, and
    every answer the server delivered is either in llm_calls or imported on the next run."""
    with small_tmpfs("48m") as disk, OpenAIServer(latency=0.01) as server:
        wh = Warehouse(disk / "factory.duckdb")
        shutil.copy(ml100k_warehouse, wh.path)
        filler = disk / "filler"
        server.responder = lambda body: (                   # ~8 KB rows fill it fast
            "This film is a " + "very " * 60 + "good one. " + "x" * 8000)
        cmd = job_cmd(wh, server, "--limit", "1000", "--concurrency", "8")
        job = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: server.count("ok") >= 50, "50 answers", job)
        with open(filler, "wb") as f, contextlib.suppress(OSError):   # take the rest
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        out, _ = job.communicate(timeout=120)
        assert job.returncode == 1, out
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in out, out
        delivered = answered(server)
        filler.unlink()                        # the user frees space and re-runs
        seen = len(server.records)
        rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        resent = [r for r in server.records[seen:] if r.key in delivered]
        assert resent == []
        assert rows(wh, "select count(*) from item_descriptions where status = 'ok'") == [
            (1000,)]


def test_a_trickling_answer_is_bounded_by_timeout(ml100k, openai_server):
    """Headers at once, then a byte every 0.25 s: --timeout bounds the whole attempt, so the
    answer is a failure saying so, not a success stored 70 s later."""
    openai_server.faults = Faults(rate=1.0, kinds=("trickle",), trickle_s=0.25)
    result = subprocess.run(job_cmd(ml100k, openai_server, "--limit", "2", "--timeout", "1",
                                    "--min-tokens-per-s", "64", "--attempts", "1"),
                            env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr     # nothing was answered
    assert rows(ml100k, "select status, error from item_descriptions") == [
        ("failed", "gave up after 1 attempts: no complete answer within 2s (--timeout 1 + 64 "
                   "tokens at --min-tokens-per-s 64)")] * 2
    assert rows(ml100k, "select count(*) from llm_calls where status = 'ok'") == [(0,)]


def test_a_long_generation_is_slow_not_stuck(ml100k, openai_server):
    """Answers that take 1.5 s against --timeout 0.5: the attempt's budget grows with the
    tokens asked for (64 at 32/s: +2 s), so every answer arrives on its first attempt instead
    of six attempts each cut at 0.5 s."""
    openai_server.latency = 1.5
    result = subprocess.run(job_cmd(ml100k, openai_server, "--limit", "4", "--timeout", "0.5",
                                    "--min-tokens-per-s", "32", "--concurrency", "4"),
                            env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(ml100k, "select status, attempts from llm_calls") == [("ok", 1)] * 4
    assert len(openai_server.records) == 4


def test_a_timed_out_attempt_is_retried_once_not_six_times(ml100k, openai_server):
    openai_server.faults = Faults(rate=1.0, kinds=("hang",))
    result = subprocess.run(job_cmd(ml100k, openai_server, "--limit", "2", "--timeout", "0.5",
                                    "--min-tokens-per-s", "128", "--stall-timeout", "60"),
                            env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(openai_server.records) == 4                       # 2 attempts per request
    assert rows(ml100k, "select status, attempts, error from llm_calls") == [
        ("failed", 2, "no complete answer within 1s (--timeout 0.5 + 64 tokens at "
                      "--min-tokens-per-s 128), twice; a slower server needs a lower "
                      "--min-tokens-per-s or a larger --timeout")] * 2


def test_a_hung_server_stops_the_job_at_the_stall_timeout(ml100k, openai_server):
    openai_server.faults = Faults(rate=1.0, kinds=("hang",))
    result = subprocess.run(job_cmd(ml100k, openai_server, "--limit", "50", "--timeout", "30",
                                    "--stall-timeout", "2"),
                            env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no answer from openai m" in result.stdout + result.stderr
    assert "for 2s (--stall-timeout)" in result.stdout + result.stderr
    status = rows(ml100k, "select status from job_runs where job = 'describe-items'")
    assert status == [("failed",)]


def test_the_early_stop_judges_requests_not_attempts(ml100k, openai_server):
    """30% of attempts fail with 500 and every request gets 3 attempts: nearly every request
    succeeds in the end, so the job must not stop early."""
    openai_server.faults = Faults(rate=0.3, kinds=("500",), seed=3)
    result = subprocess.run(job_cmd(ml100k, openai_server, "--limit", "300", "--attempts", "3",
                                    "--concurrency", "16"),
                            env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    done = rows(ml100k, "select count(*) from item_descriptions")[0][0]
    assert done == 300


def test_a_second_run_of_the_same_work_is_refused(ml100k):
    """Two processes, one warehouse, the same job: the second refuses with one line, and no
    request is paid for twice."""
    with OpenAIServer(latency=0.05) as server:
        cmd = job_cmd(ml100k, server, "--limit", "200", "--concurrency", "4")
        first = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: server.count("ok") >= 10, "10 answers", first)
            second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60)
            assert first.wait(timeout=120) == 0
        finally:
            if first.poll() is None:
                first.kill()
        keys = [r.key for r in server.records]
    assert second.returncode == 1
    assert "another describe-items run on ml-100k is running" in second.stdout + second.stderr
    assert len(keys) == len(set(keys)) == 200


def test_merge_folds_in_the_journal_of_a_shard_whose_job_was_killed(ml100k, tmp_path):
    """A shard task killed -9 between flushes: merge brings its journaled answers into the
    main warehouse (without changing the shard), so nothing it was paid for is lost."""
    shard = Warehouse(tmp_path / "shard-0.duckdb")
    shutil.copy(ml100k.path, shard.path)
    with OpenAIServer() as server:
        server.hold_after(30)
        job = subprocess.Popen(job_cmd(shard, server, "--limit", "60", "--concurrency", "4",
                                       "--shard", "0/1"),
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = tmp_path / "shard-0.files" / "journal"

        def journaled() -> int:
            return sum(p.read_bytes().count(b"\n") for p in journal.glob("*.jsonl"))

        try:
            wait_until(lambda: journaled() >= 30, "30 journaled answers", job)
            job.kill()
            job.wait(timeout=30)
        finally:
            if job.poll() is None:
                job.kill()
            server.release()
    before = sorted(p.name for p in journal.iterdir())
    merged = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(ml100k.path),
                             "merge", str(shard.path)], env=env(), capture_output=True,
                            text=True, timeout=120)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert rows(ml100k, "select count(*) from llm_calls where status = 'ok'") == [(30,)]
    assert rows(ml100k, "select status from job_runs where job = 'describe-items'") == [
        ("died",)]
    assert sorted(p.name for p in journal.iterdir()) == before     # the shard is not changed


def test_waiting_on_the_rate_limit_is_not_a_stall(ml100k, openai_server):
    """Requests held back by --rpm are not on the wire: the stall clock does not run for them."""
    result = subprocess.run(job_cmd(ml100k, openai_server, "--limit", "7", "--rpm", "30",
                                    "--timeout", "1", "--stall-timeout", "1"),
                            env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(ml100k, "select count(*) from item_descriptions where status = 'ok'") == [(7,)]


def test_sigterm_while_a_reader_blocks_the_store_exits_143_naming_the_journal(ml100k):
    """SIGTERM while another process holds the warehouse: no minute-long lock waits, exit 143,
    one line naming the journal; the re-run imports it and re-sends nothing answered."""
    with OpenAIServer(latency=0.05) as server:
        cmd = job_cmd(ml100k, server, "--limit", "600", "--concurrency", "8")
        job = subprocess.Popen(cmd, env=env(FACTORY_STOP_GRACE="2"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        reader = None
        try:
            wait_until(lambda: server.count("ok") >= 20, "20 answers", job)
            reader = subprocess.Popen(
                [sys.executable, "-c", READER.format(path=str(ml100k.path), hold=120)],
                stdout=subprocess.PIPE, text=True)
            assert reader.stdout.readline().strip() == "held"
            answered_then = server.count("ok")
            wait_until(lambda: server.count("ok") >= answered_then + 40, "40 more", job)
            job.send_signal(signal.SIGTERM)
            out, _ = job.communicate(timeout=40)    # the old engine waited 60 s per lock
        finally:
            for p in (job, reader):
                if p is not None and p.poll() is None:
                    p.kill()
        assert job.returncode == 143, out
        last = [ln for ln in out.splitlines() if ln.strip()][-1]
        assert "interrupted (SIGTERM)" in out and "safe in" in out, out
        assert "Traceback" not in out, last
        before = answered(server)
        seen = len(server.records)
        rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "marked run" in rerun.stdout + rerun.stderr
        resent = [r for r in server.records[seen:] if r.key in before]
    assert resent == []
    assert rows(ml100k, "select count(*) from item_descriptions where status = 'ok'") == [(600,)]


def test_a_run_where_every_item_failed_is_a_failure(ml100k):
    """19 requests to a port nobody listens on (below the early stop's minimum): exit 1, run
    failed, the failures stored; a Slurm array must not count it as a success."""
    result = subprocess.run(
        [sys.executable, "-m", "factory", "--warehouse", str(ml100k.path), "describe-items",
         "--dataset", "ml-100k", "--limit", "19", "--attempts", "1", "--teacher-url",
         "http://127.0.0.1:9/v1", "--teacher-model", "m"],
        env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "all 19 items failed" in result.stdout + result.stderr
    assert rows(ml100k, "select status from job_runs where job = 'describe-items'") == [
        ("failed",)]
    assert rows(ml100k, "select count(*) from item_descriptions where status = 'failed'") == [
        (19,)]


@pytest.mark.parametrize("args, says", [
    (["sql", ""], "no SQL given"),
    (["describe-items", "--dataset", "ml-100k", "--teacher-url", "http://[::1",
      "--teacher-model", "m"], "is not a URL"),
    (["describe-items", "--dataset", "ml-100k", "--teacher-url", "garbage",
      "--teacher-model", "m"], "is not an http(s) URL"),
])
def test_bad_input_is_one_line(ml100k, args, says):
    result = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(ml100k.path),
                             *args], env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], lines
