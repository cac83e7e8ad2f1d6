"""Several samples in one request (--n-per-request, OpenAI `n`) and logprobs (--logprobs),
against the local OpenAI-compatible test server over real HTTP.

The server records, per request, the request each choice answers as if asked alone
(`Record.choices`): one key per sample whichever way it was asked, so the tests count on the
server side what was paid for, sample by sample.
"""

from __future__ import annotations

import json

import pytest

from factory.prompts import parse_prompt
from factory.teacher import Sampling, TeacherJob, TeacherOptions, Work
from factory.teacher.request import Request, split_count
from factory.testing.openai_server import MALFORMED_CONTENT, Faults, OpenAIServer, token_logprobs
from factory.warehouse import Warehouse

PROMPT = parse_prompt("question", """{#
purpose: test prompt
output: a sentence
source: tests
#}
{% block user %}Question number {{ n }}: tell me something.{% endblock %}
""")

ANSWERS = ("create table answers (item varchar not null, sample_no integer, answer varchar,"
           " work_key varchar not null, call_key varchar, run_id varchar, prompt_name varchar,"
           " prompt_hash varchar, backend varchar, model varchar, sample integer,"
           " draws integer, cached boolean, status varchar, error varchar,"
           " primary key (item, work_key))")
SAMPLES = 4


def works(items: int, samples: range = range(SAMPLES)) -> list[Work]:
    """A GVM-like job: several samples (differing only in Work.sample) of each item."""
    return [Work(id=f"q{i}/{k}", vars={"n": i}, sample=k) for i in range(items) for k in samples]


def parse(text: str) -> str:
    if len(text.split()) < 3:
        raise ValueError(f"not an answer: {text!r}")
    return text


def options(server: OpenAIServer, **kw) -> TeacherOptions:
    base = dict(url=server.url, model="test-model", timeout=5.0, backoff=0.01, concurrency=4,
                sampling=Sampling(temperature=0.7, seed=3))
    base.update(kw)
    return TeacherOptions(**base)


@pytest.fixture()
def answers(wh: Warehouse) -> Warehouse:
    with wh.write() as con:
        con.execute(ANSWERS)
    return wh


def run(wh: Warehouse, opts: TeacherOptions, items: list[Work], outcomes: list | None = None):
    def row(o):
        if outcomes is not None:
            outcomes.append(o)
        return {"item": o.work.id, "sample_no": o.work.sample, "answer": o.value}

    with TeacherJob(wh, "test-job", dataset=None, options=opts) as job:
        return job.run(items, prompt=PROMPT, parse=parse, table="answers", row=row)


def rows(wh: Warehouse, sql: str) -> list[tuple]:
    with wh.read() as con:
        return con.execute(sql).fetchall()


def asked(server: OpenAIServer) -> list[str]:
    """Every sample asked, one key per choice of each answered request (repeats included)."""
    return [c for r in server.records if r.outcome == "ok" for c in r.choices]


CALLS = ("select key, sample, draw, request, status, text, finish_reason from llm_calls"
         " order by key")


def test_n_per_request_asks_each_items_samples_in_one_request_stored_as_singles(
        tmp_path, openai_server):
    """4 samples x 3 items with --n-per-request 4: 3 requests (n=4), 12 rows with the keys,
    canonical requests and answers that 12 single requests give; the prompt's tokens are
    charged once per request and the rows add up to each request's usage."""
    single, grouped = Warehouse(tmp_path / "single.duckdb"), Warehouse(tmp_path / "n.duckdb")
    for wh in (single, grouped):
        with wh.write() as con:
            con.execute(ANSWERS)
    alone = run(single, options(openai_server), works(3))
    singles = list(openai_server.records)
    openai_server.reset()
    together = run(grouped, options(openai_server, n_per_request=4), works(3))
    assert (alone.requests, together.requests) == (12, 3)
    assert [r.body.get("n") for r in openai_server.records] == [4, 4, 4]
    assert (together.ok, together.cached) == (12, 0)
    # the same samples asked, the same answers stored under the same keys
    assert sorted(asked(openai_server)) == sorted(c for r in singles for c in r.choices)
    assert rows(grouped, CALLS) == rows(single, CALLS)
    assert rows(grouped, "select item, answer, call_key, work_key, sample, cached from answers"
                         " order by item") == \
        rows(single, "select item, answer, call_key, work_key, sample, cached from answers"
                     " order by item")
    # each request once in SQL: group_key and choice; the prompt charged once
    groups = rows(grouped, "select group_key, list(choice order by choice), list(sample order"
                           " by choice), sum(input_tokens), sum(output_tokens), sum(cost_usd)"
                           " from llm_calls group by 1 order by 1")
    assert len(groups) == 3 and all(g[0] is not None for g in groups)
    assert all(g[1] == [0, 1, 2, 3] and g[2] == [0, 1, 2, 3] for g in groups)
    per_single = rows(single, "select sum(input_tokens), sum(output_tokens) from llm_calls")[0]
    assert sum(g[3] for g in groups) * 4 == per_single[0]        # prompt paid 1x, not 4x
    assert sum(g[4] for g in groups) == per_single[1]            # completions the same
    assert (together.input_tokens, together.output_tokens) == (
        sum(g[3] for g in groups), sum(g[4] for g in groups))
    assert rows(grouped, "select count(*) from llm_calls where choice > 0 and input_tokens <> 0"
                ) == [(0,)]
    # each row keeps its own choice of the body, not the 4-choice body 4 times
    bodies = rows(grouped, "select choice, response from llm_calls")
    for choice, response in bodies:
        data = json.loads(response)
        assert [c["index"] for c in data["choices"]] == [choice]


def test_switching_between_singles_and_n_never_pays_twice(answers, openai_server):
    run(answers, options(openai_server), works(2))
    assert openai_server.count() == 8
    again = run(answers, options(openai_server, n_per_request=4), works(2))
    assert (again.requests, again.cached, openai_server.count()) == (0, 8, 8)
    # and the other way: samples first asked together are cached for single requests
    more = run(answers, options(openai_server, n_per_request=4), works(4))
    assert (more.requests, openai_server.count()) == (2, 10)
    last = run(answers, options(openai_server), works(4))
    assert (last.requests, last.cached) == (0, 16)


def test_cached_samples_are_not_asked_again(answers, openai_server):
    """Samples 1 and 3 cached: one request with n=2 for 0 and 2; 3 of 4 cached: the last one
    alone, as an ordinary single request."""
    first = [w for w in works(2) if w.id in ("q0/1", "q0/3", "q1/0", "q1/1", "q1/2")]
    run(answers, options(openai_server), first)
    openai_server.reset()
    report = run(answers, options(openai_server, n_per_request=4), works(2))
    bodies = sorted((r.body["messages"][-1]["content"], r.body.get("n")) for r in
                    openai_server.records)
    assert bodies == [("Question number 0: tell me something.", 2),
                      ("Question number 1: tell me something.", None)]
    assert (report.requests, report.cached, report.ok) == (2, 5, 8)
    assert rows(answers, "select count(*), count(distinct key) from llm_calls") == [(8, 8)]


def test_identical_items_share_the_n_request(answers, openai_server):
    """Two items with the same prompt and samples (in-flight dedup): one request for both."""
    twice = works(1) + [Work(id=f"again/{w.sample}", vars=w.vars, sample=w.sample)
                        for w in works(1)]
    report = run(answers, options(openai_server, n_per_request=4), twice)
    assert (report.ok, report.requests, openai_server.count()) == (8, 1, 1)
    assert rows(answers, "select count(distinct call_key), count(*) from answers") == [(4, 8)]


def test_n_larger_than_the_samples_left_and_k_smaller_than_the_samples(answers, openai_server):
    """--n-per-request 3 with 4 samples: a request for 3 and one for the 4th."""
    report = run(answers, options(openai_server, n_per_request=3), works(2))
    assert sorted(r.body.get("n") or 1 for r in openai_server.records) == [1, 1, 3, 3]
    assert (report.ok, report.requests) == (8, 4)


def test_dry_run_counts_the_requests_n_makes(answers, openai_server, capsys):
    """3 items x 4 samples, 2 samples of item 0 cached: a request for item 0's other 2 and one
    for each other item (n=4), each prompt estimated once."""
    run(answers, options(openai_server), works(1, range(2)))
    alone = run(answers, options(openai_server, dry_run=True), works(3))
    together = run(answers, options(openai_server, dry_run=True, n_per_request=4), works(3))
    assert openai_server.count() == 2
    err = capsys.readouterr().err
    assert "requests to send: 10" in err and "requests to send: 3" in err
    assert together.input_tokens * 10 == alone.input_tokens * 3


@pytest.mark.parametrize("cap", [1, 2])
def test_a_server_that_answers_fewer_choices_loses_no_sample(answers, cap, capsys):
    """llama.cpp ignores n (1 choice), a provider caps it (2): the unanswered samples are then
    asked one by one, the run says so once, and every sample is stored once."""
    with OpenAIServer(max_choices=cap) as server:
        report = run(answers, options(server, n_per_request=4), works(3))
        assert report.ok == 12
        assert sorted(asked(server)) == sorted(set(asked(server)))     # nothing asked twice
        assert len(asked(server)) == 12
        assert report.requests == 3 + 3 * (4 - cap)
    out = capsys.readouterr().err
    assert out.count(f"answered {cap} of the 4 choices asked") == 1, out
    assert rows(answers, "select count(*) filter (where group_key is not null),"
                         " count(*) filter (where group_key is null) from llm_calls") == [
        (3 * cap, 3 * (4 - cap))]


def test_a_server_refusing_n_is_asked_one_by_one_from_then_on(answers, capsys):
    with OpenAIServer(refuse_n=True) as server:
        report = run(answers, options(server, n_per_request=4, concurrency=1), works(3))
        refused = server.count("400")
    assert report.ok == 12 and refused == 1       # refused once, then never asked with n
    assert report.requests == 13
    assert capsys.readouterr().err.count("refused a request with n=4") == 1


def test_a_rejected_choice_is_redrawn_alone(answers, openai_server):
    """Sample 2's answer is malformed: its redraw (draw 1) is a single request, no n."""
    def responder(body: dict) -> str:
        if body["seed"] == Request.build("test-model", [{"role": "user", "content": "x"}],
                                         Sampling(seed=3), sample=2).param_dict()["seed"]:
            return MALFORMED_CONTENT
        return f"A fine answer for seed {body['seed']}."

    openai_server.responder = responder
    report = run(answers, options(openai_server, n_per_request=4), works(1))
    ns = [(r.body.get("n"), r.body["seed"]) for r in openai_server.records]
    assert [n for n, _ in ns] == [4, None]
    assert (report.ok, report.requests) == (4, 2)
    assert rows(answers, "select sample, draw, group_key is null from llm_calls where draw = 1"
                ) == [(2, 1, True)]
    assert rows(answers, "select draws from answers where item = 'q0/2'") == [(2,)]


def test_faults_hit_the_whole_request_and_retries_lose_nothing(answers):
    with OpenAIServer(faults=Faults(rate=0.5, kinds=("500", "429", "drop"), seed=2)) as server:
        report = run(answers, options(server, n_per_request=4, attempts=10), works(6))
        assert report.ok == 24
        assert server.count("ok") == 6 and server.count() > 6
        assert sorted(asked(server)) == sorted(set(asked(server)))


def test_a_failed_n_request_asks_its_samples_one_by_one(answers, capsys):
    """An n-request that fails after its attempts (every 500 here) is no lost sample: its
    samples are then asked alone."""
    class FailsN(OpenAIServer):
        """Answers 500 to every request with n, as a server overloaded by them might."""

        def _admit(self, key, body, authorized):
            record = super()._admit(key, body, authorized)
            if body.get("n"):
                record.outcome = "500"
            return record

    with FailsN() as server:
        report = run(answers, options(server, n_per_request=4, attempts=2), works(2))
        assert report.ok == 8
        assert server.count("500") == 2 * 2 and server.count("ok") == 8
    assert capsys.readouterr().err.count("a request for 4 samples failed") == 1


def test_the_budget_reserves_the_whole_group(answers, openai_server, tmp_path):
    """--max-cost: an n-request reserves its prompt once and n answers; the run stops before
    the budget would be passed, keeps what it got, and a re-run with more finishes."""
    prices = tmp_path / "prices.toml"
    prices.write_text('version = "t"\n[models."test-model"]\ninput_per_mtok = 100.0\n'
                      'output_per_mtok = 1000.0\n')
    sampling = Sampling(temperature=0.7, seed=3, max_tokens=50)
    # a request for 4 reserves its prompt and 4 x 50 output tokens (~$0.2) until answered
    # (~$0.045 each): the 4th would pass $0.3
    opts = options(openai_server, n_per_request=4, price_table=prices, max_cost=0.3,
                   concurrency=1, sampling=sampling)
    report = run(answers, opts, works(8))
    assert report.stopped and "budget reached" in report.stopped
    assert 0 < report.ok < 32 and report.cost_usd <= 0.3
    assert rows(answers, "select sum(cost_usd) from llm_calls")[0][0] == pytest.approx(
        report.cost_usd)
    done = run(answers, options(openai_server, n_per_request=4, price_table=prices,
                                sampling=sampling), works(8))
    assert done.ok == 32 and done.cached == report.ok
    assert sorted(asked(openai_server)) == sorted(set(asked(openai_server)))


# -- logprobs -------------------------------------------------------------------------------
def test_logprobs_are_asked_stored_and_on_the_outcome(answers, openai_server):
    outcomes: list = []
    opts = options(openai_server, sampling=Sampling(temperature=0.7, seed=3, logprobs=2),
                   n_per_request=2)
    run(answers, opts, works(1, range(2)), outcomes)
    assert [(r.body["logprobs"], r.body["top_logprobs"]) for r in openai_server.records] == [
        (True, 2)]
    stored = rows(answers, "select key, text, logprobs, response from llm_calls order by key")
    for _key, text, logprobs, response in stored:
        expected = [{k: v for k, v in t.items() if k != "bytes"} | {
            "top_logprobs": [{"token": a["token"], "logprob": a["logprob"]}
                             for a in t["top_logprobs"]]} for t in token_logprobs(text, 2)]
        assert json.loads(logprobs) == expected
        assert "logprobs" not in json.loads(response)["choices"][0]   # stored once
    assert {o.call_key: o.logprobs for o in outcomes} == {
        k: json.loads(lp) for k, _, lp, _ in stored}
    # visible in SQL: the first token's probability
    first = rows(answers, "select exp((logprobs->'$[0].logprob')::double) from llm_calls")
    assert all(0.35 <= p <= 1 for (p,) in first)
    # the completion tokens are split by the tokens the logprobs list
    assert rows(answers, "select sum(output_tokens) = sum(json_array_length(logprobs))"
                         " from llm_calls") == [(True,)]
    # logprobs are part of the request: without them, other keys; with them, the cache
    plain = run(answers, options(openai_server), works(1, range(2)))
    assert plain.requests == 2
    outcomes.clear()
    again = run(answers, opts, works(1, range(2)), outcomes)
    assert again.cached == 2 and all(o.logprobs for o in outcomes)


def test_split_count_adds_up() -> None:
    assert split_count(10, [1, 1, 1]) == [3, 4, 3]
    assert sum(split_count(7, [5.0, 0.0, 2.0])) == 7
    assert split_count(None, [1, 2]) == [None, None]
    assert split_count(5, [0, 0]) == [2, 3]
    assert sum(split_count(1000, [3.3, 1.1, 7.7])) == 1000


# -- kill -9 --------------------------------------------------------------------------------
#: a GVM-like job in its own process: 150 items x 4 samples, 4 to a request
SAMPLES_JOB = r"""
import sys
from factory.prompts import parse_prompt
from factory.teacher import Sampling, TeacherJob, TeacherOptions, Work
from factory.warehouse import Warehouse

wh = Warehouse(sys.argv[1])
with wh.write() as con:
    con.execute("create table if not exists answers (item varchar, answer varchar,"
                " work_key varchar, call_key varchar, run_id varchar, prompt_name varchar,"
                " prompt_hash varchar, backend varchar, model varchar, sample integer,"
                " draws integer, cached boolean, status varchar, error varchar,"
                " primary key (item, work_key))")
prompt = parse_prompt("q", "{#\npurpose: t\noutput: t\nsource: t\n#}\n"
                           "{% block user %}Question {{ n }}{% endblock %}")
opts = TeacherOptions(url=sys.argv[2], model="m", concurrency=8, n_per_request=4,
                      sampling=Sampling(temperature=0.7, seed=1))
works = [Work(id=f"q{i}/{k}", vars={"n": i}, sample=k) for i in range(150) for k in range(4)]
with TeacherJob(wh, "samples-job", dataset=None, options=opts) as job:
    job.run(works, prompt=prompt, parse=str.strip, table="answers",
            row=lambda o: {"item": o.work.id, "answer": o.value})
"""


def test_kill_9_loses_no_choice_received(tmp_path):
    """kill -9 after 20 n-requests were answered (the server holds the rest): each of their 80
    choices is a line of the run's journal, and the re-run imports them and asks none again."""
    import signal
    import subprocess
    import sys

    from test_durable import env, wait_until

    from factory.teacher.journal import journal_dir, read_journal

    script = tmp_path / "job.py"
    script.write_text(SAMPLES_JOB)
    wh = Warehouse(tmp_path / "factory.duckdb")

    def journaled() -> list[dict]:
        return [row for path in journal_dir(wh.path).glob("*.jsonl")
                for row in read_journal(path)]

    with OpenAIServer() as server:
        server.hold_after(20)
        cmd = [sys.executable, str(script), str(wh.path), server.url]
        job = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: len(journaled()) >= 80, "80 journaled answers", job)
            job.send_signal(signal.SIGKILL)
            job.wait(timeout=30)
        finally:
            if job.poll() is None:
                job.kill()
        rows_ = journaled()
        server.release()
        before = set(asked(server))
        seen = len(server.records)
        rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        again = [c for r in server.records[seen:] if r.outcome == "ok" for c in r.choices]
    assert len(rows_) == 80 and len({r["key"] for r in rows_}) == 80
    assert sorted(r["choice"] for r in rows_) == sorted([0, 1, 2, 3] * 20) and all(
        r["group_key"] for r in rows_)
    assert len(before) == 80 and not before & set(again)
    assert rows(wh, "select count(*), count(distinct key) from llm_calls"
                    " where status = 'ok'") == [(600, 600)]


# -- in-process backends --------------------------------------------------------------------
def test_transformers_backend_generates_n_choices_with_the_models_logprobs(answers):
    """In-process: a group of 3 samples is one generate call over the prompt repeated 3 times;
    the logprobs are the model's own (a teacher-forced forward pass agrees), and the engine
    stores 3 rows per item, the prompt's tokens on choice 0."""
    import torch
    from test_vllm import tiny_llama

    from factory.teacher.backends import TransformersBackend, chat_prompt_ids

    tok, model = tiny_llama()
    backend = TransformersBackend("tiny", batch_size=4)
    backend._tokenizer, backend._model, backend._loaded = tok, model, True
    batches: list[int] = []
    generate = model.generate
    model.generate = lambda **kw: batches.append(len(kw["input_ids"])) or generate(**kw)
    sampling = Sampling(temperature=1.0, seed=5, max_tokens=6, logprobs=2)
    opts = TeacherOptions(n_per_request=3, sampling=sampling, parse_retries=0)
    outcomes: list = []
    with TeacherJob(answers, "test-job", dataset=None, options=opts, backend=backend) as job:
        report = job.run(works(2, range(3)), prompt=PROMPT, parse=lambda t: t, table="answers",
                         row=lambda o: outcomes.append(o) or {"item": o.work.id,
                                                              "answer": o.value})
    assert report.requests == 2 and sum(batches) == 6 and len(outcomes) == 6
    stored = rows(answers, "select group_key, choice, input_tokens, output_tokens, logprobs,"
                           " request from llm_calls order by group_key, choice")
    assert [(c, i > 0) for _, c, i, _, _, _ in stored] == [(0, True), (1, False), (2, False)] * 2
    for o in outcomes:
        req = Request.build("tiny", PROMPT.render(**o.work.vars), sampling, o.work.sample)
        assert o.call_key == req.key and len(o.logprobs) <= 6
        assert all(len(t["top_logprobs"]) == 2 for t in o.logprobs)
        prompt = chat_prompt_ids(tok, req.message_dicts())
        drawn = [tok.convert_tokens_to_ids(t["token"].strip()) for t in o.logprobs]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + drawn])).logits[0]
        expected = torch.log_softmax(logits.float(), -1)[len(prompt) - 1:-1]
        got = [t["logprob"] for t in o.logprobs]
        assert got == pytest.approx(expected.gather(1, torch.tensor(drawn)[:, None])[:, 0]
                                    .tolist(), abs=1e-4)
        for t, row in zip(o.logprobs, expected, strict=True):    # the top-2, best first
            assert [a["logprob"] for a in t["top_logprobs"]] == pytest.approx(
                row.topk(2).values.tolist(), abs=1e-4)
    assert sum(len(o.logprobs) for o in outcomes) > 6


def test_vllm_backend_asks_n_and_logprobs_in_its_sampling_params(monkeypatch):
    from test_vllm import llama3_style_tokenizer, stub

    from factory.teacher.backends import VLLMBackend

    rec = stub(monkeypatch, llama3_style_tokenizer(), answer=lambda ids: "a fine answer")
    backend = VLLMBackend("/models/llama3-like")
    backend._load()
    members = [Request.build("m", [{"role": "user", "content": "hi"}],
                             Sampling(temperature=0.7, seed=1, logprobs=2), sample=k)
               for k in range(3)]
    [reply] = backend._generate([Request.group(members)])
    params = rec.sampling[0]
    assert (params.n, params.logprobs, params.seed) == (3, 2, 1)
    assert [c.text for c in reply.choices] == [
        "a fine answer", "a fine answer (choice 1)", "a fine answer (choice 2)"]
    assert [c.input_tokens > 0 for c in reply.choices] == [True, False, False]
    assert reply.output_tokens == sum(c.output_tokens for c in reply.choices)
    for choice in reply.choices:
        assert "".join(t["token"] for t in choice.logprobs) == choice.text
        assert all(len(t["top_logprobs"]) == 2 for t in choice.logprobs)
        assert json.loads(choice.raw)["choices"][0]["message"]["content"] == choice.text
    backend.shutdown()


@pytest.mark.slow
def test_embedded_smollm2_answers_n_choices_with_logprobs(answers):
    """The real in-process model: 2 samples in one batch, tokens whose logprobs spell each
    answer (so a token can be found by its place in the text)."""
    from factory.teacher.request import token_at

    opts = TeacherOptions(n_per_request=2, parse_retries=0,
                          sampling=Sampling(temperature=0.7, seed=1, max_tokens=16, logprobs=3))
    outcomes: list = []
    with TeacherJob(answers, "test-job", dataset=None, options=opts) as job:
        report = job.run(works(1, range(2)), prompt=PROMPT, parse=lambda t: t,
                         table="answers", row=lambda o: outcomes.append(o) or {
                             "item": o.work.id, "answer": o.value})
    assert report.requests == 1 and len(outcomes) == 2
    assert rows(answers, "select list(choice order by choice), count(distinct group_key)"
                         " from llm_calls") == [([0, 1], 1)]
    for o in outcomes:
        assert o.text and o.logprobs
        assert all(-50 < t["logprob"] <= 0 and len(t["top_logprobs"]) == 3 for t in o.logprobs)
        assert token_at(o.logprobs, o.text, len(o.text) - 1) is not None
