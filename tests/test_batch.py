"""Batch mode (`--mode batch`, `--batch-file`, `--import-batch`): the provider batch cycle over
real HTTP against the test server's files/batches endpoints, the same cache and rows as
online mode, and what a killed, signalled or failing batch leaves behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_data import add_dataset, random_sequences
from typer.testing import CliRunner

from factory.cli import app
from factory.errors import FactoryError
from factory.teacher.cost import PriceTable
from factory.testing.openai_server import BatchPlan, Faults, OpenAIServer
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
ITEMS = 25                              # tiny_data: 25 items with titles
#: a third of the answers malformed (drawn per request body and per time it is seen, so
#: both modes see the same ones): describe-items' parser rejects them and redraws
MALFORMED = Faults(rate=0.3, kinds=("malformed",), seed=3)
FAST = ("--poll-s", "0.02")


@pytest.fixture()
def tiny(tmp_path: Path) -> Warehouse:
    wh = Warehouse(tmp_path / "factory.duckdb")
    add_dataset(wh, "tiny", random_sequences())
    return wh


def copy_of(wh: Warehouse, name: str) -> Warehouse:
    path = wh.path.with_name(name)
    path.write_bytes(wh.path.read_bytes())
    return Warehouse(path)


def job(server: OpenAIServer | None, *extra: str) -> list[str]:
    url = ["--teacher-url", server.url] if server is not None else []
    return ["describe-items", "--dataset", "tiny", *url, "--teacher-model", "m", *extra]


def cli(wh: Warehouse, *args: str):
    return CliRunner().invoke(app, ["--warehouse", str(wh.path), *args])


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def rows(wh: Warehouse, sql: str, params: list | None = None) -> list[tuple]:
    with Warehouse(wh.path, lock_timeout=30).read() as con:
        return con.execute(sql, params).fetchall()


DESCRIPTIONS = ("select item_id, description, status, error, work_key, call_key, draws"
                " from item_descriptions order by item_id")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    for name in ("FACTORY_TEACHER_URL", "FACTORY_TEACHER_API_KEY", "OPENAI_API_KEY"):
        e.pop(name, None)
    return e


def factory(wh: Warehouse, *args: str) -> list[str]:
    return [sys.executable, "-m", "factory", "--warehouse", str(wh.path), *args]


def wait_until(cond, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"waited 60 s for {what}"
        time.sleep(0.02)


# -- the cycle --------------------------------------------------------------------------------
def test_batch_mode_stores_the_rows_of_online_mode_and_never_pays_twice(tiny):
    """Same answers, same rows, as online mode (redraw rounds included); a second batch run
    and a switch to online mode send nothing; one console line per batch status."""
    online_wh = copy_of(tiny, "online.duckdb")
    with OpenAIServer(faults=MALFORMED) as online, OpenAIServer(faults=MALFORMED) as server:
        ok(cli(online_wh, *job(online)))
        out = ok(cli(tiny, *job(server, "--mode", "batch", *FAST)))
        assert len(server.batches) >= 2                    # rejected answers: a redraw round
        assert rows(tiny, DESCRIPTIONS) == rows(online_wh, DESCRIPTIONS)
        assert rows(tiny, "select count(*) from item_descriptions where draws > 1")[0][0] > 0
        first = server.batches["batch_0001"]
        assert len(first.lines) == ITEMS
        for status in ("validating", "in_progress", "finalizing", "completed"):
            assert f"batch batch_0001: {status}" in out
        assert f"requests sent: {server.count()}" in out and "answered from cache: 0" in out
        assert rows(tiny, "select distinct cached from item_descriptions") == [(False,)]
        assert rows(tiny, "select distinct mode from llm_calls") == [("batch",)]
        assert rows(online_wh, "select distinct mode from llm_calls") == [("online",)]
        assert rows(tiny, "select count(*) from teacher_batches where imported_at is null"
                    ) == [(0,)]
        assert rows(tiny, "select params->'teacher'->>'mode' from job_runs"
                    " where job = 'describe-items'") == [("batch",)]
        # the same answers, whichever way they came
        assert {r.key for r in server.records} == {r.key for r in online.records}

        seen, batches = len(server.records), len(server.batches)
        again = ok(cli(tiny, *job(server, "--mode", "batch", *FAST)))
        assert f"answered from cache: {ITEMS}" in again
        ok(cli(tiny, *job(server)))                        # online now: all cached
        assert (len(server.records), len(server.batches)) == (seen, batches)


def test_a_lost_create_answer_and_failing_retrieves_create_one_batch(tiny):
    """The connection drops after the batch was created, and the first retrieves answer 500:
    the engine finds the batch it created instead of creating a second, and retries polls."""
    plan = BatchPlan(lost_creates=1, retrieve_errors=2)
    with OpenAIServer(batch_plan=plan) as server:
        ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "5", *FAST)))
        assert len(server.batches) == 1
        # created validating; two 500s; in_progress, finalizing, completed
        assert server.batches["batch_0001"].retrieves == 2 + 3
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [(5,)]


def test_a_garbled_output_line_is_one_unanswered_request(tiny):
    with OpenAIServer(batch_plan=BatchPlan(garbled_lines=1)) as server:
        out = ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "5", *FAST)))
        assert "1 malformed line(s) skipped (first: line 1)" in out
        assert rows(tiny, "select error from item_descriptions where status = 'failed'") == [
            ("batch batch_0001: no answer to this request in its output",)]
        server.batch_plan = BatchPlan()
        ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "5", *FAST)))
        assert len(server.batches["batch_0002"].lines) == 1
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [(5,)]


def test_more_requests_than_a_batch_holds_go_out_as_several(tiny, monkeypatch):
    from factory.teacher import batch

    monkeypatch.setattr(batch, "MAX_LINES", 10)
    with OpenAIServer() as server:
        ok(cli(tiny, *job(server, "--mode", "batch", *FAST)))
        assert [len(b.lines) for b in server.batches.values()] == [10, 10, 5]
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [
        (ITEMS,)]


def test_each_shard_submits_its_own_requests(tiny):
    with OpenAIServer() as server:
        for shard in ("0/2", "1/2"):
            ok(cli(tiny, *job(server, "--mode", "batch", "--shard", shard, *FAST)))
        lines = [{ln["custom_id"] for ln in b.lines} for b in server.batches.values()]
    assert len(lines) == 2 and not lines[0] & lines[1]
    assert len(lines[0] | lines[1]) == ITEMS
    assert rows(tiny, "select shard, requests from teacher_batches order by shard") == [
        ("0/2", len(lines[0])), ("1/2", len(lines[1]))]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_job_stopped_while_polling_resumes_its_batch(tiny, sig):
    """kill -9 or SIGTERM while the batch runs at the provider: the re-run polls the batch it
    recorded, submits nothing again, and imports every answer once."""
    with OpenAIServer() as server:
        server.hold_batches()
        cmd = factory(tiny, *job(server, "--mode", "batch", *FAST))
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: server.batch_retrieves() >= 3, "polling", proc)
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert list(server.batches) == ["batch_0001"]
        assert server.count() == 0                         # nothing answered yet
        if sig == signal.SIGTERM:
            assert proc.returncode == 143, out
            assert "batch(es) batch_0001 still running at the provider" in out
            assert "Traceback" not in out
        assert rows(tiny, "select status, provider_batch_id, imported_at is null"
                          " from teacher_batches") == [("validating", "batch_0001", True)]

        server.release()
        rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "resuming 1 batch(es)" in rerun.stderr
        assert list(server.batches) == ["batch_0001"]      # not submitted again
        assert server.count("ok") == ITEMS                 # each line answered once
    assert rows(tiny, "select status, count(*) from item_descriptions group by 1") == [
        ("ok", ITEMS)]
    assert rows(tiny, "select count(*), count(distinct batch_id) from llm_calls"
                      " where status = 'ok' and mode = 'batch'") == [(ITEMS, 1)]
    first = rows(tiny, "select status from job_runs where job = 'describe-items'"
                       " order by started_at")[0][0]
    assert first == ("interrupted" if sig == signal.SIGTERM else "died")


def leave_pending(wh: Warehouse, server: OpenAIServer, *extra: str) -> None:
    """A batch run SIGTERMed while its batch runs at `server`: one pending batch recorded."""
    server.hold_batches()
    proc = subprocess.Popen(factory(wh, *job(server, "--mode", "batch", *extra, *FAST)),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_until(lambda: server.batch_retrieves() >= 1, "polling", proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rows(wh, "select count(*) from teacher_batches where imported_at is null") == [(1,)]


def test_online_mode_never_sends_what_a_pending_batch_holds(tiny):
    """SIGTERM while polling, then the same job online: it sends nothing of the batch's,
    says which batch holds its requests in one line and exits 1; --mode batch collects it."""
    with OpenAIServer() as server:
        leave_pending(tiny, server, "--limit", "6")
        proc = subprocess.run(factory(tiny, *job(server, "--limit", "8")), env=env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        error = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(error) == 1, proc.stderr
        assert "6 requests of this run wait in 1 batch(es)" in error[0]
        assert f"--mode batch --teacher-url {server.url}" in error[0]
        assert "--abandon-batches" in error[0]
        assert server.count() == 0 and not [r for r in server.records
                                             if not r.path.startswith("/v1/batches")]
        server.release()
        ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "6", *FAST)))
        assert list(server.batches) == ["batch_0001"]
        assert rows(tiny, "select status from teacher_batches") == [("completed",)]


def test_a_pending_batch_is_polled_only_at_its_own_url(tiny):
    """A batch submitted to server A is not polled at server B (which has a batch of the
    same id): its requests are not sent to B, and one line says which URL it needs."""
    with OpenAIServer() as a, OpenAIServer() as b:
        leave_pending(tiny, a, "--limit", "4")
        out = ok(cli(tiny, *job(b, "--mode", "batch", "--limit", "4", *FAST)))
        assert len(b.batches) == 0
        assert f"collect them with --mode batch --teacher-url {a.url}" in out
        out = ok(cli(tiny, *job(b, "--mode", "batch", "--limit", "6", *FAST)))
        assert "4 requests of this run wait in 1 batch(es)" in out and a.url in out
        assert [len(x.lines) for x in b.batches.values()] == [2]    # batch_0001, the others
        assert a.batches["batch_0001"].retrieves == 1    # only by the first run
        assert rows(tiny, "select count(*) from item_descriptions") == [(2,)]
        a.release()
        ok(cli(tiny, *job(a, "--mode", "batch", "--limit", "4", *FAST)))
        assert list(a.batches) == ["batch_0001"]
    assert rows(tiny, "select status from teacher_batches order by created_at") == [
        ("completed",), ("completed",)]
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [(6,)]


def test_a_batch_the_provider_lost_is_marked_and_its_requests_sent_again(tiny):
    """After a server restart the recorded batch answers 404: the dry run counts its
    requests, the re-run marks it lost (one line) and submits them in a new batch."""
    with OpenAIServer() as server:
        leave_pending(tiny, server, "--limit", "4")
        server.batches.clear()                             # the provider forgot it
        server.release()
        dry = ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "4", "--dry-run")))
        assert [x.split()[-1] for x in dry.splitlines()
                if "waiting in pending batches" in x] == ["4"]
        out = ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "4", *FAST)))
        assert "batch batch_0001: lost (" in out
        assert "its 4 requests are submitted again" in out
        assert [len(b.lines) for b in server.batches.values()] == [4]
    assert rows(tiny, "select status, coalesce(error, '') like '%HTTP 404%' from teacher_batches"
                      " order by created_at") == [("lost", True), ("completed", False)]
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [(4,)]


def test_abandon_batches_gives_up_pending_batches(tiny):
    with OpenAIServer() as server:
        leave_pending(tiny, server, "--limit", "3")
        out = ok(cli(tiny, *job(server, "--limit", "3", "--abandon-batches")))
        assert "--abandon-batches: 1 pending batch(es) of describe-items abandoned (3 " in out
        assert server.count("ok") == 3                     # sent online, paid again
    assert rows(tiny, "select status from teacher_batches") == [("abandoned",)]
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [(3,)]


@pytest.mark.parametrize("end", ["expired", "failed"])
def test_a_batch_that_ends_unanswered_leaves_its_requests_to_the_next_run(tiny, end):
    """An expired batch: the lines it answered are imported, the others fail with the
    reason and go into the next run's batch; a failed batch: every request does."""
    answered = 3 if end == "expired" else 0
    with OpenAIServer(batch_plan=BatchPlan(end=end, answered=answered)) as server:
        result = cli(tiny, *job(server, "--mode", "batch", "--limit", "8", *FAST))
        if end == "failed":                 # no answer at all: the run failed
            assert "all 8 items failed" in str(result.exception)
        else:
            ok(result)
        assert rows(tiny, "select status, error from teacher_batches") == [
            (end, f"batch batch_0001 {end}" + (": injected: batch failed" if end == "failed"
                                               else ""))]
        failed = rows(tiny, "select error from item_descriptions where status = 'failed'")
        assert len(failed) == 8 - answered
        assert all(f"batch_{end}" in e or f"batch batch_0001 {end}" in e for (e,) in failed)

        server.batch_plan = BatchPlan()
        ok(cli(tiny, *job(server, "--mode", "batch", "--limit", "8", *FAST)))
        assert len(server.batches["batch_0002"].lines) == 8 - answered
    assert rows(tiny, "select status, count(*) from item_descriptions group by 1") == [
        ("ok", 8)]


def test_error_lines_are_failed_rows_and_the_next_run_sends_them_again(tiny):
    with OpenAIServer(faults=Faults(rate=0.4, kinds=("500",), seed=1)) as server:
        ok(cli(tiny, *job(server, "--mode", "batch", *FAST)))
        failed = rows(tiny, "select count(*) from llm_calls where status = 'failed'"
                            " and error like 'batch line HTTP 500: injected 500%'")[0][0]
        assert failed > 0
        assert rows(tiny, "select count(*) from item_descriptions where status = 'failed'"
                    ) == [(failed,)]
        server.faults = Faults()
        ok(cli(tiny, *job(server, "--mode", "batch", *FAST)))
        assert len(server.batches["batch_0002"].lines) == failed
    assert rows(tiny, "select count(*) from item_descriptions where status = 'ok'") == [
        (ITEMS,)]


# -- batch files (vllm run_batch) -----------------------------------------------------------
def test_a_batch_file_holds_the_online_bodies_and_its_results_import_once(tiny, tmp_path):
    """--batch-file writes what the online path sends, keyed by the cache key; its results
    (as `vllm run_batch` writes them) fill the cache and the job's rows, once; redraws of
    rejected answers go into the next file."""
    online_wh = copy_of(tiny, "online.duckdb")
    batch_file, results = tmp_path / "out" / "d.jsonl", tmp_path / "results.jsonl"
    with OpenAIServer(faults=MALFORMED) as online, OpenAIServer(faults=MALFORMED) as runner:
        ok(cli(online_wh, *job(online)))
        out = ok(cli(tiny, *job(None, "--batch-file", str(batch_file))))
        assert f"wrote {ITEMS} requests to {batch_file}" in out
        assert (f"python -m vllm.entrypoints.openai.run_batch -i {batch_file} -o "
                f"{tmp_path / 'out' / 'd.results.jsonl'} --model m") in out
        assert rows(tiny, "select count(*) from item_descriptions") == [(0,)]
        lines = [json.loads(x) for x in batch_file.read_text().splitlines()]
        assert {x["custom_id"] for x in lines} == {k for (k,) in rows(
            online_wh, "select key from llm_calls where draw = 0")}
        # a redraw's body is its first draw's (no seed), so the online bodies are these
        assert {json.dumps(x["body"], sort_keys=True) for x in lines} == {
            json.dumps(r.body, sort_keys=True) for r in online.records}
        assert {(x["method"], x["url"]) for x in lines} == {("POST", "/v1/chat/completions")}

        results.write_bytes(runner.run_batch(batch_file.read_bytes()))
        second = tmp_path / "redraws.jsonl"
        out = ok(cli(tiny, *job(None, "--import-batch", str(results),
                                "--batch-file", str(second))))
        assert f"imported {ITEMS} answers and 0 errors from {results}" in out
        next_import = [x for x in out.splitlines() if x.startswith("  factory ")]
        assert next_import == [f"  factory --warehouse {tiny.path} describe-items --dataset tiny "
                               f"--teacher-model m --import-batch "
                               f"{tmp_path / 'redraws.results.jsonl'}"]
        redraws = second.read_text().splitlines()
        assert redraws and len(redraws) < ITEMS
        again = ok(cli(tiny, *job(None, "--import-batch", str(results),
                                  "--batch-file", str(second))))
        assert f"imported 0 answers and 0 errors from {results}; {ITEMS} were in the cache" \
            in again
        # an error line for a request answered already replaces nothing
        answered = json.loads(results.read_text().splitlines()[0])
        answered["response"] = {"status_code": 500, "body": {"error": {"message": "down"}}}
        (tmp_path / "late.jsonl").write_text(json.dumps(answered) + "\n")
        late = ok(cli(tiny, *job(None, "--import-batch", str(tmp_path / "late.jsonl"),
                                 "--batch-file", str(second))))
        assert "imported 0 answers and 0 errors" in late
        assert rows(tiny, "select status from llm_calls where key = ?",
                    [answered["custom_id"]]) == [("ok",)]
        for _ in range(3):               # round after round until nothing is rejected
            results.write_bytes(runner.run_batch(second.read_bytes()))
            out = ok(cli(tiny, *job(None, "--import-batch", str(results),
                                    "--batch-file", str(second))))
            if "wrote" not in out:
                break
        assert "wrote" not in out
    assert rows(tiny, DESCRIPTIONS) == rows(online_wh, DESCRIPTIONS)
    assert rows(tiny, "select count(*) from llm_calls where mode = 'batch'") == rows(
        online_wh, "select count(*) from llm_calls")
    assert rows(tiny, "select distinct kind, status from teacher_batches") == [
        ("file", "imported")]


@pytest.mark.parametrize("mode", [(), ("--mode", "batch")])
def test_an_import_run_submits_nothing(tiny, tmp_path, mode):
    """--import-batch with a --teacher-url (here unreachable) imports, then says in one line
    that the redraws go into the next --batch-file: nothing is uploaded or sent."""
    batch_file, results = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    ok(cli(tiny, *job(None, "--batch-file", str(batch_file))))
    with OpenAIServer(faults=MALFORMED) as runner:
        results.write_bytes(runner.run_batch(batch_file.read_bytes()))
    out = ok(cli(tiny, "describe-items", "--dataset", "tiny", "--teacher-url",
                 "http://127.0.0.1:9/v1", "--teacher-model", "m", *mode,
                 "--import-batch", str(results)))
    assert f"imported {ITEMS} answers" in out
    assert "requests still need an answer" in out and "--batch-file PATH" in out
    assert rows(tiny, "select distinct kind from teacher_batches") == [("file",)]


def test_another_jobs_results_and_imported_rows_belong_to_the_importing_run(tiny, tmp_path):
    batch_file, results = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    ok(cli(tiny, *job(None, "--batch-file", str(batch_file), "--limit", "3")))
    with OpenAIServer() as runner:
        results.write_bytes(runner.run_batch(batch_file.read_bytes()))
    with tiny.write() as con:              # as if a keywords run had written the file
        con.execute("update teacher_batches set job = 'keywords'")
    result = cli(tiny, *job(None, "--import-batch", str(results), "--limit", "3"))
    assert isinstance(result.exception, FactoryError)
    assert "written for keywords on tiny, not describe-items on tiny" in str(result.exception)
    assert rows(tiny, "select count(*) from llm_calls") == [(0,)]
    with tiny.write() as con:
        con.execute("update teacher_batches set job = 'describe-items'")
    ok(cli(tiny, *job(None, "--import-batch", str(results), "--limit", "3")))
    importer = rows(tiny, "select run_id from job_runs where job = 'describe-items'"
                          " order by started_at desc limit 1")
    assert rows(tiny, "select distinct run_id from llm_calls") == importer


def test_testing_run_batch_answers_a_batch_file_with_the_simulated_teacher(tiny, tmp_path):
    batch_file, results = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    ok(cli(tiny, "describe-items", "--dataset", "tiny", "--teacher-model", "simulated-teacher",
           "--limit", "4", "--batch-file", str(batch_file)))
    out = ok(cli(tiny, "testing", "run-batch", "-i", str(batch_file), "-o", str(results)))
    assert f"answered 4 requests of {batch_file}" in out
    answers = [json.loads(x) for x in results.read_text().splitlines()]
    assert [a["response"]["status_code"] for a in answers] == [200] * 4
    assert "simulated" in answers[0]["response"]["body"]["model"]
    missing = cli(tiny, "testing", "run-batch", "-i", str(tmp_path / "no"), "-o", str(results))
    assert "No such file or directory" in str(missing.exception)


def test_bad_results_files_are_one_line_errors_that_import_nothing(tiny, tmp_path):
    batch_file, results = tmp_path / "d.jsonl", tmp_path / "results.jsonl"
    ok(cli(tiny, *job(None, "--batch-file", str(batch_file), "--limit", "3")))
    with OpenAIServer() as runner:
        good = runner.run_batch(batch_file.read_bytes()).decode().splitlines()
    stranger = json.loads(good[1]) | {"custom_id": "not-a-request-of-ours"}
    cases = {
        "unknown": ([good[0], json.dumps(stranger), good[2]],
                    "custom_id 'not-a-request-of-ours' (line 2) is not a request of a batch "
                    "file written by --batch-file to this warehouse; nothing imported"),
        "not json": ([good[0], good[1][:40]], "line 2: not JSON"),
        "no response": ([good[0], good[1], json.dumps({"custom_id": "x"})],
                        "line 3: not a batch output line"),
        "empty": ([], "no lines"),
    }

    def edit(n: int, change) -> list[str]:
        line = json.loads(good[n])
        change(line, line["response"]["body"])
        return [good[0], good[1], good[2]][:n] + [json.dumps(line)] + good[n + 1:]

    usage = "line 3: usage."
    body = "line 3: its body is not a chat completion"
    hand_edited = {
        "usage string": (lambda ln, b: b["usage"].update(completion_tokens="x"), usage),
        "negative": (lambda ln, b: b["usage"].update(prompt_tokens=-5), usage),
        "huge": (lambda ln, b: b["usage"].update(completion_tokens=10**12), usage),
        "float": (lambda ln, b: b["usage"].update(completion_tokens=1.5), usage),
        "1e9": (lambda ln, b: b["usage"].update(completion_tokens=1e9), usage),
        "message string": (lambda ln, b: b["choices"][0].update(message="hi"), body),
        "no choices": (lambda ln, b: b.pop("choices"), body),
        "empty choices": (lambda ln, b: b.update(choices=[]), body),
        "string body": (lambda ln, b: ln["response"].update(body="text"), body),
        "null body": (lambda ln, b: ln["response"].update(body=None), body),
    }
    for name, (change, message) in hand_edited.items():
        cases[name] = (edit(2, change), message)
    other = json.loads(good[0])
    other["response"]["body"]["choices"][0]["message"]["content"] = "another answer"
    cases["duplicate"] = ([good[0], good[1], json.dumps(other)],
                          f"line 3: custom_id {other['custom_id']!r} again (first: line 1)")
    for name, (lines, message) in cases.items():
        results.write_text("".join(x + "\n" for x in lines))
        proc = subprocess.run(factory(tiny, *job(None, "--import-batch", str(results))),
                              env=env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, name
        error = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(error) == 1 and message in error[0], (name, proc.stderr)
        assert f"--import-batch {results}" in error[0]
    assert rows(tiny, "select count(*) from llm_calls") == [(0,)]
    assert rows(tiny, "select count(*) from item_descriptions") == [(0,)]
    missing = cli(tiny, *job(None, "--import-batch", str(tmp_path / "nope.jsonl")))
    assert "No such file or directory" in str(missing.exception)


def test_batch_options_that_cannot_work_are_refused(tiny, tmp_path):
    cases = {
        ("--mode", "batch"): "--mode batch sends OpenAI-compatible requests, not --backend "
                             "transformers",
        ("--batch-file", "x.jsonl", "--teacher-model", ""): "need --teacher-model",
        ("--mode", "batch", "--executor", "ray", "--shards", "2"): "--executor ray",
        ("--import-batch", "r.jsonl", "--dry-run"): "--dry-run imports nothing",
        ("--mode", "batch", "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m",
         "--n-per-request", "4"): "a batch line asks one sample",
    }
    for args, message in cases.items():
        result = cli(tiny, "describe-items", "--dataset", "tiny", *args)
        assert isinstance(result.exception, FactoryError), (args, result.output)
        assert message in str(result.exception), args


# -- prices -----------------------------------------------------------------------------------
def test_batch_answers_cost_batch_prices_and_count_against_the_budget(tiny, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('version = "v1"\nbatch_discount = 0.5\n'
                      '[models.m]\ninput_per_mtok = 100.0\noutput_per_mtok = 400.0\n')
    with OpenAIServer() as server:
        dry = ok(cli(tiny, *job(server, "--mode", "batch", "--dry-run", "--price-table",
                                str(prices))))
        online_dry = ok(cli(tiny, *job(server, "--dry-run", "--price-table", str(prices))))
        assert "(price table v1, batch prices)" in dry
        cost = [float(x.split("$")[1].split()[0]) for x in (dry, online_dry)]
        assert cost[0] == pytest.approx(cost[1] / 2, rel=1e-3)

        # a budget that covers about half the requests at batch prices
        result = cli(tiny, *job(server, "--mode", "batch", "--price-table", str(prices),
                                "--max-cost", f"{cost[0] / 2:.6f}", *FAST))
        assert "budget reached" in ok(result)
        sent = len(server.batches["batch_0001"].lines)
        said = float(result.output.split("budget reached: $")[1].split()[0])
        assert 0 < sent < ITEMS
        priced = rows(tiny, "select input_tokens, output_tokens, cost_usd, price_version"
                            " from llm_calls")
        assert len(priced) == sent
        for n_in, n_out, usd, version in priced:
            assert usd == pytest.approx((n_in * 50.0 + n_out * 200.0) / 1e6)
            assert version == "v1"
        spent = rows(tiny, "select sum(cost_usd) from llm_calls")[0][0]
        assert spent <= cost[0] / 2
        assert said == pytest.approx(spent, abs=1e-4) and said > 0    # not "$0.0000 spent"

    prices.write_text('version = "v2"\n[models.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n')
    dry = ok(cli(tiny, *job(None, "--mode", "batch", "--batch-file", "x.jsonl", "--dry-run",
                            "--price-table", str(prices))))
    assert "it has no batch price: batch priced as online" in dry


def test_price_tables_read_batch_prices(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('version = "v"\nbatch_discount = 0.5\n[models.a]\ninput_per_mtok = 2\n'
                    'output_per_mtok = 4\n[models.b]\ninput_per_mtok = 2\noutput_per_mtok = 4\n'
                    'batch_input_per_mtok = 1.5\nbatch_output_per_mtok = 3\n')
    table = PriceTable.load(path)
    assert (table.batch_price("a").input_per_mtok, table.batch_price("a").output_per_mtok) == (
        1.0, 2.0)
    assert table.batch_price("b").output_per_mtok == 3.0 and table.batch_price("c") is None
    for bad, message in [('batch_discount = 2', "batch_discount must be a number from 0 to 1"),
                         ('[models.a]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
                          'batch_input_per_mtok = 1', "needs numeric batch_input_per_mtok")]:
        path.write_text(f'version = "v"\n{bad}\n')
        with pytest.raises(FactoryError, match=message):
            PriceTable.load(path)


def test_runs_costs_compares_a_kept_row_online_and_in_batch(tiny, tmp_path):
    """`factory runs --costs`: one row per job and way of asking, from the answers stored; the
    same rows kept, batch at half the price per kept row; a re-run answered from the cache
    adds no cost and no kept row."""
    prices = tmp_path / "prices.toml"
    prices.write_text('version = "v1"\nbatch_discount = 0.5\n'
                      '[models.m]\ninput_per_mtok = 100.0\noutput_per_mtok = 400.0\n')
    online, batch = tiny, copy_of(tiny, "batch.duckdb")
    with OpenAIServer(faults=MALFORMED) as server:
        ok(cli(online, *job(server, "--price-table", str(prices))))
        ok(cli(online, *job(server, "--price-table", str(prices))))     # all from the cache
    with OpenAIServer(faults=MALFORMED) as server:        # the same faults as online
        ok(cli(batch, *job(server, "--mode", "batch", "--price-table", str(prices), *FAST)))
    kept = rows(online, "select count(*) from item_descriptions where status = 'ok'")[0][0]
    assert rows(batch, "select count(*) from item_descriptions where status = 'ok'") == [(kept,)]

    def costs(wh: Warehouse) -> dict[str, list[str]]:
        out = ok(CliRunner().invoke(app, ["--warehouse", str(wh.path), "runs", "--costs"],
                                    env={"COLUMNS": "250"}))
        return {ln.split("│")[3].strip(): [c.strip() for c in ln.split("│")[1:-1]]
                for ln in out.splitlines() if "describe-items" in ln}

    on, off = costs(online), costs(batch)
    assert list(on) == ["online"] and list(off) == ["batch"]
    assert on["online"][3] == "2" and off["batch"][3] == "1"             # runs
    assert on["online"][7] == off["batch"][7] == f"{kept}"               # rows kept, once
    paid = rows(online, "select count(*), sum(cost_usd) from llm_calls")[0]
    assert on["online"][4] == f"{paid[0]}"                                # requests stored
    assert float(on["online"][6].lstrip("$")) == pytest.approx(paid[1], abs=1e-4)
    per_kept = float(on["online"][8].lstrip("$")), float(off["batch"][8].lstrip("$"))
    assert per_kept[1] == pytest.approx(per_kept[0] / 2, rel=1e-3)
