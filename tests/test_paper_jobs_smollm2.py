"""The three paper jobs on the embedded SmolLM2 teacher (transformers backend, CPU), a handful
of rows each with a tiny token budget: the real in-process path end to end. A 135M model
answers shallowly, so what is checked is that every row is stored with a verdict and real
provenance, never that the answers are good."""

from __future__ import annotations

import pytest

from factory.teacher import Sampling, TeacherOptions

pytestmark = pytest.mark.slow


def _rows(wh, sql, params=None):
    with wh.read() as con:
        return con.execute(sql, params or []).fetchall()


def test_keywords_explain_and_thinkrec_on_smollm2(ml100k):
    from factory.i2i import MineParams
    from jobs.explain_i2i import run_explain_i2i
    from jobs.keywords import run_keywords
    from jobs.mine_i2i import run_mine
    from jobs.thinkrec import run_thinkrec

    tiny = TeacherOptions(sampling=Sampling(max_tokens=8, seed=0), parse_retries=1)
    report, _ = run_keywords(ml100k, "ml-100k", TeacherOptions(
        sampling=Sampling(max_tokens=8, seed=0), parse_retries=1, limit=1))
    assert report.items == 1 and report.ok + report.failed == 1

    run_mine(ml100k, "ml-100k", MineParams(top_k=1))
    r = run_explain_i2i(ml100k, "ml-100k", tiny, samples=1, pairs=1)
    assert r["report"].ok + r["report"].failed == 1

    # several rounds in one job: reflect turns go to the same in-process backend
    t = run_thinkrec(ml100k, "ml-100k", tiny, sample=2, max_reflections=1, history=2)
    assert sum(t["traces"].values()) == 2

    calls = _rows(ml100k, "select distinct backend, model from llm_calls")
    assert calls == [("transformers", "SmolLM2-135M-Instruct.Q4_1.gguf")]
    traces = _rows(ml100k, "select job, verdict, reason, output_tokens from traces"
                           " order by job")
    assert [j for j, *_ in traces].count("explain-i2i") == 1
    for job, verdict, reason, out_tokens in traces:
        assert verdict in ("kept", "rejected", "failed", "truncated")
        assert (reason is None) == (verdict == "kept")
        if job == "explain-i2i" and verdict == "rejected":
            assert reason.startswith(("too short", "refusal", "names neither"))
        if verdict == "truncated":      # 8 tokens cut most answers: never kept, never redrawn
            assert "max_tokens=8; raise --max-tokens" in reason
        if verdict != "failed":
            assert 0 < out_tokens <= 8 * (2 if job == "thinkrec" else 1)
