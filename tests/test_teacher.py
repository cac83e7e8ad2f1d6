"""The teacher engine against the local OpenAI-compatible test server (real HTTP)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import tenacity

from factory.errors import FactoryError
from factory.prompts import parse_prompt
from factory.teacher import PROVENANCE_COLUMNS, Sampling, TeacherJob, TeacherOptions, Work
from factory.teacher.limits import RateLimiter, TransientError, parse_retry_after, wait_retry_after
from factory.teacher.request import Request
from factory.testing.openai_server import MALFORMED_CONTENT, Faults
from factory.warehouse import Warehouse

PROMPT = parse_prompt("question", """{#
purpose: test prompt
output: a sentence
source: tests
#}
{% block system %}Answer briefly.{% endblock %}
{% block user %}Question number {{ n }}: {{ text }}{% endblock %}
""")

ANSWERS = ("create table answers (item varchar not null, answer varchar, "
           "work_key varchar not null, call_key varchar, run_id varchar, prompt_name varchar,"
           " prompt_hash varchar, backend varchar, model varchar, sample integer,"
           " draws integer, cached boolean, status varchar, error varchar,"
           " primary key (item, work_key))")


def works(n: int, text: str = "what is this?") -> list[Work]:
    return [Work(id=f"q{i}", vars={"n": i, "text": text}) for i in range(n)]


def parse(text: str) -> str:
    if len(text.split()) < 3:
        raise ValueError(f"not an answer: {text!r}")
    return text


def options(server, **kw) -> TeacherOptions:
    base = dict(url=server.url, model="test-model", timeout=2.0, backoff=0.01, concurrency=4)
    base.update(kw)
    return TeacherOptions(**base)


def run_job(wh: Warehouse, opts: TeacherOptions, items: list[Work], **kw):
    with TeacherJob(wh, "test-job", dataset=None, options=opts, **kw) as job:
        return job.run(items, prompt=PROMPT, parse=parse, table="answers",
                       row=lambda o: {"item": o.work.id, "answer": o.value})


@pytest.fixture()
def answers(wh: Warehouse) -> Warehouse:
    with wh.write() as con:
        con.execute(ANSWERS)
    return wh


def rows(wh: Warehouse, sql: str, params: list | None = None) -> list[tuple]:
    with wh.read() as con:
        return con.execute(sql, params or []).fetchall()


# -- keys -----------------------------------------------------------------------------------
def test_request_key_covers_exactly_what_determines_an_answer() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    base = Request.build("m", msgs, Sampling(temperature=0.0, max_tokens=8))
    assert base.key == Request.build("m", msgs, Sampling(temperature=0.0, max_tokens=8)).key
    variants = [
        Request.build("m2", msgs, Sampling(temperature=0.0, max_tokens=8)),
        Request.build("m", [{"role": "user", "content": "hi!"}],
                      Sampling(temperature=0.0, max_tokens=8)),
        Request.build("m", msgs, Sampling(temperature=0.5, max_tokens=8)),
        Request.build("m", msgs, Sampling(temperature=0.0, max_tokens=8), sample=1),
        Request.build("m", msgs, Sampling(temperature=0.0, max_tokens=8), draw=1),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 6
    # a later draw with a fixed seed must not send the same seed again
    seeded = [Request.build("m", msgs, Sampling(seed=7), draw=d).param_dict()["seed"]
              for d in range(3)]
    assert seeded[0] == 7 and len(set(seeded)) == 3


# -- the happy path and the cache -------------------------------------------------------------
def test_answers_are_stored_with_provenance_and_never_requested_twice(answers, openai_server):
    report = run_job(answers, options(openai_server), works(12))
    assert (report.ok, report.failed, report.requests, report.cached) == (12, 0, 12, 0)
    assert openai_server.count() == 12
    stored = rows(answers, "select a.item, a.answer, a.status, a.draws, c.status, c.text,"
                  " c.request->>'model', j.status, j.prompt_name, j.prompt_hash, j.model"
                  " from answers a join llm_calls c on c.key = a.call_key"
                  " join job_runs j on j.run_id = a.run_id order by a.item")
    assert len(stored) == 12
    for _item, answer, status, draws, call_status, text, model, run_status, pname, phash, jm \
            in stored:
        assert answer == text and status == call_status == "ok" and draws == 1
        assert (model, run_status, pname, phash, jm) == (
            "test-model", "succeeded", "question", PROMPT.hash, "test-model")
    cols = {c for (c,) in rows(answers, "select column_name from information_schema.columns"
                                        " where table_name = 'answers'")}
    assert set(PROVENANCE_COLUMNS) <= cols

    again = run_job(answers, options(openai_server), works(12))
    assert (again.ok, again.cached, again.requests) == (12, 12, 0)
    assert openai_server.count() == 12                     # nothing sent again
    replay = run_job(answers, options(openai_server, cache_only=True), works(12))
    assert replay.ok == 12 and openai_server.count() == 12
    refreshed = run_job(answers, options(openai_server, refresh=True), works(12))
    assert refreshed.requests == 12 and openai_server.count() == 24
    assert rows(answers, "select count(*) from llm_calls")[0][0] == 12


def test_identical_requests_in_one_run_are_sent_once(answers, openai_server):
    same = [Work(id=f"dup{i}", vars={"n": 1, "text": "same"}) for i in range(6)]
    report = run_job(answers, options(openai_server), same)
    assert report.ok == 6 and openai_server.count() == 1
    assert rows(answers, "select count(distinct call_key), count(*) from answers") == [(1, 6)]


def test_one_job_can_run_several_rounds(answers, openai_server):
    """Multi-round jobs (ThinkRec reflect turns) call run() again in the same TeacherJob;
    each round has its own event loop, so the backend must reopen its clients."""
    with TeacherJob(answers, "test-job", dataset=None, options=options(openai_server)) as job:
        first = job.run(works(3), prompt=PROMPT, parse=parse, table="answers",
                        row=lambda o: {"item": o.work.id, "answer": o.value})
        second = job.run(works(5, text="and now?"), prompt=PROMPT, parse=parse,
                         table="answers", row=lambda o: {"item": o.work.id, "answer": o.value})
    assert (first.ok, second.ok) == (3, 5)
    assert openai_server.count() == 8
    assert rows(answers, "select count(*) from answers where status = 'ok'") == [(8,)]


def test_cache_only_fails_clearly_on_a_miss_and_sends_nothing(answers, openai_server):
    run_job(answers, options(openai_server), works(3))
    with pytest.raises(FactoryError, match=r"--cache-only: 2 of 5 requests are not in the cache"):
        run_job(answers, options(openai_server, cache_only=True), works(5))
    assert openai_server.count() == 3


def test_dry_run_estimates_and_sends_nothing(answers, openai_server, tmp_path, capsys):
    run_job(answers, options(openai_server), works(4))
    prices = tmp_path / "prices.toml"
    prices.write_text('version = "t1"\n[models."test-model"]\n'
                      'input_per_mtok = 1000.0\noutput_per_mtok = 2000.0\n')
    report = run_job(answers, options(openai_server, dry_run=True, price_table=prices),
                     works(10))
    assert report.dry_run and report.items == 10 and report.cached == 4
    assert report.cost_usd and report.cost_usd > 0
    assert openai_server.count() == 4
    assert rows(answers, "select count(*) from job_runs")[0][0] == 1   # dry runs leave no run
    err = capsys.readouterr().err
    assert "requests to send: 6" in err and "price table t1" in err


# -- failures -------------------------------------------------------------------------------
def test_every_item_is_stored_or_recorded_failed_under_20_percent_faults(answers, openai_server):
    openai_server.faults = Faults(rate=0.2, seed=11, retry_after=0.01, slow_s=0.6)
    report = run_job(answers, options(openai_server, timeout=0.3, concurrency=8), works(80))
    assert report.ok + report.failed == 80 and report.not_done == 0
    stored = rows(answers, "select status, answer, error from answers")
    assert len(stored) == 80
    for status, answer, error in stored:
        assert (status == "ok" and answer and error is None) or \
               (status == "failed" and answer is None and error)
    assert not any(a == MALFORMED_CONTENT for _, a, _ in stored)
    kinds = {r.outcome for r in openai_server.records}
    assert {"429", "503", "slow", "drop", "malformed", "empty", "badjson"} <= kinds
    # retried transport faults show up as attempts; malformed answers as extra draws
    assert rows(answers, "select max(attempts) > 1, max(draw) > 0 from llm_calls") == [(True,
                                                                                        True)]


def test_malformed_answers_are_redrawn_then_recorded_failed(answers, openai_server):
    openai_server.responder = lambda body: (
        "~~" if "never" in body["messages"][-1]["content"] else "a fine answer indeed")
    items = works(3) + [Work(id="bad", vars={"n": 9, "text": "never answered"})]
    report = run_job(answers, options(openai_server), items)
    assert (report.ok, report.failed) == (3, 1)
    assert rows(answers, "select status, answer, draws, error from answers where item = 'bad'"
                ) == [("failed", None, 3, "answer rejected by the parser 3 times; last: "
                       "not an answer: '~~'")]
    assert openai_server.count() == 6                   # 3 good + 3 draws of the bad one
    # the bad answers are cached too: a re-run does not pay for them again
    run_job(answers, options(openai_server), items)
    assert openai_server.count() == 6


def test_client_errors_are_fatal_per_request_and_most_failing_stops_the_job(
        answers, openai_server, monkeypatch, capfd):
    planted = "sk-test-PLANTED-key-7f3a9c"
    monkeypatch.setenv("FACTORY_TEACHER_API_KEY", planted)
    openai_server.echo_headers_with_400 = True          # a careless server echoing our headers
    with pytest.raises(FactoryError, match=r"stopped: \d+ of the last \d+ requests failed") as e:
        run_job(answers, options(openai_server, concurrency=2), works(60))
    assert planted not in str(e.value)
    calls = rows(answers, "select status, attempts, error, response from llm_calls")
    assert calls and all(s == "failed" and a == 1 for s, a, _, _ in calls)   # 400: no retries
    assert all("HTTP 400" in err for _, _, err, _ in calls)
    assert openai_server.count() < 60                    # stopped early
    run = rows(answers, "select status, error from job_runs")[0]
    assert run[0] == "failed" and "requests failed" in run[1]
    out, err = capfd.readouterr()
    files = b"".join(p.read_bytes() for p in Path(answers.path).parent.iterdir()
                     if p.is_file())
    assert planted.encode() not in files and planted not in out + err
    assert b"Bearer ***" in files                        # the echo was stored, scrubbed


def test_a_refused_key_stops_at_once(answers, openai_server, monkeypatch):
    monkeypatch.setenv("FACTORY_TEACHER_API_KEY", "sk-wrong")
    openai_server.api_key = "sk-right"
    with pytest.raises(FactoryError, match="refused the credentials"):
        run_job(answers, options(openai_server, concurrency=2), works(30))
    assert openai_server.count() <= 2
    assert rows(answers, "select count(*) from answers")[0][0] == 0   # no fake failures either


def test_an_unreachable_endpoint_stops_with_a_clear_message(answers):
    opts = TeacherOptions(url="http://127.0.0.1:9/v1", model="m", timeout=10, attempts=2,
                          backoff=0.01, concurrency=8)
    with pytest.raises(FactoryError, match="connection error"):
        run_job(answers, opts, works(40))


# -- budget ---------------------------------------------------------------------------------
def test_budget_stops_cleanly_and_a_rerun_continues_without_paying_twice(
        answers, openai_server, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('version = "2026-01"\n[models."test-model"]\n'
                      'input_per_mtok = 100.0\noutput_per_mtok = 100.0\n')
    # each request is priced at most (input estimate + 16 max tokens) x 1e-4 USD
    opts = options(openai_server, price_table=prices, max_cost=0.02,
                   sampling=Sampling(max_tokens=16), concurrency=2)
    report = run_job(answers, opts, works(20))
    assert report.stopped and "budget reached" in report.stopped
    assert 0 < report.ok < 20 and report.not_done == 20 - report.ok
    assert report.cost_usd <= 0.02
    # the line gives what was spent, with the requests in flight at the stop paid for
    # (it said $0.0000 when the first refusal came before any answer)
    said = float(report.stopped.split("budget reached: $")[1].split()[0])
    assert said == pytest.approx(report.cost_usd, abs=1e-4) and said > 0
    spent = rows(answers, "select sum(cost_usd), min(price_version) from llm_calls")[0]
    assert spent[0] == pytest.approx(report.cost_usd) and spent[1] == "2026-01"
    assert rows(answers, "select status from job_runs")[0][0] == "stopped"
    assert rows(answers, "select count(*) from answers")[0][0] == report.ok
    sent = openai_server.count()
    rest = run_job(answers, opts.with_(max_cost=1.0), works(20))
    assert rest.ok == 20 and rest.cached == report.ok
    assert openai_server.count() == sent + (20 - report.ok)


def test_max_cost_needs_a_price(answers, openai_server):
    with pytest.raises(FactoryError, match="--max-cost needs a price"):
        run_job(answers, options(openai_server, max_cost=1.0), works(2))


# -- sharding -------------------------------------------------------------------------------
def test_shards_partition_the_work_and_merge_idempotently(answers, openai_server, tmp_path):
    import shutil

    from factory.merge import merge_warehouses

    shard_files = []
    for i in range(3):
        path = tmp_path / f"shard{i}.duckdb"
        shutil.copy(answers.path, path)
        run_job(Warehouse(path), options(openai_server, shard=(i, 3)), works(30))
        shard_files.append(path)
    per_shard = [rows(Warehouse(p), "select item from answers") for p in shard_files]
    items = [i for shard in per_shard for (i,) in shard]
    assert sorted(items) == sorted(f"q{i}" for i in range(30))      # disjoint and complete
    assert all(per_shard)
    first = merge_warehouses(answers, shard_files)
    assert sum(c.get("answers", 0) for c in first.values()) == 30
    assert merge_warehouses(answers, shard_files) == {str(p): {} for p in shard_files}
    assert rows(answers, "select count(*), count(distinct run_id) from answers") == [(30, 3)]
    assert rows(answers, "select count(*) from llm_calls")[0][0] == 30
    # the merged warehouse is a complete cache: the unsharded job sends nothing
    sent = openai_server.count()
    assert run_job(answers, options(openai_server), works(30)).cached == 30
    assert openai_server.count() == sent


def test_merge_upgrades_failures_but_never_downgrades(wh, tmp_path):
    from factory.merge import merge_warehouses

    shard = Warehouse(tmp_path / "shard.duckdb")
    for target, statuses in ((wh, ("failed", "ok")), (shard, ("ok", "failed"))):
        with target.write() as con:
            for key, status in zip(("a", "b"), statuses, strict=True):
                con.execute("insert into llm_call_rows (key, model, backend, sample, draw, request,"
                            " status, attempts) values (?, 'm', 'openai', 0, 0, '{}', ?, 1)",
                            [key, status])
    merge_warehouses(wh, [shard.path])
    assert rows(wh, "select key, status from llm_calls order by key") == [("a", "ok"),
                                                                         ("b", "ok")]


# -- limits and retries (no network) --------------------------------------------------------
def test_retry_after_is_honoured_and_parsed() -> None:
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = 1
    state.set_exception((TransientError, TransientError("429", retry_after=7.0), None))
    assert wait_retry_after(initial=0.01, maximum=0.02)(state) == 7.0
    state.set_exception((TransientError, TransientError("500"), None))
    assert wait_retry_after(initial=0.01, maximum=0.02)(state) <= 0.02
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "100000"}) == 300.0
    assert parse_retry_after({}) is None


def test_rate_limiter_spaces_requests(monkeypatch) -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(per_minute=60, clock=lambda: now[0])    # 1/s, a 10 s burst

    async def take(n: int) -> None:
        for _ in range(n):
            await limiter.acquire(1)

    asyncio.run(take(10))
    assert slept == []                                   # the burst
    asyncio.run(take(5))
    assert sum(slept) == pytest.approx(5.0)              # then one per second
    limiter.adjust(-3)                                   # a refund makes room again
    asyncio.run(take(3))
    assert sum(slept) == pytest.approx(5.0)


def test_options_validate_shard_and_contradictions() -> None:
    from factory.teacher.options import parse_shard

    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "-1/4", "a/b", "3"):
        with pytest.raises(FactoryError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(FactoryError, match="contradict"):
        TeacherOptions(cache_only=True, refresh=True)
    params = TeacherOptions(url="http://user:pw@host:8000/v1").as_params()
    assert params["url"] == "http://host:8000/v1" and "pw" not in json.dumps(params)


def test_price_table_errors_are_clear(tmp_path) -> None:
    from factory.teacher.cost import PriceTable

    bad = tmp_path / "p.toml"
    bad.write_text('[models."m"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n')
    with pytest.raises(FactoryError, match="needs a top-level version"):
        PriceTable.load(bad)
    bad.write_text('version = "v"\n[models."m"]\ninput_per_mtok = "x"\n')
    with pytest.raises(FactoryError, match="numeric"):
        PriceTable.load(bad)
    bad.write_text("version = ")
    with pytest.raises(FactoryError, match="not valid TOML"):
        PriceTable.load(bad)


# -- reasoning models -----------------------------------------------------------------------
THOUGHT = "The user asks for item {n}; consider what it is before answering it."


def thinking_teacher(body: dict) -> dict:
    """q0, q1: thinking inline (<think> block; a template-opened block with only </think>);
    q2: thinking in reasoning_content, as vLLM's reasoning parsers and DeepSeek's API send."""
    n = int(body["messages"][-1]["content"].split("number ", 1)[1].split(":", 1)[0])
    thought, answer = THOUGHT.format(n=n), f"Item {n} is a plain test item."
    if n == 0:
        return {"content": f"<think>\n{thought}\n</think>\n\n{answer}"}
    if n == 1:
        return {"content": f"{thought}\n</think>\n\n{answer}"}
    return {"content": answer, "reasoning_content": thought}


def test_thinking_is_stored_apart_and_never_parsed_as_the_answer(answers, openai_server):
    openai_server.responder = thinking_teacher
    seen: list[tuple[str, str | None]] = []

    def parse_with(text: str, reasoning: str | None) -> str:
        assert "think>" not in text and "consider" not in text     # the answer only
        seen.append((text, reasoning))
        return parse(text)

    outcomes = []

    def run(opts):
        with TeacherJob(answers, "test-job", dataset=None, options=opts) as job:
            return job.run(works(3), prompt=PROMPT, parse=parse_with, table="answers",
                           row=lambda o: outcomes.append(o) or {"item": o.work.id,
                                                                "answer": o.value},
                           with_reasoning=True)

    r = run(options(openai_server))
    assert r.ok == 3
    stored = rows(answers, "select a.item, a.answer, c.text, c.reasoning from answers a"
                           " join llm_calls c on c.key = a.call_key order by a.item")
    for n, (item, answer, text, reasoning) in enumerate(stored):
        assert item == f"q{n}" and answer == f"Item {n} is a plain test item."
        assert reasoning == THOUGHT.format(n=n)          # either way, in llm_calls.reasoning
        assert (THOUGHT.format(n=n) in text) == (n < 2)  # text: the content as received
    assert sorted(seen) == sorted((f"Item {n} is a plain test item.", THOUGHT.format(n=n))
                                  for n in range(3))
    assert sorted(o.reasoning for o in outcomes) == [THOUGHT.format(n=n) for n in range(3)]
    # replayed from the cache: the same answer, the same thinking
    seen.clear()
    outcomes.clear()
    r = run(options(openai_server, cache_only=True))
    assert r.cached == 3 and sorted(o.reasoning for o in outcomes) == [
        THOUGHT.format(n=n) for n in range(3)]
    # a parser without with_reasoning gets the answer only too
    with TeacherJob(answers, "test-job", dataset=None,
                    options=options(openai_server, cache_only=True)) as job:
        job.run(works(3), prompt=PROMPT, parse=lambda t: parse_with(t, None), table="answers",
                row=lambda o: {"item": o.work.id, "answer": o.value})
    assert sorted(t for t, _ in seen[-3:]) == [f"Item {n} is a plain test item."
                                               for n in range(3)]


def test_split_reasoning() -> None:
    from factory.teacher.request import split_reasoning

    assert split_reasoning("Yes. Because.") == (None, "Yes. Because.")
    assert split_reasoning("<think>a</think> Yes.") == ("a", "Yes.")
    assert split_reasoning("<THINK>a</Think>Yes.") == ("a", "Yes.")
    assert split_reasoning("a\n</think>\nYes.") == ("a", "Yes.")
    assert split_reasoning("<think>a</think><think>b</think>No.") == ("a\n\nb", "No.")
    assert split_reasoning("<think>still going") == ("still going", "")


def test_migration_022_backfills_inline_thinking() -> None:
    import duckdb

    sql = (Path(__file__).resolve().parent.parent / "warehouse" / "022_llm_reasoning.sql")
    con = duckdb.connect()
    con.execute("create table llm_calls (key varchar, status varchar, text varchar)")
    con.execute("insert into llm_calls values ('a', 'ok', '<think>\n plan \n</think>\nYes'),"
                " ('b', 'ok', 'Yes'), ('c', 'failed', null)")
    con.execute(sql.read_text())
    assert con.execute("select key, reasoning from llm_calls order by key").fetchall() == [
        ("a", "plan"), ("b", None), ("c", None)]


def test_calls_store_each_prompt_once_and_the_answer_once(wh):
    """Samples of one prompt share one llm_prompts row; `response` keeps the body without the
    content (it is `text`); the llm_calls view gives back the canonical request and body."""
    from factory.teacher.request import Request, Sampling
    from factory.teacher.store import cached_answers, write_calls

    msgs = [{"role": "user", "content": "explain \"this\" ,\"model\": é " * 50}]
    reqs = [Request.build("m", msgs, Sampling(temperature=0.5), s) for s in range(3)]
    body = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": "the answer"}}]}
    with wh.write() as con:
        write_calls(con, [{"key": r.key, "model": "m", "backend": "openai", "sample": r.sample,
                           "draw": 0, "request": r.canonical_json(), "status": "ok",
                           "response": json.dumps(body), "text": "the answer", "attempts": 1}
                          for r in reqs])
    assert rows(wh, "select count(*), max(length(messages)) from llm_prompts")[0][0] == 1
    stored = rows(wh, "select max(length(request)), bool_and(content_in_text),"
                      " max(strpos(response, 'the answer')) from llm_call_rows")[0]
    assert stored[0] < 300 and stored[1] and stored[2] == 0
    back = rows(wh, "select key, request, response, prompt from llm_calls order by sample")
    assert [(k, q) for k, q, _, _ in back] == [(r.key, r.canonical_json()) for r in reqs]
    assert json.loads(back[0][2]) == body and back[0][3] == msgs[0]["content"]
    with wh.read() as con:
        assert set(cached_answers(con, [r.key for r in reqs] + ["missing"])) == {
            r.key for r in reqs}
