"""Secrets never stored: the key (environment or teacher URL) appears in no table, view, file
beside the warehouse or printed line, whatever the server echoes and however it escapes it."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.teacher.keys import redact, safe_url
from factory.warehouse import Warehouse

runner = CliRunner()

#: a key whose JSON, URL and HTML forms all differ from it; CORE survives any escaping, so
#: finding CORE anywhere means some form of the key leaked
CORE = "PLANTEDq7Zk3"
KEY = f'sk-{CORE}/a"b+c&d<e>f=='
URL_SECRET = f"az-{CORE}/x+y=="


def leaks(wh: Warehouse, output: str) -> list[str]:
    """Where CORE appears: every table and view (all columns as text), every file beside the
    warehouse (a journal, a spill), and the printed output."""
    found = [f"output: {output!r}"] if CORE in output else []
    with wh.read() as con:
        relations = con.execute(
            "select table_schema, table_name from information_schema.tables"
            " where table_catalog = current_database()").fetchall()
        for schema, name in relations:
            rows = con.execute(
                f'select cast(columns(*) as varchar) from "{schema}"."{name}"').fetchall()
            found += [f"{schema}.{name}: {row}" for row in rows if CORE in repr(row)]
    for path in Path(wh.path).parent.rglob("*"):
        if path.is_file() and CORE.encode() in path.read_bytes():
            found.append(f"file {path}")
    return found


def run(wh: Warehouse, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--warehouse", str(wh.path), *args])
    return result.exit_code, result.output + (str(result.exception) if result.exception else "")


def describe(wh: Warehouse, url: str, *extra: str) -> tuple[int, str]:
    return run(wh, "describe-items", "--dataset", "ml-100k", "--limit", "5",
               "--teacher-url", url, "--teacher-model", "test-model", *extra)


def test_a_key_echoed_in_the_answer_is_stored_and_printed_nowhere(ml100k, openai_server,
                                                                   monkeypatch):
    monkeypatch.setenv("FACTORY_TEACHER_API_KEY", KEY)
    openai_server.api_key = KEY                      # the key really is sent and checked
    openai_server.responder = lambda body: (
        f"The Ring-bearer Frodo, Bearer of the One Ring, carries the key {KEY} to Mordor.")
    code, output = describe(ml100k, openai_server.url)
    assert code == 0, output
    assert openai_server.count("ok") == 5
    assert leaks(ml100k, output) == []
    with ml100k.read() as con:
        texts = con.execute("select distinct text from llm_calls").fetchall()
        kept = con.execute("select count(*) from item_descriptions where status = 'ok'"
                           ).fetchone()[0]
    # only the key goes: the rest of the answer is data, "bearer" prose included
    assert texts == [("The Ring-bearer Frodo, Bearer of the One Ring, carries the key *** "
                      "to Mordor.",)]
    assert kept == 5


def test_a_key_json_escaped_in_an_error_body_is_stored_and_printed_nowhere(
        ml100k, openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.echo_key_with_400 = True           # quotes the key, `\/` and `\u0026` style
    code, output = describe(ml100k, openai_server.url, "--attempts", "1")
    assert openai_server.count("400") >= 5
    assert leaks(ml100k, output) == []
    with ml100k.read() as con:
        failed = con.execute("select response->>'$.error.message', error from llm_calls"
                             " where status = 'failed'").fetchall()
    assert failed and all(message == "invalid request for key ***" for message, _ in failed)
    assert all("HTTP 400" in error for _, error in failed)


def test_a_key_in_the_teacher_url_query_is_sent_but_stored_and_printed_nowhere(
        ml100k, openai_server):
    url = f"{openai_server.url}?api-version=2024-06-01&api-key={quote(URL_SECRET, safe='')}"
    openai_server.responder = lambda body: f"A film whose server echoes {URL_SECRET} back."
    code, output = describe(ml100k, url)
    assert code == 0, output
    # the query travels with every request, to the right route
    sent = [urlsplit(r.path) for r in openai_server.records]
    assert len(sent) == 5 and {s.path for s in sent} == {"/v1/chat/completions"}
    assert all(parse_qs(s.query) == {"api-version": ["2024-06-01"], "api-key": [URL_SECRET]}
               for s in sent)
    assert leaks(ml100k, output) == []
    with ml100k.read() as con:
        stored_url = con.execute("select params->'teacher'->>'url' from job_runs"
                                 " where job = 'describe-items'").fetchone()[0]
    assert stored_url == f"{openai_server.url}?api-version=2024-06-01&api-key=***"

    code, output = run(ml100k, "teacher", "check", "--teacher-url", url,
                       "--teacher-model", "test-model")
    assert code == 0 and "teacher answered" in output and "api-key=***" in output
    assert CORE not in output


ESCAPED = json.dumps(KEY)[1:-1]                                 # sk-...a\"b...
FORMS = {
    "json": ESCAPED,
    "php": ESCAPED.replace("/", "\\/"),
    "go": ESCAPED.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"),
    "all-unicode-escapes": "".join(f"\\u{ord(c):04X}" for c in KEY),
    "json-in-json": json.dumps(json.dumps(KEY))[3:-3],
    "url": quote(KEY, safe=""),
    "url-plus": quote_plus(KEY),
    "url-twice": quote(quote(KEY, safe=""), safe=""),
    "html": "".join(f"&#{ord(c)};" for c in KEY),
}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_redact_finds_the_key_in_every_escaping(form):
    assert KEY not in form
    assert redact(f"error: {form} (request 7)", KEY) == "error: *** (request 7)"


def test_safe_url_masks_credentials_and_keeps_harmless_parameters():
    url = (f"https://user:{URL_SECRET}@gw.example/v1?api-version=2024-06-01"
           f"&Api_Key={URL_SECRET}&sig={URL_SECRET}&X-Amz-Security-Token={URL_SECRET}&top=3")
    assert safe_url(url) == ("https://gw.example/v1?api-version=2024-06-01&Api_Key=***"
                             "&sig=***&X-Amz-Security-Token=***&top=3")
