"""`keywords` end to end against the local OpenAI-compatible test server."""

from __future__ import annotations

import pytest

from factory.errors import FactoryError
from factory.teacher import Sampling, TeacherOptions
from factory.testing.openai_server import MALFORMED_CONTENT
from factory.testing.simulated import keyword_teacher
from jobs.keywords import run_keywords

LIMIT = 40


def options(server, **kw) -> TeacherOptions:
    return TeacherOptions(url=server.url, model="teacher-test", timeout=5.0, backoff=0.01,
                          concurrency=4, sampling=Sampling(seed=1), **kw)


def _rows(wh, sql, params=None):
    with wh.read() as con:
        return con.execute(sql, params or []).fetchall()


def test_keywords_end_to_end(ml100k, openai_server):
    openai_server.responder = keyword_teacher
    heat = _rows(ml100k, "select item_id from items where title like 'Heat%'")[0][0]
    with ml100k.write() as con:   # an item with nothing to summarise; Heat first in the order
        con.execute("update items set title = null where item_id = '1'")
        con.execute("update items set item_id = '0000' where item_id = ?", [heat])
    report, skipped = run_keywords(ml100k, "ml-100k", options(openai_server, limit=LIMIT))
    assert skipped == 1 and report.items == LIMIT
    rows = _rows(ml100k, "select item_id, keywords, verdict, reason, status, draws, prompt_name"
                         " from item_keywords order by item_id")
    assert len(rows) == LIMIT and report.requests > LIMIT      # malformed ones were re-drawn
    for item_id, kws, verdict, reason, status, draws, name in rows:
        assert name == "thinkrec_keywords"
        if item_id == "0000":
            assert (kws, verdict, status, draws) == (None, "failed", "failed", 3)
            assert "rejected by the parser 3 times" in reason
            continue
        assert verdict == "kept" and reason is None and status == "ok"
        assert len(kws) == 10 and len(set(kws)) == 10
        assert kws[0] == "drama" and "family film" in kws and "four" not in kws
        assert all(k == k.lower().strip() for k in kws)
    assert not _rows(ml100k, "select 1 from item_keywords where item_id = '1'")
    traces = _rows(ml100k, "select entity, prompt, response, output, verdict, reason"
                           " from traces where job = 'keywords' order by entity")
    assert len(traces) == LIMIT
    for (entity, prompt, response, output, verdict, reason), row in zip(traces, rows,
                                                                       strict=True):
        assert entity == row[0] and verdict == row[2] and prompt.startswith("Title: ")
        assert response.startswith("Keywords: ") or response == MALFORMED_CONTENT
        assert output == (", ".join(row[1]) if row[1] else None) and reason == row[3]
    prompt = openai_server.records[0].body["messages"][-1]["content"]
    assert "Your task is to extract up to ten keywords from the given profile of the movie " \
           "above." in prompt and prompt.startswith("Title: ")
    # a re-run replays from the cache
    sent = len(openai_server.records)
    again, _ = run_keywords(ml100k, "ml-100k", options(openai_server, limit=LIMIT))
    assert len(openai_server.records) == sent and again.cached == LIMIT


def test_keywords_bad_input(ml100k, wh, openai_server):
    with ml100k.write() as con:
        con.execute("update items set title = null, description = null")
    with pytest.raises(FactoryError, match="has a title or description"):
        run_keywords(ml100k, "ml-100k", options(openai_server))
    with pytest.raises(FactoryError, match="unknown dataset"):
        run_keywords(ml100k, "nope", options(openai_server))
    assert not openai_server.records


def test_the_bar_says_rejected_where_the_summary_does(ml100k, openai_server):
    """Off a terminal the bar's last line uses the summary's words: an answer the parser
    rejected is `rejected`, not `failed` (a failure is no answer at all)."""
    from typer.testing import CliRunner

    from factory.cli import app

    openai_server.responder = keyword_teacher
    heat = _rows(ml100k, "select item_id from items where title like 'Heat%'")[0][0]
    with ml100k.write() as con:
        con.execute("update items set item_id = '0000' where item_id = ?", [heat])
    out = CliRunner().invoke(app, ["--warehouse", str(ml100k.path), "keywords", "--dataset",
                                   "ml-100k", "--limit", "5", "--teacher-url",
                                   openai_server.url, "--teacher-model", "m"]).output
    import re

    rejected = int(re.search(r"rejected by the parser: (\d+)", out).group(1))
    assert rejected > 0 and "failed (no answer): 0" in out, out
    assert f"· {rejected} rejected · failed 0 ·" in out, out
