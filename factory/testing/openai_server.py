"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It listens on 127.0.0.1 (a free port), answers `POST /v1/chat/completions` through a
pluggable responder, injects faults at a seeded rate, and records every request, so tests
can count exactly what a job sent::

    from factory.testing.openai_server import Faults, OpenAIServer

    def responder(body: dict) -> str:             # the parsed JSON request
        user = body["messages"][-1]["content"]
        return "Yes, because ..." if "Title: Heat" in user else "No, because ..."

    with OpenAIServer(responder, faults=Faults(rate=0.2, seed=1)) as server:
        ...  # point the job at server.url (http://127.0.0.1:PORT/v1)
        assert server.count("ok") == 20

A responder returns the answer text, or a dict with `content` (and optionally
`finish_reason`, `prompt_tokens`, `completion_tokens`, `model` (the answer's model field; default
the requested one), and `reasoning_content`: the thinking, sent beside the content as vLLM's
reasoning parsers and DeepSeek's API do); if it raises, the server answers 500.
A request with `response_format` {"type": "json_schema", ...} is answered as a constrained
server would: the responder sees the schema in the body (`asked_schema`); the default one
answers a JSON object that fits it. A json_schema without a schema is refused with 400.
Whether a request gets a fault is decided by hashing (seed, request body, how many times this
body was seen), so it does not depend on timing or order, and a retried request draws again.

It also speaks the batch API the `openai` client uses (`POST /v1/files` with purpose=batch,
`GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches[/{id}]`): each line of a
batch is answered by the same responder as a chat completion and recorded like one (path
`/v1/batches/<id>`), so both modes give the same answers. How batches progress and fail is
set by `batch_plan` (see BatchPlan); `hold_batches()` keeps them from progressing.
`n` > 1 gets n choices, the responder called once per choice with the request each choice
answers (`choice_bodies`): the same request without `n`, with the seed that choice stands
for when the client names them (SEEDS_HEADER, which factory's openai backend sends), so the
simulated teacher's choice i is what sample i gets when asked alone; a fault hits the whole
request. `max_choices` caps n (1: a server that ignores it, as llama.cpp's does). With
`logprobs: true` every choice carries per-token logprobs (`token_logprobs`).

Run it standalone (benchmarks start it in its own process): `python -m
factory.testing.openai_server --latency 0.2` prints the URL and serves until killed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from factory.teacher.backends import SEEDS_HEADER

Responder = Callable[[dict[str, Any]], "str | dict[str, Any]"]

#: the faults drawn at random by default
FAULT_KINDS = ("429", "500", "503", "slow", "drop", "malformed", "empty", "badjson")
#: ... and those only injected when asked for: `trickle` sends the headers at once and then
#: the body one byte every `trickle_s`; `hang` accepts the request and never answers
SLOW_FAULT_KINDS = ("trickle", "hang")
#: only when asked for too: `length` answers as a model that ran out of tokens does, the
#: answer cut after max_tokens words (half its words when it is shorter or none was sent)
#: with finish_reason "length" (a reasoning model is cut inside its <think> block)
CUT_FAULT_KINDS = ("length",)
#: what a "malformed" answer says: no words, so any sensible parser rejects it
MALFORMED_CONTENT = "~~~#%$@~~~"
_TOKEN = re.compile(r"\s*\S+|\s+")
_ALTERNATIVES = (" the", " a", ",", " and", ".", " of", " to", " it", " Yes", " No")


def request_key(body: dict[str, Any]) -> str:
    """Hash of a request body, as the server saw it (for counting repeated requests)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _unit(*parts: Any) -> float:
    """A number in [0, 1) fixed by `parts`."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choice_bodies(body: dict[str, Any], seeds: list[int] | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """The request each choice of `body` answers: the request without `n`; for choice i > 0
    with seeds[i] (the seeds the client named), else with a seed drawn from the request's seed
    and i. At most `limit` choices."""
    n = max(1, int(body.get("n") or 1))
    alone = {k: v for k, v in body.items() if k != "n"}
    if seeds is None or len(seeds) != n:
        seeds = [alone.get("seed", 0)] + [int(_unit(alone.get("seed", 0), "choice", i) * 2**31)
                                          for i in range(1, n)]
    return [alone if i == 0 else {**alone, "seed": seeds[i]}
            for i in range(min(n, limit or n))]


def token_logprobs(content: str, top: int) -> list[dict[str, Any]]:
    """Plausible per-token logprobs for `content` (tokens: words with their leading space),
    deterministic: the drawn token has probability 0.35-1 and is the most likely; `top`
    alternatives share what is left."""
    out = []
    for i, token in enumerate(_TOKEN.findall(content)):
        p = 0.35 + 0.65 * _unit("logprob", i, token)
        alternatives = [a for a in _ALTERNATIVES if a != token][:max(0, top - 1)]
        ranked = [(token, p)] + [(a, (1 - p) / 2 ** (j + 1)) for j, a in enumerate(alternatives)]
        out.append({"token": token, "logprob": math.log(p), "bytes": list(token.encode()),
                    "top_logprobs": [{"token": t, "logprob": math.log(q) if q > 0 else -9999.0,
                                      "bytes": list(t.encode())} for t, q in ranked[:top]]})
    return out


def default_responder(body: dict[str, Any]) -> str:
    """A deterministic one-sentence answer that names the request it answers (under a JSON
    schema: a conforming object whose strings are that sentence)."""
    words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    text = f"This canned answer {request_key(body)[:8]} replies to a {words}-word prompt."
    schema = asked_schema(body)
    return text if schema is None else json.dumps(conforming(schema, text))


def asked_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request's `response_format` asks for, or None."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = (fmt.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def conforming(schema: dict[str, Any], text: str) -> Any:
    """A value that fits `schema` (objects, arrays, strings, numbers, enums), its strings
    cut from `text`: what a server decoding under the schema could answer."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: conforming(v, text) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [conforming(schema.get("items", {}), text)] * max(1, schema.get("minItems", 1))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    return text[:schema.get("maxLength", len(text))]


def _cut(content: str, max_tokens: int | None) -> str:
    """`content` as a model that ran out of tokens leaves it (words stand for tokens)."""
    words = content.split(" ")
    keep = max_tokens if max_tokens and max_tokens < len(words) else max(1, len(words) // 2)
    return " ".join(words[:keep])


@dataclass
class Faults:
    """Inject a fault into a share `rate` of requests, drawn from `kinds`.

    `slow` sleeps `slow_s` before answering (set it above the client's timeout); `429` sends
    `Retry-After: retry_after`; `drop` closes the connection without an answer; `malformed`
    and `empty` are well-formed completions with useless content; `badjson` is not JSON.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    retry_after: float = 0.05
    slow_s: float = 2.0
    trickle_s: float = 0.25

    def draw(self, key: str, nth: int) -> str | None:
        if self.rate <= 0:
            return None
        digest = hashlib.sha256(f"{self.seed}:{key}:{nth}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.rate:
            return None
        return self.kinds[int.from_bytes(digest[8:12], "big") % len(self.kinds)]


@dataclass
class BatchPlan:
    """How the server's batches go: each `GET /v1/batches/{id}` moves a batch one status on,
    through `statuses` (the first is what creating it returns), then to `end`:

    - completed: every line answered (faults drawn per line as for chat completions: 429,
      500, 503 and the connection faults become error-file lines, malformed and empty stay
      answers);
    - expired / cancelled: the first `answered` lines answered, the rest in the error file
      (code batch_expired / batch_cancelled);
    - failed: nothing answered, `errors` says why.

    `retrieve_errors`: the first N retrieves of each batch answer 500 (a client must retry);
    `lost_creates`: the first N batches are created but the connection drops before the
    answer (a client that simply retries creates a second batch and pays twice);
    `garbled_lines`: the first N lines of each output file are cut in half (not JSON).
    """

    statuses: tuple[str, ...] = ("validating", "in_progress", "finalizing")
    end: str = "completed"
    answered: int = 0
    retrieve_errors: int = 0
    lost_creates: int = 0
    garbled_lines: int = 0


#: faults that a batch line gets as an error-file line (with this status), not as an answer
_LINE_ERRORS = {"429": 429, "500": 500, "503": 503, "drop": 500, "badjson": 500}


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    lines: list[dict[str, Any]]
    created_at: int
    step: int = 0
    retrieves: int = 0
    status: str = ""
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        done = self.status in ("completed", "failed", "expired", "cancelled")
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "input_file_id": self.input_file_id, "completion_window": "24h",
            "status": self.status, "created_at": self.created_at,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            f"{self.status}_at" if done else "in_progress_at": self.created_at + self.step,
            "request_counts": {"total": len(self.lines), "completed": self.completed,
                               "failed": self.failed},
            "metadata": self.metadata or None,
        }


@dataclass
class Record:
    key: str
    body: dict[str, Any]
    outcome: str           # ok | a fault kind | held | unauthorized | 400 | error
    delivered: bool = True
    done: bool = False     # the handler finished (answered, failed or gave up)
    path: str = ""         # as requested, query included
    #: request_key of the request each choice answers as if asked alone (choice_bodies): one
    #: key per sample, whether it was asked alone or as a choice of an `n` request
    choices: list[str] = field(default_factory=list)


@dataclass
class OpenAIServer:
    """The server; start() it (or use it as a context manager) and read `url`."""

    responder: Responder = default_responder
    latency: float = 0.0
    faults: Faults = field(default_factory=Faults)
    api_key: str | None = None
    #: answer 400 with the received headers echoed back (a careless server leaking the key)
    echo_headers_with_400: bool = False
    #: answer 400 quoting the bearer key in its message (no "Bearer" before it), encoded as
    #: PHP and Go servers do: `/` as `\/`, `&<>` and non-ASCII as `\uXXXX`, `"` as `\"`
    echo_key_with_400: bool = False
    records: list[Record] = field(default_factory=list)
    #: when given, the only model ids served (listed by /v1/models; any other answers 404),
    #: so a simulated server cannot be mistaken for the real model a job names
    model_ids: tuple[str, ...] = ()
    batch_plan: BatchPlan = field(default_factory=BatchPlan)
    #: uploaded files (id -> (purpose, content)) and created batches, in order
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    batches: dict[str, _Batch] = field(default_factory=dict)
    #: the most choices one request gets, whatever its `n` (None: n; 1: n is ignored)
    max_choices: int | None = None
    #: answer 400 to a request for several choices (a model that takes no `n`)
    refuse_n: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self._admitted_ok = 0
        self._hold_after: int | None = None
        self._released = threading.Event()
        self._batches_held = False
        self._stopping = threading.Event()
        self._log: Any = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, port: int = 0) -> OpenAIServer:
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = _HTTPServer(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="openai-test-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- control and counts -------------------------------------------------------------
    def hold_after(self, answered: int) -> None:
        """After `answered` successful answers, keep further requests waiting until
        release(); they are then answered 503 and recorded as `held`."""
        self._released.clear()
        self._hold_after = answered

    def release(self) -> None:
        self._hold_after = None
        self._batches_held = False
        self._released.set()

    def hold_batches(self) -> None:
        """Keep every batch at its current status (retrieves still answer) until release()."""
        self._batches_held = True

    def batch_retrieves(self) -> int:
        """GET /v1/batches/{id} answered so far, over all batches."""
        with self._lock:
            return sum(b.retrieves for b in self.batches.values())

    def count(self, outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.records if outcome is None or r.outcome == outcome)

    def answered_keys(self) -> list[str]:
        """Keys of requests that got a successful answer, in order (repeats included)."""
        with self._lock:
            return [r.key for r in self.records if r.outcome == "ok" and r.delivered]

    def reset(self) -> None:
        with self._lock:
            self.records.clear()
            self._seen.clear()
            self._admitted_ok = 0

    # -- handling -------------------------------------------------------------------------
    def _admit(self, key: str, body: dict[str, Any], authorized: bool) -> Record:
        with self._lock:
            nth = self._seen[key]
            self._seen[key] += 1
            if not authorized:
                outcome = "unauthorized"
            elif self.echo_headers_with_400 or self.echo_key_with_400:
                outcome = "400"
            else:
                outcome = self.faults.draw(key, nth) or "ok"
                held = self._hold_after is not None and self._admitted_ok >= self._hold_after
                if outcome == "ok" and held:
                    outcome = "held"
                if outcome == "ok":
                    self._admitted_ok += 1
            record = Record(key, body, outcome)
            self.records.append(record)
            return record

    def completion(self, record: Record, bodies: list[dict[str, Any]]) -> dict[str, Any]:
        """The chat completion answering `bodies` (choice_bodies of a request, or of a batch
        line's body), with the record's fault (malformed, empty) applied; raises when the
        responder does."""
        outcome, body = record.outcome, bodies[0]
        answers = [{"content": a} if isinstance(a, str) else a
                   for a in (self.responder(b) for b in bodies)]
        prompt_tokens = answers[0].get("prompt_tokens", sum(
            len(str(m.get("content", "")).split()) for m in body.get("messages", [])))
        choices, completion_tokens = [], 0
        for i, answer in enumerate(answers):
            content = {"malformed": MALFORMED_CONTENT, "empty": ""}.get(outcome,
                                                                      answer["content"])
            finish = answer.get("finish_reason", "stop")
            if outcome == "length":
                content, finish = _cut(content, body.get("max_tokens")), "length"
            completion_tokens += answer.get("completion_tokens", len(content.split()))
            message = {"role": "assistant", "content": content}
            if answer.get("reasoning_content") is not None and outcome == "ok":
                message["reasoning_content"] = answer["reasoning_content"]
            choice = {"index": i, "message": message, "finish_reason": finish}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": token_logprobs(
                    content, int(body.get("top_logprobs") or 0))}
            choices.append(choice)
        return {
            "id": f"chatcmpl-{record.key[:12]}", "object": "chat.completion",
            "created": 0, "model": answers[0].get("model", body.get("model", "")),
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    # -- files and batches ----------------------------------------------------------------
    def add_file(self, purpose: str, content: bytes) -> str:
        with self._lock:
            file_id = f"file-{len(self.files) + 1:04d}"
            self.files[file_id] = (purpose, content)
        return file_id

    def file_json(self, file_id: str, name: str = "") -> dict[str, Any]:
        purpose, content = self.files[file_id]
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                "filename": name or f"{file_id}.jsonl", "purpose": purpose,
                "status": "processed"}

    def create_batch(self, request: dict[str, Any]) -> _Batch:
        """A batch of the lines of an uploaded file; lines that are not requests to the
        batch's endpoint make it fail validation, as a provider's would."""
        file_id, endpoint = request.get("input_file_id"), request.get("endpoint")
        lines, errors = [], []
        if file_id not in self.files:
            errors.append({"code": "invalid_file", "message": f"no file {file_id}"})
        else:
            custom_ids: set[str] = set()
            for n, raw in enumerate(self.files[file_id][1].decode().splitlines(), 1):
                try:
                    line = json.loads(raw)
                    assert line["method"] == "POST" and line["url"] == endpoint
                    assert isinstance(line["body"], dict) and line["custom_id"] not in custom_ids
                    custom_ids.add(line["custom_id"])
                    lines.append(line)
                except (ValueError, KeyError, TypeError, AssertionError):
                    errors.append({"code": "invalid_request", "line": n,
                                   "message": f"line {n} is not a unique request to {endpoint}"})
        plan = self.batch_plan
        with self._lock:
            batch = _Batch(f"batch_{len(self.batches) + 1:04d}", str(file_id), str(endpoint),
                           lines, int(time.time()), metadata=request.get("metadata") or {})
            self.batches[batch.id] = batch
        batch.status = plan.statuses[0] if plan.statuses else plan.end
        if errors:
            batch.errors, batch.status = errors, "failed"
        elif batch.status == plan.end:
            self._finish(batch)
        return batch

    def retrieve_batch(self, batch: _Batch) -> bool:
        """Move `batch` one status on; False: this retrieve is answered 500 (a fault)."""
        plan = self.batch_plan
        with self._lock:
            batch.retrieves += 1
            if batch.retrieves <= plan.retrieve_errors:
                return False
            if batch.status == "failed" or batch.status == plan.end or self._batches_held:
                return True
            batch.step += 1
            batch.status = (plan.statuses[batch.step] if batch.step < len(plan.statuses)
                            else plan.end)
        if batch.status == plan.end:
            self._finish(batch)
        return True

    def _finish(self, batch: _Batch) -> None:
        """Answer the lines (those an expired or cancelled batch got to) into its files."""
        plan = self.batch_plan
        if plan.end == "failed":
            batch.errors = batch.errors or [{"code": "injected", "message": "batch failed"}]
            return
        out, err = [], []
        for n, line in enumerate(batch.lines):
            body, custom_id = line["body"], line["custom_id"]
            key = request_key(body)
            entry: dict[str, Any] = {"id": f"batch_req_{key[:12]}", "custom_id": custom_id,
                                     "response": None, "error": None}
            if plan.end != "completed" and n >= plan.answered:
                code = f"batch_{plan.end}"
                entry["error"] = {"code": code, "message": f"not answered: the batch {plan.end}"}
                with self._lock:
                    self.records.append(Record(key, body, code, delivered=False, done=True,
                                               path=f"/v1/batches/{batch.id}"))
                err.append(entry)
                continue
            record = self._admit(key, body, authorized=True)
            record.path, record.done = f"/v1/batches/{batch.id}", True
            status = _LINE_ERRORS.get(record.outcome)
            if self.model_ids and body.get("model") not in self.model_ids:
                status, record.outcome = 404, "400"
            if status is None:
                try:
                    answer = self.completion(record, choice_bodies(body, None, self.max_choices))
                    entry["response"] = {"status_code": 200, "request_id": key[:12],
                                         "body": answer}
                    out.append(entry)
                    continue
                except Exception as exc:   # a responder bug: an error line the test can see
                    status, record.outcome = 500, "error"
                    message = f"responder failed: {exc!r}"
            else:
                message = f"injected {record.outcome}" if status != 404 else (
                    f"model {body.get('model')!r} is not served here")
            record.delivered = False
            entry["response"] = {"status_code": status, "request_id": key[:12], "body": {
                "error": {"message": message, "type": "test_server", "code": status}}}
            err.append(entry)
        batch.completed, batch.failed = len(out), len(err)
        if out:
            data = _jsonl(out).splitlines(keepends=True)
            for n in range(min(plan.garbled_lines, len(data))):
                data[n] = data[n][:len(data[n]) // 2] + b"\n"
            batch.output_file_id = self.add_file("batch_output", b"".join(data))
        if err:
            batch.error_file_id = self.add_file("batch_output", _jsonl(err))

    def run_batch(self, content: bytes) -> bytes:
        """What `vllm run_batch` makes of a batch input file: one output file holding every
        line's answer or error (the lines are recorded as a batch's are)."""
        batch = self.create_batch({"input_file_id": self.add_file("batch", content),
                                   "endpoint": "/v1/chat/completions"})
        if batch.errors:
            raise ValueError("; ".join(e["message"] for e in batch.errors))
        if batch.status != self.batch_plan.end:
            self._finish(batch)
        return b"".join(self.files[f][1] for f in (batch.output_file_id, batch.error_file_id)
                        if f is not None)

    def log_to(self, path: str) -> None:
        """Also append `<outcome> <delivered> <key>` per finished request to `path` (line
        buffered), so a benchmark can count what was answered across a job's kill."""
        self._log = open(path, "a", buffering=1, encoding="ascii")  # noqa: SIM115

    def _logged(self, record: Record) -> None:
        if self._log is not None:
            with self._lock:
                self._log.write(f"{record.outcome} {int(record.delivered)} {record.key}\n")


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (what `files.create` uploads)."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = part.get_payload(decode=True) or b""
    return fields


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024          # the default 5 drops connections at high concurrency

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up (a timeout, a killed job) is normal here, not worth a trace."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # else headers and body wait 40 ms for a delayed ACK
    server_state: OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> bool:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return False

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> bool:
        body = {"error": {"message": message, "type": "test_server", "code": status}}
        return self._send(status, json.dumps(body).encode(), headers)

    def _authorized(self) -> bool:
        key = self.server_state.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    def _json(self, payload: dict[str, Any]) -> bool:
        return self._send(200, json.dumps(payload).encode())

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        state = self.server_state
        parts = urlsplit(self.path).path.rstrip("/").split("/")
        if parts[-1] == "models":
            models = [{"id": m, "object": "model", "owned_by": "factory.testing"}
                      for m in state.model_ids]
            self._json({"object": "list", "data": models})
        elif not self._authorized():
            self._error(401, "invalid api key")
        elif parts[-1] == "batches":          # newest first, one page
            data = [b.json() for b in reversed(list(state.batches.values()))]
            self._json({"object": "list", "data": data, "has_more": False,
                        "first_id": data[0]["id"] if data else None,
                        "last_id": data[-1]["id"] if data else None})
        elif parts[-2] == "batches" and parts[-1] in state.batches:
            batch = state.batches[parts[-1]]
            if state.retrieve_batch(batch):
                self._json(batch.json())
            else:
                self._error(500, "injected error retrieving the batch")
        elif parts[-3:-2] == ["files"] and parts[-1] == "content" and parts[-2] in state.files:
            content = state.files[parts[-2]][1]
            self._send(200, content, {"Content-Type": "application/octet-stream"})
        elif parts[-2] == "files" and parts[-1] in state.files:
            self._json(state.file_json(parts[-1]))
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        state = self.server_state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        route = urlsplit(self.path).path.rstrip("/")
        if route.endswith(("/files", "/batches")):
            self._batch_api(route, raw)
            return
        if not route.endswith("/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "request body is not JSON")
            return
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and (
                asked_schema(body) is None):
            self._error(400, "response_format json_schema needs json_schema.schema (an object)")
            return
        if state.model_ids and body.get("model") not in state.model_ids:
            self._error(404, f"model {body.get('model')!r} is not served here; this server "
                             f"serves {', '.join(state.model_ids)}")
            return
        key = request_key(body)
        auth = self.headers.get("Authorization", "")
        authorized = state.api_key is None or auth == f"Bearer {state.api_key}"
        record = state._admit(key, body, authorized)
        record.path = self.path
        header = self.headers.get(SEEDS_HEADER)
        try:
            seeds = [int(x) for x in header.split(",")] if header else None
        except ValueError:
            seeds = None
        bodies = choice_bodies(body, seeds, state.max_choices)
        record.choices = [request_key(b) for b in bodies]
        if state.latency:
            time.sleep(state.latency)
        if state.refuse_n and len(bodies) > 1:
            record.outcome = "400"
            record.delivered = self._error(400, "n > 1 is not supported by this model")
        else:
            record.delivered = self._respond(record, bodies)
        record.done = True
        state._logged(record)

    def _batch_api(self, route: str, raw: bytes) -> None:
        """POST /v1/files (multipart upload) and POST /v1/batches."""
        state = self.server_state
        if not self._authorized():
            self._error(401, "invalid api key")
        elif route.endswith("/files"):
            fields = _multipart(self.headers.get("Content-Type", ""), raw)
            if "file" not in fields or fields.get("purpose") != b"batch":
                self._error(400, "expected a multipart upload of `file` with purpose=batch")
                return
            self._json(state.file_json(state.add_file("batch", fields["file"])))
        else:
            try:
                request = json.loads(raw)
            except ValueError:
                self._error(400, "request body is not JSON")
                return
            batch = state.create_batch(request)
            if len(state.batches) <= state.batch_plan.lost_creates:
                self.close_connection = True       # created, but the answer never arrives
                return
            self._json(batch.json())

    def _respond(self, record: Record, bodies: list[dict[str, Any]]) -> bool:
        state, outcome = self.server_state, record.outcome
        faults = state.faults
        if outcome == "unauthorized":
            return self._error(401, "invalid api key")
        if outcome == "400" and state.echo_key_with_400:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            message = {"error": {"message": f"invalid request for key {token}", "code": 400}}
            escaped = json.dumps(message).replace("/", "\\/")
            for c in "&<>":
                escaped = escaped.replace(c, f"\\u{ord(c):04x}")
            return self._send(400, escaped.encode())
        if outcome == "400":
            echoed = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
            return self._error(400, f"bad request; you sent headers {echoed}")
        if outcome == "held":
            state._released.wait()
            return self._error(503, "server was holding this request")
        if outcome == "429":
            return self._error(429, "rate limited", {"Retry-After": f"{faults.retry_after:g}"})
        if outcome in ("500", "503"):
            return self._error(int(outcome), "injected server error")
        if outcome == "drop":
            self.close_connection = True
            return False
        if outcome == "badjson":
            return self._send(200, b'{"choices": [ this is not json')
        if outcome == "hang":
            state._stopping.wait()
            self.close_connection = True
            return False
        if outcome == "slow":
            time.sleep(faults.slow_s)
        try:
            payload = state.completion(record, bodies)
        except Exception as exc:  # a responder bug shows up as a 500 the test can see
            record.outcome = "error"
            return self._error(500, f"responder failed: {exc!r}")
        data = json.dumps(payload).encode()
        if outcome == "trickle":
            return self._trickle(data, faults.trickle_s)
        return self._send(200, data)

    def _trickle(self, payload: bytes, every_s: float) -> bool:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.flush()
            for i in range(len(payload)):
                if self.server_state._stopping.wait(every_s):
                    self.close_connection = True
                    return False
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-kinds", default=",".join(FAULT_KINDS),
                        help="comma-separated, of "
                             f"{', '.join(FAULT_KINDS + SLOW_FAULT_KINDS + CUT_FAULT_KINDS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", help="append one line per finished request to this file")
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)      # many handler threads wake at once: hand the GIL over fast
    kinds = tuple(k for k in args.fault_kinds.split(",") if k)
    server = OpenAIServer(latency=args.latency, faults=Faults(rate=args.fault_rate,
                                                             kinds=kinds, seed=args.seed))
    if args.log:
        server.log_to(args.log)
    server.start(args.port)
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
