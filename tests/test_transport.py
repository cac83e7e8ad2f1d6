"""The teacher's HTTP transport (aiohttp for chat completions) and the engine's CPU-side
work: the same bodies and the same errors as the openai client gave, and nothing blocking on
the event loop (the journal is written by a thread, the progress bar is not redrawn per item).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from typing import Any

import pytest

from factory.errors import FactoryError
from factory.teacher import TeacherOptions, Work
from factory.teacher import engine as engine_module
from factory.teacher import journal as journal_module
from factory.teacher.backends import OpenAIBackend, _env_proxy, _tls_context
from factory.teacher.journal import Journal, read_journal
from factory.teacher.limits import AttemptTimeout, JobError, RequestError, TransientError
from factory.teacher.request import Request, Sampling
from factory.testing.openai_server import Faults, OpenAIServer, request_key
from tests.test_teacher import ANSWERS, PROMPT, parse

MESSAGES = [{"role": "user", "content": "Describe item 7 in one sentence, 'quoted' é ✓."}]


def request(**sampling: Any) -> Request:
    return Request.build("test-model", MESSAGES, Sampling(**sampling))


def complete(backend: OpenAIBackend, req: Request, timeout: float | None = None) -> Any:
    """One attempt through the aiohttp session, in a loop of its own."""
    async def go() -> Any:
        try:
            return await backend.complete(req, timeout=timeout)
        finally:
            await backend.aclose()
    return asyncio.run(go())


def old_path(backend: OpenAIBackend, req: Request, timeout: float) -> Any:
    """The same attempt as the openai client sent it before (its generic post(), errors
    through translated_errors): what the new transport must match."""
    from factory.teacher.backends import reply_from_body

    async def go() -> Any:
        try:
            with backend.translated_errors(timeout):
                body = await backend.clients[0].post(
                    "/chat/completions", cast_to=str, body=backend.payload(req),
                    options={"timeout": timeout})
            return reply_from_body(body, backend.secrets)
        finally:
            await backend.aclose()
    return asyncio.run(go())


def outcome(call: Any) -> tuple[Any, ...]:
    """(error class, message, status, retry_after) of a call, or ('ok', text)."""
    try:
        reply = call()
    except (TransientError, RequestError, JobError) as exc:
        return (type(exc).__name__, str(exc), getattr(exc, "status", None),
                getattr(exc, "retry_after", None))
    return ("ok", reply.text)


# -- the same requests and answers -----------------------------------------------------------
def test_the_body_sent_is_the_payload_and_the_batch_line_body(openai_server):
    backend = OpenAIBackend(openai_server.url, "test-model", None, 5.0, 4)
    req = request(temperature=0.7, max_tokens=64, seed=3, logprobs=2)
    reply = complete(backend, req)
    sent = openai_server.records[0]
    assert sent.body == backend.payload(req)       # what the batch file holds, too
    assert sent.body["logprobs"] is True and sent.body["top_logprobs"] == 2
    assert sent.path == "/v1/chat/completions"
    assert reply.text.startswith("This canned answer") and reply.finish_reason == "stop"
    assert reply.logprobs and reply.input_tokens and reply.output_tokens


@pytest.mark.parametrize("suffix, path", [("", "/chat/completions"),
                                          ("/v1/", "/v1/chat/completions"),
                                          ("/v1?api-version=2024-01", "/v1/chat/completions"
                                                                      "?api-version=2024-01")])
def test_base_urls_with_or_without_v1_and_a_query(suffix, path):
    with OpenAIServer() as server:
        base = server.url.removesuffix("/v1")
        backend = OpenAIBackend(base + suffix, "test-model", None, 5.0, 2)
        complete(backend, request())
        assert server.records[0].path == path


def test_the_key_is_sent_as_a_bearer_token(openai_server):
    openai_server.api_key = "sk-the-right-key-123"
    ok = OpenAIBackend(openai_server.url, "test-model", "sk-the-right-key-123", 5.0)
    assert complete(ok, request()).text
    wrong = OpenAIBackend(openai_server.url, "test-model", "sk-a-wrong-key-456", 5.0)
    with pytest.raises(JobError, match="refused the credentials"):
        complete(wrong, request())


def test_credentials_in_the_url_are_basic_auth(openai_server):
    """`http://user:pass@host/v1` (the README's form): aiohttp refused the URL's credentials
    beside the bearer header with a traceback; they are sent as basic auth, as httpx did."""
    url = openai_server.url.replace("http://", "http://user:sk-in-the-url-123456@")
    backend = OpenAIBackend(url, "test-model", None, 5.0)
    assert complete(backend, request()).text
    assert "sk-in-the-url-123456" not in backend.describe()
    openai_server.api_key = "sk-in-the-url-123456"      # a bearer key is not what it sends
    with pytest.raises(JobError, match="refused the credentials"):
        complete(OpenAIBackend(url, "test-model", None, 5.0), request())


def test_an_n_request_names_its_samples_seeds(openai_server):
    """The seeds header reaches the server: choice i is answered as sample i alone."""
    backend = OpenAIBackend(openai_server.url, "test-model", None, 5.0)
    members = [Request.build("test-model", MESSAGES, Sampling(seed=5), sample=i)
               for i in range(3)]
    reply = complete(backend, Request.group(members))
    assert len(reply.all_choices()) == 3
    seeds = [m.param_dict()["seed"] for m in members]
    assert openai_server.records[0].choices == [
        request_key({**backend.payload(members[0]), "seed": s}) for s in seeds]


# -- the same errors as the openai client gave -----------------------------------------------
@pytest.mark.parametrize("kind", ["429", "500", "503", "badjson", "malformed"])
def test_faults_map_to_the_same_errors_as_through_the_openai_client(kind):
    with OpenAIServer(faults=Faults(rate=1.0, kinds=(kind,), retry_after=7)) as server:
        new = outcome(lambda: complete(OpenAIBackend(server.url, "test-model", None, 5.0),
                                       request()))
        old = outcome(lambda: old_path(OpenAIBackend(server.url, "test-model", None, 5.0),
                                       request(), 5.0))
    assert new == old
    if kind == "429":
        assert new == ("TransientError", "HTTP 429: Error code: 429 - rate limited", 429, 7.0)
    elif kind == "badjson":
        assert new[:2] == ("TransientError", "malformed response body (not a chat completion)")


def test_a_client_error_fails_the_request_with_the_body_redacted(openai_server, monkeypatch):
    planted = "sk-test-PLANTED-transport-77"
    monkeypatch.setenv("FACTORY_TEACHER_API_KEY", planted)
    openai_server.echo_headers_with_400 = True
    backend = OpenAIBackend(openai_server.url, "test-model", planted, 5.0)
    with pytest.raises(RequestError) as caught:
        complete(backend, request())
    assert caught.value.status == 400 and str(caught.value).startswith("HTTP 400: ")
    assert "\n" not in str(caught.value)
    assert planted not in str(caught.value) + (caught.value.body or "")
    assert "Bearer ***" in (caught.value.body or "")


def test_an_unknown_model_stops_the_job(openai_server):
    openai_server.model_ids = ("served-model",)
    with pytest.raises(JobError, match="does not serve model 'test-model'"):
        complete(OpenAIBackend(openai_server.url, "test-model", None, 5.0), request())


def test_dropped_connections_and_unreachable_servers_are_connection_errors():
    with OpenAIServer(faults=Faults(rate=1.0, kinds=("drop",))) as server, pytest.raises(
            TransientError, match="^connection error: ") as dropped:
        complete(OpenAIBackend(server.url, "test-model", None, 5.0), request())
    assert "\n" not in str(dropped.value)
    with pytest.raises(TransientError, match="^connection error: .*127.0.0.1:9") as refused:
        complete(OpenAIBackend("http://127.0.0.1:9/v1", "m", None, 5.0), request())
    assert "ssl:" not in str(refused.value)           # aiohttp's TLS setting, for plain http


def test_a_proxy_that_cannot_be_reached_is_named(monkeypatch):
    """The connection error names the proxy and the variables (it named only a host the
    user never gave as the teacher's)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTPS_PROXY",
                 "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(TransientError, match=r"^connection error via proxy "
                                             r"http://127\.0\.0\.1:9 \(HTTP_PROXY"):
        complete(OpenAIBackend("http://127.0.0.1:8/v1", "m", None, 5.0), request())


@pytest.mark.parametrize("kind", ["trickle", "hang"])
def test_a_trickling_or_hung_answer_times_out_within_the_attempt(kind):
    with OpenAIServer(faults=Faults(rate=1.0, kinds=(kind,), trickle_s=0.2)) as server:
        backend = OpenAIBackend(server.url, "test-model", None, 30.0)
        with pytest.raises(AttemptTimeout, match=r"^timed out after 0.6s$"):
            complete(backend, request(), timeout=0.6)


# -- TLS and proxies -------------------------------------------------------------------------
def test_one_tls_context_for_the_process():
    async def go() -> Any:
        backend = OpenAIBackend("https://127.0.0.1:1/v1", "m", None, 5.0)
        await backend.start()
        try:
            return backend._session.connector._ssl
        finally:
            await backend.aclose()
    assert asyncio.run(go()) is _tls_context() is _tls_context()


def test_proxies_come_from_the_environment_once(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _env_proxy("https://api.example.com/v1") == (None, None)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:secret@proxy.local:3128")
    proxy, auth = _env_proxy("https://api.example.com/v1")
    assert proxy == "http://proxy.local:3128" and (auth.login, auth.password) == ("user",
                                                                                  "secret")
    assert _env_proxy("http://vllm:8000/v1") == (None, None)      # HTTPS_PROXY only
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert _env_proxy("https://api.example.com/v1") == (None, None)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy.local:1080")
    with pytest.raises(FactoryError, match="only http"):
        _env_proxy("https://api.example.com/v1")


# -- nothing blocking on the event loop ------------------------------------------------------
def _job(wh: Any, server: OpenAIServer, items: int, **kw: Any) -> Any:
    with wh.write() as con:
        con.execute(ANSWERS)
    opts = TeacherOptions(url=server.url, model="test-model", timeout=5.0, backoff=0.01,
                          concurrency=8)
    with engine_module.TeacherJob(wh, "test-job", dataset=None, options=opts, **kw) as job:
        return job.run([Work(id=f"q{i}", vars={"n": i, "text": "what is this?"})
                        for i in range(items)], prompt=PROMPT, parse=parse, table="answers",
                       row=lambda o: {"item": o.work.id, "answer": o.value})


def test_the_journal_is_not_written_on_the_event_loop_thread(wh, openai_server, monkeypatch):
    writers: list[str] = []
    write = os.write

    def spy(fd: int, data: bytes) -> int:
        writers.append(threading.current_thread().name)
        return write(fd, data)
    monkeypatch.setattr(journal_module.os, "write", spy)
    report = _job(wh, openai_server, 40)
    assert report.ok == 40
    assert writers and threading.main_thread().name not in writers   # the loop runs there
    assert set(writers) == {"teacher-journal-write"}


def test_the_progress_bar_is_not_updated_per_item(wh, openai_server, monkeypatch):
    from factory.console import Bars

    advances: list[float] = []
    update = Bars.update

    def spy(self: Bars, task_id: Any, **kwargs: Any) -> None:
        if kwargs.get("advance"):
            advances.append(kwargs["advance"])
        update(self, task_id, **kwargs)
    monkeypatch.setattr(Bars, "update", spy)
    monkeypatch.setattr(engine_module, "PROGRESS_S", 3600.0)
    report = _job(wh, openai_server, 60, flush_s=3600.0)
    assert report.ok == 60
    assert sum(advances) == 60            # the bar's last frame counts every item
    assert len(advances) <= 3             # the first item, the end (and a store in between)


def test_the_journal_writes_what_was_queued_in_order_and_reports_a_full_disk(tmp_path,
                                                                            monkeypatch):
    journal = Journal(tmp_path / "run.jsonl")

    async def answers() -> None:
        for i in range(500):
            journal.append({"key": f"k{i}", "text": "é" * (i % 7)})
            if i % 50 == 0:
                await asyncio.sleep(0)
    asyncio.run(answers())
    journal.append({"key": "after the loop"})     # no loop running: woken at once
    journal.flush()
    assert journal.rows == 501
    journal.close()
    assert [r["key"] for r in read_journal(journal.path)] == [f"k{i}" for i in range(500)] + [
        "after the loop"]

    full = Journal(tmp_path / "full.jsonl")

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(journal_module.os, "write", no_space)
    full.append({"key": "lost to the disk"})
    full.flush()
    assert full.full
    with pytest.raises(OSError, match="No space left"):
        full.append({"key": "next"})
    monkeypatch.undo()
    full.close()


def test_a_body_is_searched_for_secrets_once_and_a_secret_in_it_still_goes(monkeypatch):
    import json

    from factory.teacher.backends import reply_from_body
    from factory.teacher.keys import Secrets

    key = "sk-test-PLANTED-once-31337"
    secrets = Secrets.of_run(key, None)
    searched: list[int] = []
    search = Secrets.redact_values

    def spy(self: Secrets, text: str | None) -> str | None:
        searched.append(len(text or ""))
        return search(self, text)
    monkeypatch.setattr(Secrets, "redact_values", spy)
    clean = json.dumps({"choices": [{"message": {"content": "word " * 2000,
                                                 "reasoning_content": "think " * 2000},
                                     "finish_reason": "stop"}]})
    reply = reply_from_body(clean, secrets)
    assert searched == [len(clean)]                 # the body once; its strings not again
    assert reply.raw == clean and reply.text == "word " * 2000
    leaked = json.dumps({"choices": [{"message": {"content": f"my key is {key}",
                                                  "reasoning_content": f"{key}!"}}]}
                        ).replace("-", "\\u002d")    # escaped in the body, plain when decoded
    reply = reply_from_body(leaked, secrets)
    assert key not in reply.text + (reply.reasoning or "") and "***" in reply.text
    assert key.replace("-", "\\u002d") not in reply.raw and "***" in reply.raw


@pytest.mark.parametrize("script, attempts, expect, counted", [
    (["ok"], 3, "ok", 1),
    ([TransientError("busy", retry_after=0.2), "ok"], 3, "ok", 2),
    ([TransientError("a"), TransientError("b"), TransientError("c"), "ok"], 3, "c", 3),
    ([TransientError("only")], 1, "only", 1),
    ([RequestError("bad", status=400), "ok"], 3, "bad", 1),
])
def test_retries_without_tenacity_on_the_first_attempt_keep_its_policy(script, attempts,
                                                                     expect, counted):
    """The engine's first attempt runs outside tenacity; what follows a failure is exactly
    with_retries: the attempt count, the stop, Retry-After (0.2 s waited)."""
    import time

    from factory.teacher.engine import _retried

    steps, made = list(script), []

    async def once() -> Any:
        step = steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    async def go() -> Any:
        try:
            return await _retried(once, attempts, 0.001, lambda: made.append(1))
        except (TransientError, RequestError) as exc:
            return str(exc)
    started = time.monotonic()
    assert asyncio.run(go()) == expect
    assert len(made) == counted
    if any(getattr(s, "retry_after", None) for s in script):
        assert time.monotonic() - started >= 0.2


def test_https_to_a_plain_http_server_stops_at_once(openai_server):
    """A failed TLS handshake is not retried six times per request: it fails the same way
    every time (https:// given for an http:// server, an untrusted certificate)."""
    url = openai_server.url.replace("http://", "https://")
    with pytest.raises(JobError, match=r"^TLS with https://127\.0\.0\.1:\d+/v1 failed: .*"
                                       r"an http:// server given as https://"):
        complete(OpenAIBackend(url, "test-model", None, 5.0), request())
