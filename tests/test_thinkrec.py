"""`thinkrec` end to end against the local OpenAI-compatible test server: wrong Yes/No answers
trigger reflect turns that reveal the label, malformed ones are re-drawn, stubborn ones hit
the limit; every instance gets a trace that says how it went."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest

from factory.errors import FactoryError
from factory.teacher import Sampling, TeacherOptions
from factory.testing.simulated import REVEAL, thinkrec_teacher
from jobs.thinkrec import reflect_variant, run_thinkrec

SAMPLE = 30
WORDINGS = ("Reflect on multiple aspects", "Delve into various aspects",
            "Reflect on a variety of aspects")


def options(server, **kw) -> TeacherOptions:
    return TeacherOptions(url=server.url, model="teacher-test", timeout=5.0, backoff=0.01,
                          concurrency=4, sampling=Sampling(seed=1), **kw)


def _rows(wh, sql, params=None):
    with wh.read() as con:
        return con.execute(sql, params or []).fetchall()


def test_thinkrec_end_to_end(ml100k, openai_server):
    openai_server.responder = thinkrec_teacher
    r = run_thinkrec(ml100k, "ml-100k", options(openai_server), sample=SAMPLE,
                     max_reflections=2, history=5)
    assert r["instances"] == SAMPLE
    traces = _rows(ml100k, "select user_id, position, label, history, turns, attempts,"
                           " reflections, label_revealed, prediction, explanation, verdict,"
                           " reason, call_keys, status from thinkrec_traces")
    assert len(traces) == SAMPLE
    parts = dict(((u, p), part) for u, p, part in _rows(
        ml100k, "select user_id, position, part from split_parts where split = 'loo'"))
    labels = dict(((u, p), lab) for u, p, lab in _rows(
        ml100k, "select user_id, position, label from interactions"))
    position = dict(((u, i), p) for u, i, p in _rows(
        ml100k, "select user_id, item_id, position from interactions"))
    seen = {"kept": 0, "revealed": 0, "rejected": 0, "failed": 0}
    for (user, pos, label, history, turns, attempts, reflections, revealed, prediction,
         explanation, verdict, reason, call_keys, status) in traces:
        assert parts[(user, pos)] == "train" and labels[(user, pos)] == label
        history, turns = json.loads(history), json.loads(turns)
        assert 1 <= len(history) <= 5
        for h in history:      # only earlier train interactions, shown with their labels
            assert parts[(user, h_pos := position[(user, h["item_id"])])] == "train"
            assert h_pos < pos and labels[(user, h_pos)] == h["label"]
        roles = [t["role"] for t in turns]
        assert roles[::2] == ["user"] * len(roles[::2]) and set(roles[1::2]) <= {"assistant"}
        assert turns[0]["content"].startswith("A user has given high ratings to the following "
                                              "movies: ")
        assert "(evaluation: " in turns[0]["content"]
        users = [t["content"] for t in turns if t["role"] == "user"]
        assert len(users) == reflections + 1 and len(call_keys) == reflections + 1
        assert revealed == (reflections > 0)
        for k, text in enumerate(users[1:]):       # each reflect turn reveals the true label
            assert REVEAL.match(text).group(1) == ("Yes" if label else "No")
            assert WORDINGS[reflect_variant(user, pos, k) - 1] in text
        if verdict == "kept":
            assert prediction == label and status == "ok" and reason is None
            assert explanation.startswith("Yes. " if label else "No. ")
            assert attempts == reflections + 1
            seen["revealed" if revealed else "kept"] += 1
        elif verdict == "rejected":
            assert reflections == 2 and prediction != label
            assert reason == "still wrong after 2 reflections"
            seen["rejected"] += 1
        else:
            assert status == "failed" and "rejected by the parser" in reason
            seen["failed"] += 1
    assert all(seen.values()), seen
    assert r["traces"]["kept (label revealed)"] == seen["revealed"]
    turns = _rows(ml100k, "select count(*), count(distinct (user_id, position)) from"
                          " thinkrec_turns")[0]
    assert turns[1] == SAMPLE and turns[0] == sum(t[6] + 1 for t in traces)
    view = _rows(ml100k, "select t.entity, t.prompt, t.output, t.verdict, t.input_tokens,"
                         " (select sum(input_tokens) from thinkrec_turns r join llm_calls c"
                         "  on c.key = r.call_key where r.user_id = t.user_id"
                         "  and r.position = t.position) from traces t where t.job = 'thinkrec'")
    assert len(view) == SAMPLE
    for entity, prompt, output, verdict, tokens, turn_tokens in view:
        assert "@" in entity and prompt.startswith("A user has given high ratings")
        assert verdict in ("kept", "rejected", "failed")
        assert (output is not None) == (verdict != "failed")
        assert tokens == turn_tokens       # summed over the conversation's turns
    # a re-run replays every turn from the cache and writes the same traces
    sent = len(openai_server.records)
    before = _rows(ml100k, "select * exclude (created_at, run_id) from thinkrec_traces"
                           " order by all")
    run_thinkrec(ml100k, "ml-100k", options(openai_server, cache_only=True), sample=SAMPLE,
                 max_reflections=2, history=5)
    assert len(openai_server.records) == sent
    assert _rows(ml100k, "select * exclude (created_at, run_id) from thinkrec_traces"
                         " order by all") == before


def test_keywords_appear_in_the_history(ml100k, openai_server):
    with ml100k.write() as con:
        con.execute(
            "insert into item_keywords (dataset, item_id, keywords, verdict, work_key, run_id,"
            " prompt_name, prompt_hash, backend, model, sample, draws, cached, status)"
            " select dataset, item_id, ['kw-' || item_id, 'film'], 'kept', 'w', 'r', 'p', 'h',"
            " 'b', 'm', 0, 1, false, 'ok' from items")
    openai_server.responder = thinkrec_teacher
    run_thinkrec(ml100k, "ml-100k", options(openai_server), sample=3, max_reflections=0)
    for history, turns in _rows(ml100k, "select history, turns from thinkrec_traces"):
        prompt = json.loads(turns)[0]["content"]
        for h in json.loads(history):
            assert h["keywords"] == [f"kw-{h['item_id']}", "film"]
            label = "yes" if h["label"] else "no"
            assert f'"{h["title"]}" (evaluation: {label}) with description: kw-{h["item_id"]}' \
                   f", film" in prompt


def test_sample_is_seeded_and_limited_to_train(ml100k, openai_server):
    from factory.thinkrec import candidates, sample_keys

    with ml100k.read() as con:
        keys = candidates(con, "ml-100k", "loo", part="train")
    assert {k[0] for k in keys} == {"train"}
    assert sample_keys(keys, 10, 1) == sample_keys(keys, 10, 1) != sample_keys(keys, 10, 2)


def test_bad_input(ml100k, openai_server):
    with pytest.raises(FactoryError, match="unknown split"):
        run_thinkrec(ml100k, "ml-100k", options(openai_server), split="nope")
    with ml100k.write() as con:
        con.execute("update interactions set label = null")
    with pytest.raises(FactoryError, match="no yes/no labels"):
        run_thinkrec(ml100k, "ml-100k", options(openai_server))
    assert not openai_server.records


def test_shards_split_instances_and_keep_conversations_whole(ml100k, openai_server):
    openai_server.responder = thinkrec_teacher
    for shard in ((0, 2), (1, 2)):
        run_thinkrec(ml100k, "ml-100k", options(openai_server, shard=shard), sample=12,
                     max_reflections=2)
    traces = _rows(ml100k, "select user_id, position, reflections, verdict from"
                           " thinkrec_traces")
    assert len({(u, p) for u, p, _, _ in traces}) == len(traces) == 12
    turns = _rows(ml100k, "select count(*) from thinkrec_turns")[0][0]
    assert turns == sum(r + 1 for _, _, r, _ in traces)


def test_cli_dry_run_then_run_then_sql(ml100k, openai_server):
    from typer.testing import CliRunner

    from factory.cli import app

    openai_server.responder = thinkrec_teacher
    base = ["--warehouse", str(ml100k.path), "thinkrec", "--dataset", "ml-100k", "--sample",
            "4", "--max-reflections", "1", "--teacher-url", openai_server.url,
            "--teacher-model", "m", "--seed", "1"]
    res = CliRunner().invoke(app, [*base, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert not openai_server.records and not _rows(ml100k, "select * from thinkrec_traces")
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    # the counts add up: instances, then the turns asked split by round (not `items: 7`)
    assert "  instances: 4\n" in res.output and "  items:" not in res.output
    turns = re.search(r"turns asked: (\d+) \((\d+) first answers \+ (\d+) in reflection 1\)",
                      res.output)
    assert turns and int(turns[1]) == int(turns[2]) + int(turns[3]) and int(turns[3]) > 0
    # one labelled bar per round, and the backend announced once per job, not per round
    assert re.search(r"^thinkrec first answers 4/4 ", res.output, re.M)
    assert re.search(r"^thinkrec reflection 1/1 (\d+)/\1 ", res.output, re.M)
    assert res.output.count("starting openai") == 1
    res = CliRunner().invoke(app, ["--warehouse", str(ml100k.path), "sql", "--format", "json",
                                   "select * from traces where dataset='ml-100k' and"
                                   " job='thinkrec' and verdict='kept' limit 5"])
    assert res.exit_code == 0 and all(json.loads(line)["verdict"] == "kept"
                                      for line in res.stdout.splitlines())


def test_a_reasoning_teachers_thinking_is_the_trace(ml100k, openai_server):
    """ThinkRec's trace is the reasoning model's thinking (3.2.1, App. C: "Yes. Okay, let's
    see here..."), whether it comes inline (QwQ's <think>) or as reasoning_content (vLLM's
    reasoning parser, DeepSeek's API); the decision is parsed from the answer only."""
    def teacher(body: dict) -> dict:
        msgs = body["messages"]
        first = msgs[0]["content"]
        if len(msgs) == 1:
            answer = "Yes" if hashlib.sha256(first.encode()).digest()[0] % 2 else "No"
        else:
            answer = REVEAL.match(msgs[-1]["content"]).group(1)
        thought = (f"Okay, let's see. The history and {len(msgs)} turns. Maybe No? Maybe Yes?"
                   f" Settling on {answer}.")
        if hashlib.sha256(first.encode()).digest()[1] % 2:      # half inline, half not
            return {"content": f"<think>\n{thought}\n</think>\n\n{answer}."}
        return {"content": f"{answer}.", "reasoning_content": thought}

    openai_server.responder = teacher
    run_thinkrec(ml100k, "ml-100k", options(openai_server), sample=12, max_reflections=1,
                 history=3)
    traces = _rows(ml100k, "select t.verdict, t.explanation, t.prediction, t.label, c.text,"
                           " c.reasoning, c.response from thinkrec_traces t join llm_calls c"
                           " on c.key = t.call_keys[-1]")
    assert len(traces) == 12
    kinds = set()
    for verdict, explanation, prediction, label, text, reasoning, response in traces:
        assert verdict == "kept" and prediction == label
        assert reasoning.startswith("Okay, let's see.") and "think>" not in reasoning
        assert explanation == f"{'Yes' if label else 'No'}. {reasoning}"
        kinds.add("reasoning_content" in json.loads(response)["choices"][0]["message"])
        assert (reasoning in text) != ("reasoning_content" in response)
    assert kinds == {True, False}
    turns = _rows(ml100k, "select reasoning from thinkrec_turns")
    assert all(r.startswith("Okay, let's see.") for (r,) in turns)


def test_logprobs_give_each_verdict_its_probability(ml100k, openai_server):
    """--logprobs: the probability the teacher gave the token its Yes/No was read from, per
    turn and for the trace's last turn; after a <think> block too. Without it: NULL."""
    from factory.testing.openai_server import token_logprobs

    def teacher(body: dict) -> str:
        answer = thinkrec_teacher(body)
        thinks = hashlib.sha256(body["messages"][0]["content"].encode()).digest()[0] % 2
        return f"<think>\nNo idea yet. Yes? No?\n</think>\n\n{answer}" if thinks else answer

    openai_server.responder = teacher
    opts = TeacherOptions(url=openai_server.url, model="teacher-test", timeout=5.0,
                          backoff=0.01, concurrency=4, sampling=Sampling(seed=1, logprobs=3))
    run_thinkrec(ml100k, "ml-100k", opts, sample=12, max_reflections=1, history=3)
    turns = _rows(ml100k, "select t.prediction, t.verdict_prob, c.text from thinkrec_turns t"
                          " join llm_calls c on c.key = t.call_key where t.status = 'ok'")
    assert len(turns) >= 12 and any("<think>" in text for _, _, text in turns)
    for prediction, prob, text in turns:
        tokens = token_logprobs(text, 3)
        after = [t["token"] for t in tokens].index("\n</think>") + 1 if "<think>" in text else 0
        verdict = tokens[after]
        assert verdict["token"].strip().startswith("Yes" if prediction else "No")
        assert prob == pytest.approx(math.exp(verdict["logprob"]))
    assert _rows(ml100k, "select count(*) from thinkrec_traces t join thinkrec_turns u"
                         " on u.call_key = t.call_keys[-1] where t.verdict_prob is not"
                         " distinct from u.verdict_prob") == [(12,)]
    openai_server.reset()
    run_thinkrec(ml100k, "ml-100k", options(openai_server), sample=4, max_reflections=0,
                 history=3)
    assert _rows(ml100k, "select count(*), count(verdict_prob) from thinkrec_turns t join"
                         " llm_calls c on c.key = t.call_key where c.logprobs is null") == [
        (4, 0)]
