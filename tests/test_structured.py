"""Structured outputs (`--structured`): a prompt's declared answer shape, sent as
`response_format` (HTTP), vLLM's structured-output parameter, or llguidance-constrained
decoding in-process; the JSON answer is rendered for the job's unchanged parser."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import vllm_stub
from typer.testing import CliRunner

from factory.cli import app
from factory.errors import FactoryError
from factory.prompts import load_prompt, parse_prompt, prompt_names
from factory.teacher import Sampling, TeacherJob, TeacherOptions, Work
from factory.teacher.backends import TransformersBackend, VLLMBackend
from factory.teacher.request import Request
from factory.testing.openai_server import MALFORMED_CONTENT, asked_schema
from factory.testing.simulated import GvmTeacher, SimulatedTeacher
from factory.warehouse import Warehouse

TEMPLATE = """{#
purpose: test prompt
output: a colour and a count
source: tests
#}
{% block user %}Name one colour and a count up to {{ top }} for {{ thing }}.{% endblock %}
"""
SHAPE = {
    "schema": {"type": "object", "properties": {
        "colour": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 1, "maximum": "{{ top }}"}},
        "required": ["colour", "count"], "additionalProperties": False},
    "text": "{{ count }} x {{ colour }} for {{ thing }}",
}
PROMPT = parse_prompt("colours", TEMPLATE, json.dumps(SHAPE))
FREE = parse_prompt("colours", TEMPLATE)          # the same prompt with no shape
TABLE = ("create table answers (item varchar not null, answer varchar, work_key varchar not null,"
         " call_key varchar, run_id varchar, prompt_name varchar, prompt_hash varchar,"
         " backend varchar, model varchar, sample integer, draws integer, cached boolean,"
         " status varchar, error varchar, primary key (item, work_key))")


def works(n: int) -> list[Work]:
    return [Work(id=f"w{i}", vars={"thing": f"thing {i}", "top": 3 + i}) for i in range(n)]


def parse(text: str) -> str:
    """The job's parser: free text 'N x colour for thing'."""
    count, sep, rest = text.partition(" x ")
    if not (sep and count.isdigit() and " for thing " in rest):
        raise ValueError(f"not 'N x colour for thing': {text[:40]!r}")
    return text


def run(wh: Warehouse, opts: TeacherOptions, items: list[Work], prompt: Any = PROMPT,
        backend: Any = None) -> Any:
    with wh.write() as con:
        con.execute(TABLE.replace("create table", "create table if not exists"))
    with TeacherJob(wh, "colours", dataset=None, options=opts, backend=backend) as job:
        return job.run(items, prompt=prompt, parse=parse, table="answers",
                       row=lambda o: {"item": o.work.id, "answer": o.value})


def options(server: Any, **kw: Any) -> TeacherOptions:
    return TeacherOptions(url=server.url, model="m", timeout=5.0, backoff=0.01, concurrency=2,
                          **kw)


def rows(wh: Warehouse, sql: str) -> list[tuple]:
    with wh.read() as con:
        return con.execute(sql).fetchall()


def colour_answer(body: dict[str, Any]) -> str:
    """A constrained server's answer: the schema's own bound read back from the request."""
    schema = asked_schema(body)
    assert schema is not None, "no response_format sent"
    return json.dumps({"colour": "teal", "count": schema["properties"]["count"]["maximum"]})


# -- the shape beside the prompt --------------------------------------------------------------
@pytest.mark.parametrize("shape, message", [
    ("{nope", "not JSON"),
    ('{"schema": {}}', 'expected {"schema"'),
    (json.dumps({**SHAPE, "schema": {**SHAPE["schema"], "required": ["colour"]}}),
     "properties are all required"),
    (json.dumps({**SHAPE, "schema": {**SHAPE["schema"], "properties": {
        "colour": {"type": "strin"}, "count": {"type": "integer"}}}}), "invalid JSON schema"),
    (json.dumps({**SHAPE, "schema": {**SHAPE["schema"], "properties": {
        "thing": {"type": "string"}}, "required": ["thing"]}}), r"fields \['thing'\] shadow"),
    (json.dumps({**SHAPE, "text": "{{ colour "}), "line 1"),
])
def test_a_bad_answer_file_is_refused_with_the_reason(shape: str, message: str) -> None:
    with pytest.raises(FactoryError, match="prompt colours.answer.json: .*" + message):
        parse_prompt("colours", TEMPLATE, shape)


def test_shipped_shapes_load_and_their_bounds_follow_the_request() -> None:
    shaped = {n for n in prompt_names() if load_prompt(n).answer is not None}
    assert {"thinkrec_keywords", "gvm_generate", "gvm_recommend", "gvm_mine",
            "thinkrec_first_turn", "thinkrec_reflect", "scoter_distill",
            "twistar_i2i_discriminate", "describe_item"} == shaped
    gvm = load_prompt("gvm_generate").answer
    fmt = gvm.response_format({"n_items": 7, "history": []})
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    items = fmt["json_schema"]["schema"]["properties"]["recommendations"]
    assert items["minItems"] == items["maxItems"] == 7
    distill = load_prompt("scoter_distill").answer.schema({"steps": ["a", "b", "c"]})
    assert distill["properties"]["step_analyses"]["maxItems"] == 3
    # the properties keep the file's order: a constrained decoder writes them in that order
    assert list(fmt["json_schema"]["schema"]["properties"]) == [
        "cot_path", "reason", "recommendations"]


def test_simulated_gvm_json_reads_as_fig9_for_the_unchanged_parser() -> None:
    from factory.gvm.parse import ParseFailure, parse_best_path, parse_generation

    prompt = load_prompt("gvm_generate")
    history = [{"title": f"Film {i}", "categories": ["Drama"], "brand": None} for i in range(5)]
    variables = {"history": history, "n_items": 5}
    body = {"messages": prompt.render(**variables), "seed": 0,
            "response_format": prompt.answer.response_format(variables)}
    teacher = GvmTeacher(malformed=1.0)
    kinds = set()
    for seed in range(40):
        answer = teacher({**body, "seed": seed})
        schema = body["response_format"]["json_schema"]["schema"]
        jsonschema.validate(json.loads(answer), schema)     # every bad answer fits too
        try:
            parsed = parse_generation(prompt.answer.as_text(answer, variables), 5)
            kinds.add("warned" if parsed.warnings else "ok")
        except ParseFailure as exc:
            kinds.add(str(exc))
    assert kinds == {"warned", "<cot_path> holds no path", "no recommended items"}
    good = GvmTeacher()({**body, "seed": 1})
    assert parse_generation(prompt.answer.as_text(good, variables), 5).warnings == []
    mine = load_prompt("gvm_mine")
    mvars = {"cluster": 0, "rank": 1, "n_clusters": 2, "recall": 0.5, "exemplars": ["a -> b"]}
    mbody = {"messages": mine.render(**mvars), "response_format": mine.answer.response_format(
        mvars)}
    assert parse_best_path(mine.answer.as_text(GvmTeacher()(mbody), mvars)) == [
        "a", "Item Recommendation"]


# -- over HTTP: the request, the key, the parser -----------------------------------------------
def test_structured_sends_the_schema_and_the_parser_reads_the_rendered_answer(
        wh: Warehouse, openai_server: Any) -> None:
    openai_server.responder = colour_answer
    report = run(wh, options(openai_server, structured=True), works(3))
    assert (report.ok, report.requests) == (3, 3)
    for i, record in enumerate(sorted(openai_server.records, key=lambda r: r.body["messages"][0]
                                      ["content"])):
        fmt = record.body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "colours"
        assert fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["properties"]["count"]["maximum"] == 3 + i
    stored = rows(wh, "select a.item, a.answer, c.text, c.request from answers a"
                      " join llm_calls c on c.key = a.call_key order by a.item")
    for i, (item, value, text, request) in enumerate(stored):
        assert item == f"w{i}"
        assert value == f"{3 + i} x teal for thing {i}"        # rendered, then parsed
        assert json.loads(text) == {"colour": "teal", "count": 3 + i}   # kept as received
        assert json.loads(request)["params"]["response_format"]["type"] == "json_schema"
    params = json.loads(rows(wh, "select params from job_runs")[0][0])
    assert params["teacher"]["structured"] is True
    # the schema is part of the key: free text is another request, answered and cached apart
    openai_server.responder = lambda body: "2 x red for thing 0"
    free = run(wh, options(openai_server, structured=False), works(1))
    assert (free.ok, free.cached, free.requests) == (1, 0, 1)
    assert "response_format" not in openai_server.records[-1].body
    assert rows(wh, "select count(distinct key) from llm_calls") == [(4,)]


def test_a_url_teacher_answers_free_text_by_default(wh: Warehouse, openai_server: Any) -> None:
    openai_server.responder = lambda body: "5 x blue for thing 0"
    report = run(wh, options(openai_server), works(1))
    assert report.ok == 1 and "response_format" not in openai_server.records[0].body


@pytest.mark.parametrize("bad, reason", [
    ('{"colour": "teal", "count": ', "not JSON"),
    ('{"colour": "teal", "count": 99}', "does not fit its schema at count: 99 is greater"),
    ('{"colour": "teal"}', "does not fit its schema at the answer: 'count' is a required"),
    ('{"colour": "teal", "count": 2, "more": 1}', "Additional properties"),
])
def test_an_answer_that_breaks_the_shape_is_redrawn_then_rejected(
        wh: Warehouse, openai_server: Any, bad: str, reason: str) -> None:
    seeds: list[Any] = []

    def responder(body: dict[str, Any]) -> str:
        seeds.append(body.get("seed"))
        return bad

    openai_server.responder = responder
    report = run(wh, options(openai_server, structured=True, sampling=Sampling(seed=1)),
                 works(1))
    assert (report.ok, report.rejected, report.requests) == (0, 1, 3)
    assert len(set(seeds)) == 3                                   # three real draws
    [(status, error)] = rows(wh, "select status, error from answers")
    assert status == "failed" and error.startswith("answer rejected by the parser 3 times")
    assert reason in error


def test_a_schema_valid_answer_the_parser_refuses_is_rejected_as_before(
        wh: Warehouse, openai_server: Any) -> None:
    prompt = parse_prompt("colours", TEMPLATE, json.dumps({**SHAPE, "text": "{{ colour }}"}))
    openai_server.responder = lambda body: json.dumps({"colour": "teal", "count": 1})
    report = run(wh, options(openai_server, structured=True), works(1), prompt=prompt)
    assert report.rejected == 1
    assert "not 'N x colour for thing': 'teal'" in rows(wh, "select error from answers")[0][0]


def test_a_prompt_without_a_shape_is_asked_as_before_and_said_once(
        wh: Warehouse, openai_server: Any, capsys: Any) -> None:
    openai_server.responder = lambda body: "5 x blue for thing 0"
    plain = run(wh, options(openai_server), works(3), prompt=FREE)
    structured = run(wh, options(openai_server, structured=True), works(3), prompt=FREE)
    assert (plain.requests, structured.cached) == (3, 3)           # the same requests
    assert all("response_format" not in r.body for r in openai_server.records)
    err = capsys.readouterr().err
    assert err.count("prompt colours declares no answer shape") == 1


def test_the_test_server_refuses_a_json_schema_without_a_schema(
        wh: Warehouse, openai_server: Any, monkeypatch: Any) -> None:
    from factory.prompts import AnswerShape

    monkeypatch.setattr(AnswerShape, "response_format",
                        lambda self, v: {"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(FactoryError, match="all 1 items failed; last: HTTP 400: .*"
                       "json_schema needs json_schema.schema"):
        run(wh, options(openai_server, structured=True), works(1))
    assert rows(wh, "select status from answers") == [("failed",)]


def test_the_keywords_command_with_structured_against_the_simulated_teacher(
        ml100k: Warehouse, openai_server: Any) -> None:
    openai_server.responder = SimulatedTeacher()
    args = ["--warehouse", str(ml100k.path), "keywords", "--dataset", "ml-100k", "--limit",
            "30", "--teacher-url", openai_server.url, "--teacher-model", "simulated-teacher",
            "--seed", "1", "--structured"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bodies = [r.body for r in openai_server.records]
    assert bodies and all(b["response_format"]["json_schema"]["name"] == "thinkrec_keywords"
                          for b in bodies)
    got = rows(ml100k, "select k.verdict, k.keywords, c.text from item_keywords k"
                       " join llm_calls c on c.key = k.call_key")
    assert len(got) == 30
    for verdict, keywords, text in got:
        answer = json.loads(text)
        assert 1 <= len(answer["keywords"]) <= 10
        if verdict == "kept":
            assert keywords[0] == "drama" and len(keywords) == len(set(keywords))
        else:       # every draw fit the schema and said nothing: the parser's verdict
            assert verdict == "rejected" and answer == {"keywords": [MALFORMED_CONTENT]}
    assert sum(v == "kept" for v, *_ in got) >= 20


# -- offline vLLM: its structured-output parameter ---------------------------------------------
@pytest.mark.parametrize("old", [False, True])
def test_vllm_gets_the_schema_as_its_structured_output_param(
        monkeypatch: pytest.MonkeyPatch, old: bool) -> None:
    class Modules(dict):
        def __setitem__(self, key: str, value: Any) -> None:
            monkeypatch.setitem(__import__("sys").modules, key, value)

    tok = _byte_tokenizer()
    rec = vllm_stub.install(Modules(), tokenizer=tok, answer=lambda ids: '{"colour": "red"}',
                            guided_decoding=old)
    backend = VLLMBackend("/models/m")
    backend._load()
    fmt = PROMPT.answer.response_format({"top": 4})
    replies = backend._generate([
        Request.build("m", [{"role": "user", "content": "a"}], Sampling(), response_format=fmt),
        Request.build("m", [{"role": "user", "content": "b"}], Sampling())])
    assert replies[0].text == '{"colour": "red"}'
    structured, free = rec.sampling
    name = "guided_decoding" if old else "structured_outputs"
    params = getattr(structured, name)
    assert params.json == fmt["json_schema"]["schema"]
    assert getattr(params, "disable_any_whitespace", True) is True
    assert not hasattr(free, name)
    backend.shutdown()


# -- in-process: grammar-constrained decoding on a tiny random model ---------------------------
def _byte_tokenizer() -> Any:
    """A byte-level tokenizer built here (no hub): every string has a spelling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="module")
def tiny_backend() -> TransformersBackend:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok) + 5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    backend = TransformersBackend("tiny-random")
    backend._tokenizer, backend._model, backend._loaded = tok, model, True
    return backend


KEYWORDS = load_prompt("thinkrec_keywords").answer.response_format({})


def test_constrained_rows_always_fit_their_own_schema(tiny_backend: TransformersBackend) -> None:
    schemas = [KEYWORDS, PROMPT.answer.response_format({"top": 9}), None]
    for seed in range(4):       # rows with different schemas, or none, share one generate
        requests = [Request.build("tiny-random", [{"role": "user", "content": f"q{i}"}],
                                  Sampling(temperature=1.0, max_tokens=1400, seed=seed),
                                  response_format=fmt) for i, fmt in enumerate(schemas)]
        replies = tiny_backend._generate(requests)
        for fmt, reply in zip(schemas[:2], replies[:2], strict=True):
            assert reply.finish_reason == "stop", reply.text
            jsonschema.validate(json.loads(reply.text), fmt["json_schema"]["schema"])
        with pytest.raises(ValueError):     # the random model, free: never JSON
            json.loads(replies[2].text)


def test_a_schema_llguidance_cannot_use_fails_that_row_only(
        tiny_backend: TransformersBackend) -> None:
    from factory.teacher.limits import RequestError

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}
    requests = [Request.build("tiny-random", [{"role": "user", "content": "q"}],
                              Sampling(max_tokens=1400), response_format=fmt)
                for fmt in (bad, KEYWORDS)]
    failed, ok = tiny_backend._generate(requests)
    assert isinstance(failed, RequestError) and "schema cannot be used" in str(failed)
    jsonschema.validate(json.loads(ok.text), KEYWORDS["json_schema"]["schema"])


def test_the_engine_runs_the_in_process_model_constrained(
        wh: Warehouse, tiny_backend: TransformersBackend) -> None:
    opts = TeacherOptions(structured=True, sampling=Sampling(temperature=1.0, max_tokens=80))
    report = run(wh, opts, works(6), backend=tiny_backend)
    assert (report.ok, report.requests) == (6, 6)
    for item, value, text in rows(wh, "select a.item, a.answer, c.text from answers a"
                                      " join llm_calls c on c.key = a.call_key"):
        answer = json.loads(text)
        assert value == f"{answer['count']} x {answer['colour']} for thing {item[1:]}"


def test_structured_is_on_by_default_for_the_embedded_model_only(wh: Warehouse) -> None:
    """Decided before the model loads; the request carries the shape."""
    embedded = TeacherJob(wh, "j", dataset=None, options=TeacherOptions(dry_run=True))
    assert embedded.backend.model == "SmolLM2-135M-Instruct.Q4_1.gguf" and embedded.structured
    assert "response_format" in embedded.request(PROMPT, works(1)[0]).param_dict()
    off = TeacherJob(wh, "j", dataset=None,
                     options=TeacherOptions(dry_run=True, structured=False))
    assert "response_format" not in off.request(PROMPT, works(1)[0]).param_dict()
    other = TeacherJob(wh, "j", dataset=None,
                       options=TeacherOptions(dry_run=True, model="/models/other"))
    assert not other.structured


def test_a_structured_batch_file_carries_the_schema_and_its_answers_parse(tmp_path) -> None:
    """--structured with --batch-file: each line's body is the online one, schema included;
    the results (here the simulated teacher's, as `vllm run_batch` writes them) import and
    are rendered for describe-items' parser."""
    from tiny_data import add_dataset, random_sequences

    wh = Warehouse(tmp_path / "factory.duckdb")
    add_dataset(wh, "tiny", random_sequences())
    batch, results = tmp_path / "b.jsonl", tmp_path / "r.jsonl"
    job = ["--warehouse", str(wh.path), "describe-items", "--dataset", "tiny", "--limit", "4",
           "--teacher-model", "simulated-teacher", "--structured"]

    def ok(*args: str) -> None:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, (result.output, result.exception)

    ok(*job, "--batch-file", str(batch))
    lines = [json.loads(x) for x in batch.read_text().splitlines()]
    assert len(lines) == 4 and all(
        x["body"]["response_format"]["json_schema"]["name"] == "describe_item" for x in lines)
    ok("--warehouse", str(wh.path), "testing", "run-batch", "-i", str(batch), "-o", str(results))
    ok(*job, "--import-batch", str(results))
    got = rows(wh, "select d.status, d.description, c.text from item_descriptions d"
                   " join llm_calls c on c.key = d.call_key")
    assert len(got) == 4
    for status, description, text in got:
        assert status == "ok" and json.loads(text) == {"sentence": description}
