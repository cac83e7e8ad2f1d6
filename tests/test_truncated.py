"""Truncated or filtered answers are never kept as good (issue 11).

Every job that parses teacher text, against the local test server answering some requests
with `finish_reason: length` (the answer cut at max_tokens), one with `content_filter`, and
one with a <think> block that never closes: the item gets the verdict `truncated` with a
reason naming the budget, no redraw is sent for it, it shows as truncated in `traces`, and no
export writes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from distill_fixtures import ChainTeacher, fake_student, ok
from typer.testing import CliRunner

from factory.teacher import Sampling, TeacherOptions
from factory.warehouse import Warehouse

FILTERED = "stopped by the provider's content filter"


def cut(text: str, reason: str = "length") -> dict:
    """A server answer that stopped before the model finished."""
    return {"content": text, "finish_reason": reason}


def options(server, **kw) -> TeacherOptions:
    return TeacherOptions(url=server.url, model="teacher-test", timeout=5.0, backoff=0.01,
                          concurrency=4, sampling=Sampling(seed=1), **kw)


def rows(wh: Warehouse, sql: str, params=None) -> list[tuple]:
    with wh.read() as con:
        return con.execute(sql, params or []).fetchall()


def requests_about(server, needle: str) -> int:
    """Requests whose last message mentions `needle` (redraws included)."""
    return sum(needle in r.body["messages"][-1]["content"] for r in server.records)


def assert_cut_at(reason: str, max_tokens: int) -> None:
    """Cut by the budget, or (an unclosed <think> that ended with finish_reason stop under
    the budget) stopped by the model, which a higher --max-tokens would not change."""
    assert (f"cut at max_tokens={max_tokens}; raise --max-tokens" in reason
            or "never closed: the model stopped inside it (finish_reason stop" in reason), reason


def cli(wh: Warehouse, *args: str):
    from factory.cli import app

    res = CliRunner().invoke(app, ["--warehouse", str(wh.path), *args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def first_items(wh: Warehouse, n: int, numeric: bool = False) -> list[tuple[str, str]]:
    """(item_id, title) of the first `n` items in the order the item jobs take them."""
    items = rows(wh, "select item_id, title from items where dataset = 'ml-100k'")
    return sorted(items, key=lambda r: int(r[0]) if numeric else r[0])[:n]


def said(res) -> str:
    """A command's output with the console's line wrapping undone."""
    return " ".join(res.output.split())


# -- keywords -----------------------------------------------------------------------------------
def test_keywords_cut_answers_are_truncated_not_kept(ml100k, openai_server):
    from factory.itemtext import latest_keywords
    from jobs.keywords import run_keywords

    items = first_items(ml100k, 7)
    titles = [t for _, t in items]
    answers = {titles[0]: cut("Keywords: drama, "),            # kept ['drama'] before
               titles[1]: cut("Keywords: comedy, gift ide"),   # kept 'gift ide' before
               titles[2]: cut("Keywords: war", "content_filter"),
               titles[3]: "<think>The profile mentions a"}     # the thinking never ended

    def teacher(body: dict):
        title = body["messages"][-1]["content"].split("Title: ", 1)[1].split("\n", 1)[0]
        return answers.get(title, "Keywords: drama, comedy")

    openai_server.responder = teacher
    report, _ = run_keywords(ml100k, "ml-100k", options(openai_server, limit=7))
    assert (report.ok, report.truncated, report.failed) == (3, 4, 4)
    assert len(openai_server.records) == 7                     # no redraw of a cut answer
    got = {r[0]: r[1:] for r in rows(ml100k, "select item_id, keywords, verdict, status, draws,"
                                             " reason from item_keywords")}
    for item_id, title in items[:4]:
        kws, verdict, status, draws, reason = got[item_id]
        assert (kws, verdict, status, draws) == (None, "truncated", "truncated", 1), title
        assert requests_about(openai_server, f"Title: {title}\n") == 1
        if title == titles[2]:
            assert FILTERED in reason
        else:
            assert_cut_at(reason, 96)
    assert "never closed" in got[items[3][0]][4]
    for item_id, _ in items[4:]:
        assert got[item_id][:2] == (["drama", "comedy"], "kept")
    traces = dict(rows(ml100k, "select entity, verdict from traces where job = 'keywords'"))
    assert Counter(traces.values()) == {"truncated": 4, "kept": 3}
    with ml100k.read() as con:       # what the ThinkRec prompts and exports read
        assert set(latest_keywords(con, "ml-100k")) == {i for i, _ in items[4:]}


# -- describe-items -----------------------------------------------------------------------------
def test_describe_items_cut_answers_are_truncated_and_the_summary_says_so(ml100k,
                                                                           openai_server):
    items = first_items(ml100k, 5, numeric=True)
    titles = [t for _, t in items]
    answers = {titles[0]: cut("A gentle animated film about toys that come to life when their"
                              " owner. It follows"),
               titles[1]: cut("A violent", "content_filter")}

    def teacher(body: dict):
        title = body["messages"][-1]["content"].split("Title: ", 1)[1].split("\n", 1)[0]
        return answers.get(title, f"A film called {title} that many people enjoy watching.")

    openai_server.responder = teacher
    args = ["describe-items", "--dataset", "ml-100k", "--teacher-url", openai_server.url,
            "--teacher-model", "teacher-test", "--limit", "5", "--max-tokens", "48"]
    res = cli(ml100k, *args)
    assert "truncated (not kept): 2 (cut at the token limit (raise --max-tokens), by a" \
           " content filter, or ended inside <think>; the reason column says which)" in said(res)
    assert len(openai_server.records) == 5
    got = {r[0]: r[1:] for r in rows(ml100k, "select item_id, description, status, draws, error"
                                             " from item_descriptions")}
    assert got[items[0][0]][:3] == (None, "truncated", 1)       # not its first sentence
    assert_cut_at(got[items[0][0]][3], 48)
    assert got[items[1][0]][:3] == (None, "truncated", 1) and FILTERED in got[items[1][0]][3]
    assert all(got[i][1] == "ok" for i, _ in items[2:])
    traces = rows(ml100k, "select entity, verdict, reason, output from traces"
                          " where job = 'describe-items' and verdict <> 'kept' order by 1")
    assert [(t[0], t[1], t[3]) for t in traces] == sorted(
        [(items[0][0], "truncated", None), (items[1][0], "truncated", None)])
    # a re-run replays the cut answers from the cache: still truncated, nothing sent
    cli(ml100k, *args, "--cache-only")
    assert len(openai_server.records) == 5
    assert rows(ml100k, "select count(*) from item_descriptions where status = 'truncated'"
                        " and description is null") == [(2,)]


# -- explain-i2i and its SFT export -------------------------------------------------------------
@pytest.fixture(scope="module")
def mined_file(ml100k_warehouse, tmp_path_factory) -> Path:
    from factory.i2i import MineParams
    from jobs.mine_i2i import run_mine

    path = tmp_path_factory.mktemp("mined") / "mined.duckdb"
    shutil.copy(ml100k_warehouse, path)
    run_mine(Warehouse(path), "ml-100k", MineParams(top_k=1))
    return path


@pytest.fixture()
def mined(mined_file, tmp_path) -> Warehouse:
    shutil.copy(mined_file, tmp_path / "mined.duckdb")
    return Warehouse(tmp_path / "mined.duckdb")


def _pair_kind(prompt: str) -> int:
    return hashlib.sha256(prompt.encode()).digest()[0] % 3


def explain_teacher(body: dict):
    """By pair: 0 cut at max_tokens, 1 thinking that never ends, 2 a good explanation for
    sample 0 (the seed as given) and a too short one for sample 1 (so no pair has two kept
    samples to compare: no sentence encoder needed)."""
    prompt = body["messages"][-1]["content"]
    head = prompt.split("In collaborative filtering, item ", 1)[1]
    a, rest = head.split(" and item ", 1)
    b = rest.split(" are highly correlated", 1)[0]
    kind = _pair_kind(prompt)
    if kind == 0:
        return cut(f"People who enjoy {a} often look for")
    if kind == 1:
        return f"<think>Both {a} and {b} share"
    if body["seed"] != 1:
        return f"Both are films like {a}."
    return (f"People who enjoy {a} often look for another film with a similar mood, and {b} "
            "offers the same kind of story, so viewers who liked the first one are very "
            "likely to pick the second one next as well.")


def test_explain_i2i_cut_answers_are_truncated_and_never_exported(mined, openai_server,
                                                                  tmp_path):
    from factory.exports.sft import export_sft
    from jobs.explain_i2i import run_explain_i2i

    openai_server.responder = explain_teacher
    r = run_explain_i2i(mined, "ml-100k", options(openai_server), samples=2, pairs=8)
    assert len(openai_server.records) == 16                    # one request per sample
    got = rows(mined, "select e.explanation, e.verdict, e.status, e.draws, e.reason,"
                      " e.n_tokens, c.request from i2i_explanations e"
                      " join llm_calls c on c.key = e.call_key")
    kinds = Counter(_pair_kind(json.loads(g[6])["messages"][-1]["content"]) for g in got)
    assert kinds[0] and kinds[1] and kinds[2]
    n_cut = kinds[0] + kinds[1]
    for explanation, verdict, status, draws, reason, n_tokens, request in got:
        if _pair_kind(json.loads(request)["messages"][-1]["content"]) == 2:
            assert verdict in ("kept", "rejected") and status == "ok"
            continue
        assert (explanation, verdict, status, draws, n_tokens) == (
            None, "truncated", "truncated", 1, None)
        assert_cut_at(reason, 4096)
    assert r["report"].truncated == n_cut and r["verdicts"]["truncated"] == n_cut
    assert rows(mined, "select count(*) from traces where job = 'explain-i2i'"
                       " and verdict = 'truncated'") == [(n_cut,)]
    result = export_sft(mined, "ml-100k", "i2i", tmp_path / "i2i.jsonl", mix=0.0)
    exported = [json.loads(line)["messages"][1]["content"] for f in result.files
                if f.suffix == ".jsonl" for line in f.read_text().splitlines()]
    kept = rows(mined, "select count(*) from i2i_explanations where verdict = 'kept'")[0][0]
    assert len(exported) == kept > 0
    assert not [e for e in exported if e.endswith("often look for") or "<think>" in e]


# -- thinkrec and its SFT export ----------------------------------------------------------------
CUT_TRACE = "Yes. The history suggests the user like"
REVEALED = re.compile(r"^The (?:correct|accurate|right) (?:response|answer) is (Yes|No)\. ")


def _thinkrec_kind(first_prompt: str) -> int:
    """0-4 by instance; the salt gives each kind >= 2 of the 20 instances, and label-No ones
    to kinds 1 and 4 (checked below)."""
    return hashlib.sha256(f"2|{first_prompt}".encode()).digest()[0] % 5


def thinkrec_teacher(body: dict):
    """By instance: 0 the first answer cut mid-sentence; 1 'Yes' first and, when that is
    wrong, a reflect turn cut short; 2 filtered; 3 thinking that never ends; 4 'Yes' first,
    then the revealed label."""
    msgs = body["messages"]
    kind = _thinkrec_kind(msgs[0]["content"])
    if len(msgs) == 1:
        if kind == 0:
            return cut(CUT_TRACE)
        if kind == 2:
            return cut("No. This", "content_filter")
        if kind == 3:
            return "<think>The user rated dramas highly, so"
        return "Yes. Judging by the genres, the user enjoys films of this kind."
    if kind == 1:
        return cut("No. Looking again, the user dis")
    revealed = REVEALED.match(msgs[-1]["content"]).group(1)
    return f"{revealed}. Judging by the genres, the answer is clear this time."


def test_thinkrec_cut_turns_end_the_trace_as_truncated_and_never_reach_sft(ml100k,
                                                                          openai_server,
                                                                          tmp_path):
    from factory.exports.sft import export_sft
    from jobs.thinkrec import SAMPLING, run_thinkrec

    openai_server.responder = thinkrec_teacher
    r = run_thinkrec(ml100k, "ml-100k", options(openai_server), sample=20,
                     max_reflections=2, history=3)
    traces = rows(ml100k, "select user_id, position, label, verdict, reason, status, reflections,"
                          " prediction, explanation, attempts, turns from thinkrec_traces")
    assert len(traces) == 20
    first = {t[:2]: json.loads(t[10])[0]["content"] for t in traces}

    def sent(key: tuple) -> int:     # requests of this conversation, every turn
        return sum(r.body["messages"][0]["content"] == first[key]
                   for r in openai_server.records)

    by_kind: dict[int, list[tuple]] = {}
    for t in traces:
        by_kind.setdefault(_thinkrec_kind(first[t[:2]]), []).append(t)
    assert set(by_kind) == {0, 1, 2, 3, 4}
    for kind in (0, 2, 3):          # the first turn was cut: not a wrong answer to reflect on
        for t in by_kind[kind]:
            assert t[3:4] + t[5:10] == ("truncated", "truncated", 0, None, None, 0)
            assert t[4].startswith("turn 0: ") and sent(t[:2]) == 1
            if kind == 2:
                assert FILTERED in t[4]
            else:
                assert_cut_at(t[4], SAMPLING["max_tokens"])
    reflected = [t for t in by_kind[1] if not t[2]]     # label No: the first 'Yes' was wrong
    assert reflected, "no instance of kind 1 has the label No"
    for t in reflected:
        assert t[3:4] + t[5:10] == ("truncated", "truncated", 1, None, None, 1)
        assert t[4].startswith("turn 1: ") and sent(t[:2]) == 2
        assert f"max_tokens={SAMPLING['max_tokens']}" in t[4]
        assert [m["role"] for m in json.loads(t[10])] == ["user", "assistant", "user"]
    n_truncated = sum(t[3] == "truncated" for t in traces)
    assert r["traces"]["truncated"] == n_truncated == r["report"].truncated
    turn_status = Counter(s for (s,) in rows(ml100k, "select status from thinkrec_turns"))
    assert turn_status["truncated"] == n_truncated and "failed" not in turn_status
    assert rows(ml100k, "select count(*) from traces where job = 'thinkrec' and"
                        " verdict = 'truncated'") == [(n_truncated,)]
    kept = [t for t in traces if t[3] == "kept"]
    assert kept and {t[3] for t in traces} == {"kept", "truncated"}
    result = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "tr.jsonl", share=1.0)
    assert result.counts["train"] == {"reasoning": len(kept)}
    answers = {f.name: [json.loads(line)["messages"][1]["content"]
                        for line in f.read_text().splitlines()]
               for f in result.files if f.suffix == ".jsonl"}
    assert sorted(answers["tr.train.jsonl"]) == sorted(t[8] for t in kept)
    assert not [a for part in answers.values() for a in part
                if a == CUT_TRACE or "user dis" in a or a.startswith("No. This")]


# -- gvm: generate and the template abstraction ------------------------------------------------
@pytest.fixture()
def toy(tmp_path: Path) -> Warehouse:
    from gvm_data import toy_warehouse

    return toy_warehouse(tmp_path / "factory.duckdb")


def bag_of_words(wh, encoder, label):
    """A stand-in for the sentence encoder (jobs.gvm.encoder_for): hashed word counts,
    L2-normalised, so equal texts map together and no model is loaded."""
    import numpy as np

    from factory.embeddings import EmbedStats

    def encode(texts):
        out = np.zeros((len(texts), 256), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, hashlib.sha256(word.encode()).digest()[0]] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    return type("Embedder", (), {"stats": EmbedStats()})(), encode


def test_gvm_cut_chains_and_abstraction_are_truncated_never_mined(toy, monkeypatch):
    from gvm_data import oracle

    from factory.testing.openai_server import OpenAIServer
    from factory.testing.simulated import GvmTeacher, history_titles
    from jobs.gvm import run_gvm

    monkeypatch.setattr("jobs.gvm.encoder_for", bag_of_words)
    gvm = GvmTeacher(oracle(toy, "toy"))

    def short(titles: tuple[str, ...]) -> bool:
        return hashlib.sha256("|".join(titles).encode()).digest()[0] % 4 == 0

    def teacher(body: dict):
        prompt = body["messages"][-1]["content"]
        answer = gvm(body)
        if "Analyze the following CoT cluster" in prompt:   # the abstraction, cut mid-path
            return cut(answer[:answer.rindex(" -> ")] + " -> Item Rec")
        if short(history_titles(prompt)):     # 5 of 20 items, then the budget ran out
            return cut("<item>".join(answer.split("<item>")[:6]))
        return answer

    with OpenAIServer(teacher) as server:
        run = run_gvm(toy, "toy", teacher=TeacherOptions(
            url=server.url, model="test-teacher", timeout=5.0, backoff=0.01, concurrency=8),
            split="loo", users=12, samples=2, n_items=20, max_history=20, prune_threshold=0.85,
            prune_scope="user", cluster="kmeans", k_min=2, k_max=3, min_cluster_size=3,
            exemplars=3, encoder=None)
        n_asked = server.count()
    chains = rows(toy, "select user_id, status, error, items, draws, pruned, score, cot_path"
                       " from gvm_chains where run_id = ?", [run])
    assert len(chains) == 24
    truncated = [c for c in chains if c[1] == "truncated"]
    assert truncated and all(c[1] == "ok" for c in chains if c not in truncated)
    for _, _, error, items, draws, pruned, score, path in truncated:
        assert (items, draws, pruned, score, path) == (None, 1, False, None, None)
        assert_cut_at(error, 8192)
    assert n_asked == 24 + 1                  # no redraws; one Fig. 10 request
    abstraction = rows(toy, "select status, steps, error, draws from gvm_abstractions"
                            " where run_id = ?", [run])
    assert [a[:2] for a in abstraction] == [("truncated", None)] and abstraction[0][3] == 1
    assert_cut_at(abstraction[0][2], 8192)
    template, error = rows(toy, "select template, error from gvm_patterns where run_id = ?",
                           [run])[0]
    assert template is None and "raise --max-tokens" in error
    assert not rows(toy, "select 1 from templates where run_id = ?", [run])
    verdicts = Counter(v for (v,) in rows(toy, "select verdict from traces where run_id = ?"
                                               " and job = 'gvm'", [run]))
    assert verdicts["truncated"] == len(truncated) and "failed" not in verdicts
    assert rows(toy, "select verdict from traces where run_id = ? and job = 'gvm-abstract'",
                [run]) == [("truncated",)]
    shown = said(cli(toy, "gvm", "show", "--dataset", "toy", "--run", run))
    assert f"truncated {len(truncated)}x: cut at max_tokens=8192" in shown


# -- distill teach / generate -------------------------------------------------------------------
class CutChains(ChainTeacher):
    """Chains for every prompt; by history, some cut mid-step at max_tokens, some filtered."""

    def __call__(self, body: dict):
        answer = super().__call__(body)
        history = "|".join(self.history(body["messages"][-1]["content"]))
        kind = hashlib.sha256(history.encode()).digest()[0] % 4
        if kind == 0:
            return cut(answer[: answer.index("**Item Recommendation:**") + 30])
        if kind == 1:
            return cut(answer[:40], "content_filter")
        return answer


def _distill_rows(wh: Warehouse, source: str) -> list[tuple]:
    return rows(wh, "select part, user_id, verdict, reason, steps, draws, status from chains"
                    " where source = ?", [source])


def _check_chains(wh: Warehouse, source: str, max_tokens: int) -> int:
    from factory.distill import kept_chains

    got = _distill_rows(wh, source)
    truncated = [g for g in got if g[2] == "truncated"]
    assert truncated and {g[2] for g in got} == {"kept", "truncated"}
    filtered = [g for g in truncated if FILTERED in g[3]]
    assert filtered and len(filtered) < len(truncated)
    for _, _, _, reason, steps, draws, status in truncated:
        assert (steps, draws, status) == (None, 1, "truncated")
        if FILTERED not in reason:
            assert_cut_at(reason, max_tokens)
    kept = {(g[0], g[1]) for g in got if g[2] == "kept"}
    with wh.read() as con:          # what embed-steps and `export cache --chains` read
        sets = [s for (s,) in con.execute("select distinct chain_set from chains where"
                                          " source = ?", [source]).fetchall()]
        assert {(p, u) for p, u, _ in kept_chains(con, sets[0])} == kept
        assert {(p, u) for p, u in con.execute(
            "select distinct part, user_id from chain_steps where source = ?",
            [source]).fetchall()} == kept
        job = "distill-teach" if source == "teacher" else "distill-generate"
        assert con.execute("select count(*) from traces where job = ? and verdict ="
                           " 'truncated'", [job]).fetchone() == (len(truncated),)
    return len(truncated)


def test_distill_cut_chains_are_truncated_not_rejected_nor_redrawn(ml100k, tmp_path):
    from factory.testing.openai_server import OpenAIServer

    teacher = CutChains()
    with OpenAIServer(teacher) as server:
        res = ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template",
                 "three-step", "--teacher-url", server.url, "--teacher-model", "teacher-m",
                 "--limit", "9")
        assert server.count() == 9               # a rejected chain would be drawn 3 times
        n = _check_chains(ml100k, "teacher", 8192)
        assert f"truncated (not kept): {n} (" in said(res) and "raise --max-tokens" in said(res)
        with ml100k.write() as con:
            chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
            fake_student(con, "distill-student-x", chain_set, tmp_path / "adapter")
        server.reset()
        ok(ml100k.path, "distill", "generate", "--dataset", "ml-100k", "--student",
           "distill-student-x", "--teacher-url", server.url, "--limit", "9")
        assert server.count() == 9
        _check_chains(ml100k, "student", 1024)


def test_an_answer_without_finish_reason_that_used_the_whole_budget_is_truncated() -> None:
    from factory.teacher.engine import truncation
    from factory.teacher.store import CachedAnswer

    assert truncation(CachedAnswer("Keywords: drama, ", None, 10, 64), 64) == (
        "cut at max_tokens=64; raise --max-tokens")
    assert truncation(CachedAnswer("Keywords: drama.", None, 10, 12), 64) is None
    assert truncation(CachedAnswer("Keywords: drama.", "stop", 10, 64), 64) is None


def test_a_reasoning_block_the_model_ended_early_does_not_blame_the_budget() -> None:
    """`<think>` never closed, finish_reason stop, 57 of 4,096 tokens: the model stopped
    inside its reasoning; raising --max-tokens would not help (the reason said it would)."""
    from factory.teacher.engine import truncation
    from factory.teacher.store import CachedAnswer

    early = truncation(CachedAnswer("<think>never finished", "stop", 10, 57), 4096)
    assert early == ("reasoning block (<think>) never closed: the model stopped inside it "
                     "(finish_reason stop, 57 tokens)")
    cut = truncation(CachedAnswer("<think>never finished", "stop", 10, 4096), 4096)
    assert cut is not None and "raise --max-tokens" in cut


def test_the_test_servers_length_fault_cuts_answers_at_max_tokens(ml100k):
    """`--faults length` (opt-in) answers as a model that ran out of tokens: the answer cut
    after max_tokens words, finish_reason length; the job keeps none of them, redraws none."""
    from factory.testing.openai_server import Faults, OpenAIServer
    from jobs.keywords import run_keywords

    def teacher(body: dict) -> str:
        return "<think>" + "the profile mentions a quiet drama " * 4 + "</think> Keywords: drama"

    with OpenAIServer(teacher, faults=Faults(rate=1.0, kinds=("length",))) as server:
        opts = TeacherOptions(url=server.url, model="teacher-test", timeout=5.0, backoff=0.01,
                              concurrency=2, sampling=Sampling(seed=1, max_tokens=6), limit=3)
        report, _ = run_keywords(ml100k, "ml-100k", opts)
        assert len(server.records) == 3 and server.count("length") == 3
    assert (report.ok, report.truncated) == (0, 3)
    got = rows(ml100k, "select c.finish_reason, c.output_tokens, c.text, k.reason"
                       " from item_keywords k join llm_calls c on c.key = k.call_key")
    assert len(got) == 3
    for finish, tokens, text, reason in got:
        assert (finish, tokens, len(text.split())) == ("length", 6, 6)
        assert_cut_at(reason, 6)
