"""Batch mode (`--mode batch`): the teacher's requests go out as a provider batch.

The engine runs as online, except that an uncached request is deferred instead of sent
(`Rounds.defer`; its item gets no row yet). Once every item has been through, one round:

1. batches recorded in `teacher_batches` and not yet imported that hold deferred requests are
   resumed (polled, never submitted again: a run killed while polling loses nothing);
2. the other deferred requests become a batch input file (custom_id = the request key, body =
   exactly what the online path sends), uploaded and created at the provider; the batch and
   its lines (custom_id -> llm_calls keys with their canonical requests) are recorded before
   it is created;
3. every batch is polled (`--poll-s`; one line per status) until it ends, then its output and
   error files are imported into `llm_calls` at batch prices, in the transaction that marks
   it imported. A request without an answer (an error line, a failed or expired batch) gets a
   failed row saying why, so a re-run sends it again;
4. the deferred items run again: their answers come from the cache, the parser judges them,
   their rows are stored; an answer the parser rejects defers its redraw: another round.

`--batch-file PATH` writes the input file (for `vllm run_batch`) instead of steps 1-3 and
records it as a pending file batch; `--import-batch FILE` reads such a run's output file into
the cache before the job runs. Every answer lands in the same cache as an online answer, so
switching modes never pays twice.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from factory.console import console
from factory.errors import FactoryError
from factory.teacher.backends import OpenAIBackend, reply_from_body
from factory.teacher.keys import redact, safe_url
from factory.teacher.limits import JobError, RequestError, TransientError, with_retries
from factory.teacher.options import TeacherOptions, recorded_argv
from factory.teacher.request import Request
from factory.teacher.store import answer_fields, json_or_none, upsert, write_calls

if TYPE_CHECKING:
    from factory.teacher.engine import TeacherJob, Work, _RunState

T = TypeVar("T")
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
#: a batch in one of these statuses changes no more
ENDED = ("completed", "failed", "expired", "cancelled")
#: statuses of a recorded batch given up (the provider lost it, --abandon-batches): its
#: requests may be sent again
GIVEN_UP = ("lost", "abandoned")
#: a recorded batch whose answers may still come: not imported, not given up
PENDING = f"imported_at is null and status not in {GIVEN_UP!r}"
#: how often a poll's wait looks for a signal
WAKE_S = 0.1
#: what one provider batch may hold (OpenAI: 50,000 requests, 200 MB); more is split
MAX_LINES, MAX_BYTES = 50_000, 190 << 20


def file_backend(options: TeacherOptions, api_key: str | None) -> OpenAIBackend | None:
    """The backend of --batch-file / --import-batch without --teacher-url: it only builds
    request bodies (the model id is what `vllm run_batch --model` serves); nothing is sent."""
    if not options.batch_offline or options.url:
        return None
    if not options.model:
        raise FactoryError("--batch-file / --import-batch need --teacher-model: the model id "
                           "in each request (what `vllm run_batch --model` serves)")
    return OpenAIBackend("", options.model, api_key, options.timeout)


@dataclass
class Batch:
    """A recorded batch (a teacher_batches row)."""

    batch_id: str
    kind: str
    provider_batch_id: str | None
    input_file_id: str | None
    status: str
    requests: int
    run_id: str
    created_at: float      # epoch seconds
    url: str | None = None  # where it was submitted (safe_url: credentials removed)


_BATCH_COLUMNS = ("batch_id, kind, provider_batch_id, input_file_id, status, requests, run_id,"
                  " epoch(created_at), url")


def say(line: str) -> None:
    """One line of what batch mode does, unwrapped (logs grep it)."""
    console.print(line, highlight=False, soft_wrap=True, markup=False)


def read_output(text: str, where: str, strict: bool = True) -> list[dict[str, Any]]:
    """The lines of a batch output (or error) file. A line that is not one is a one-line
    error naming its number, or without `strict` (a provider's file: its request counts as
    unanswered, and is sent again by the next run) a warning. `strict` also refuses a
    custom_id given twice (which answer would count?)."""
    lines, bad, seen = [], [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        why = "not JSON" if line is None else _problem(line)
        if why is None and strict and line["custom_id"] in seen:
            why = f"custom_id {line['custom_id']!r} again (first: line {seen[line['custom_id']]})"
        if why is None:
            seen[line["custom_id"]] = n
            lines.append(line)
            continue
        if strict:
            raise FactoryError(f"{where} line {n}: {why}; expected a batch output line "
                               '{"custom_id", "response": {"status_code", "body"}, "error"}; '
                               "nothing imported")
        bad.append(n)
    if bad:
        say(f"{where}: {len(bad):,} malformed line(s) skipped (first: line {bad[0]}); "
            "their requests count as unanswered")
    return lines


#: more tokens than one request can have: a usage count past it is not a real one
MAX_TOKENS = 100_000_000


def _problem(line: Any) -> str | None:
    """Why `line` is not a batch output line, or None. An answer (status 200, no error) must
    be a chat completion whose usage counts are whole tokens: it is priced and stored."""
    response = line.get("response") if isinstance(line, dict) else None
    if not (isinstance(line, dict) and isinstance(line.get("custom_id"), str) and (
            isinstance(response, dict) and isinstance(response.get("status_code"), int)
            or response is None and line.get("error"))):
        return ("not a batch output line (needs a custom_id and a response with a "
                "status_code, or an error)")
    if response is None or response["status_code"] != 200 or line.get("error"):
        return None                    # a failed request: legitimate, stored as failed
    body = response.get("body")
    choices = body.get("choices") if isinstance(body, dict) else None
    if not (isinstance(choices, list) and choices and all(
            isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)):
        return "its body is not a chat completion (needs choices with a message each)"
    usage = body.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return "its usage is not an object"
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if value is not None and not (type(value) is int and 0 <= value <= MAX_TOKENS):
            return f"usage.{name} = {value!r} is not a token count"
    return None


def _line_error(line: dict[str, Any]) -> tuple[str, str | None]:
    """(why, response body) of an output line that carries no answer."""
    response = line.get("response") or {}
    body = response.get("body")
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None)
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        what = str(message or code or "error")
        if isinstance(code, str) and code and message:     # batch_expired: ...
            what = f"{code}: {message}"
    else:
        what = str(error or body or "no answer")
    status = response.get("status_code")
    prefix = f"HTTP {status}: " if status else ""
    return (f"batch line {prefix}{what}",
            json.dumps(body) if isinstance(body, (dict, list)) else body)


class BatchMode:
    """Batch mode of one TeacherJob: recording, submitting, polling and importing."""

    def __init__(self, job: TeacherJob):
        self.job = job
        self.options = job.options
        self.serial = 0
        self.file_written = False          # later rounds of the job append to --batch-file
        self.imported: list[dict[str, Any]] | None = None   # --import-batch rows, to count
        if not isinstance(job.backend, OpenAIBackend):
            raise FactoryError(f"--mode batch needs OpenAI-compatible requests, not the "
                               f"{job.backend.name} backend")
        self.backend: OpenAIBackend = job.backend

    def rounds(self, state: _RunState) -> Rounds:
        rounds = Rounds(self, state)
        for row in self.imported or ():    # what --import-batch brought counts in this run
            rounds.count(row)
        self.imported = []
        return rounds

    def next_id(self) -> str:
        self.serial += 1
        return f"{self.job.run_id}-b{self.serial}"

    # -- llm_calls rows from output lines ---------------------------------------------------
    def rows(self, batch_id: str, run_id: str, answers: dict[str, list[dict[str, Any]]],
             lines: Iterable[dict[str, Any]], missing: str | None = None
             ) -> list[dict[str, Any]]:
        """One llm_calls row per answer of `answers` (custom_id -> its recorded calls) that
        `lines` hold: choice i of a line answers its call i. With `missing`, a call without
        a line gets a failed row saying that."""
        key, pricing = self.job._key, self.job.pricing
        secrets = self.backend.secrets
        rows = []
        seen = set()
        for line in lines:
            calls = answers.get(line["custom_id"])
            if calls is None or line["custom_id"] in seen:
                continue
            seen.add(line["custom_id"])
            response = line.get("response") or {}
            body = response.get("body")
            if response.get("status_code") != 200 or body is None or line.get("error"):
                why, raw = _line_error(line)
                rows += [self._failed(batch_id, run_id, call, why, raw) for call in calls]
                continue
            for i, call in enumerate(calls):
                if len(calls) == 1 or not isinstance(body, dict):
                    text = body if isinstance(body, str) else json.dumps(body)
                else:   # several samples in one request: choice i answers call i
                    text = json.dumps({**body, "choices": (body.get("choices") or [])[i:i + 1],
                                       "usage": body.get("usage") if i == 0 else None})
                try:
                    reply = reply_from_body(text, secrets)
                except TransientError as exc:
                    rows.append(self._failed(batch_id, run_id, call, str(exc), exc.body))
                    continue
                rows.append({**self._row(batch_id, run_id, call),
                             **answer_fields(reply, pricing, key), "latency_s": None})
        for custom_id, calls in answers.items():
            if missing is not None and custom_id not in seen:
                rows += [self._failed(batch_id, run_id, call, missing, None) for call in calls]
        return rows

    def _row(self, batch_id: str, run_id: str, call: dict[str, Any]) -> dict[str, Any]:
        model = json.loads(call["request"])["model"]      # the request's, whatever this run's
        return {"key": call["key"], "model": model, "backend": self.backend.name,
                "sample": call["sample"], "draw": call["draw"], "request": call["request"],
                "attempts": 1, "run_id": run_id, "mode": "batch", "batch_id": batch_id}

    def _failed(self, batch_id: str, run_id: str, call: dict[str, Any], why: str,
                body: str | None) -> dict[str, Any]:
        key = self.job._key
        return {**self._row(batch_id, run_id, call), "status": "failed",
                "error": redact(why, key), "response": json_or_none(body, key)}

    def store(self, con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
        """Write `rows` to llm_calls, leaving alone keys already answered (importing twice adds
        nothing; with --refresh a new answer replaces the old); returns the rows written."""
        if not self.options.refresh:
            keys = [r["key"] for r in rows]
            have = {k for (k,) in con.execute(
                "select key from llm_calls where status = 'ok' and key in"
                " (select unnest(?::varchar[]))", [keys]).fetchall()}
            rows = [r for r in rows if r["key"] not in have]
        write_calls(con, rows)
        return rows

    # -- --import-batch ---------------------------------------------------------------------
    def import_file(self) -> None:
        """--import-batch FILE: its lines answer requests of recorded batch files; checked
        whole (an unknown custom_id or a malformed line imports nothing), then stored in one
        transaction; once per job."""
        path = self.options.import_batch
        if path is None or self.imported is not None:
            return
        where = f"--import-batch {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FactoryError(f"{where}: {getattr(exc, 'strerror', None) or exc}") from None
        lines = read_output(text, where)
        if not lines:
            raise FactoryError(f"{where}: no lines; expected the output file of `vllm "
                               "run_batch` (or a provider's batch)")
        ids = [ln["custom_id"] for ln in lines]
        with self.job.wh.write() as con:
            # only this job's (and dataset's) files: another job's answers are not ours
            mine = "b.job = ? and b.dataset is not distinct from ?"
            known = con.execute(
                "select l.custom_id, any_value(l.batch_id), any_value(l.answers)"
                " from teacher_batch_lines l join teacher_batches b using (batch_id)"
                f" where b.kind = 'file' and {mine} and l.custom_id in"
                " (select unnest(?::varchar[])) group by l.custom_id",
                [self.job.job, self.job.dataset, ids]).fetchall()
            found = {c for c, _, _ in known}
            other = con.execute(
                "select any_value(b.job), any_value(b.dataset) from teacher_batch_lines l"
                " join teacher_batches b using (batch_id) where b.kind = 'file' and not"
                f" ({mine}) and l.custom_id in (select unnest(?::varchar[]))",
                [self.job.job, self.job.dataset, [c for c in ids if c not in found]]
            ).fetchone()
            if other is not None and other[0] is not None:
                raise FactoryError(
                    f"{where}: the results of a batch file written for {other[0]} on "
                    f"{other[1] or 'no dataset'}, not {self.job.job} on "
                    f"{self.job.dataset or 'no dataset'}; import it with that job; "
                    "nothing imported")
            unknown = [(n, c) for n, c in enumerate(ids, 1) if c not in found]
            if unknown:
                n, custom_id = unknown[0]
                raise FactoryError(
                    f"{where}: custom_id {custom_id!r} (line {n}) is not a request of a "
                    f"batch file written by --batch-file to this warehouse"
                    + (f" ({len(unknown) - 1:,} more unknown)" if len(unknown) > 1 else "")
                    + "; nothing imported")
            batches: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for custom_id, batch_id, answers in known:
                batches.setdefault(batch_id, {})[custom_id] = answers
            # the importing run's rows: its counts hold them
            rows = [row for batch_id, answers in batches.items()
                    for row in self.rows(batch_id, str(self.job.run_id), answers, lines)]
            written = self.store(con, rows)
            # every batch file holding these requests (one written twice too) is answered
            con.execute("update teacher_batches set imported_at = current_timestamp,"
                        " finished_at = current_timestamp, status = 'imported'"
                        " where kind = 'file' and imported_at is null and batch_id in"
                        " (select batch_id from teacher_batch_lines where custom_id in"
                        " (select unnest(?::varchar[])))", [ids]).fetchall()
        ok, already = sum(r["status"] == "ok" for r in written), len(rows) - len(written)
        say(f"imported {ok:,} answers and {len(written) - ok:,} errors from {path}"
            + (f"; {already:,} were in the cache already" if already else ""))
        self.imported = written


class Rounds:
    """The deferred requests of one run() and the batch rounds that answer them."""

    def __init__(self, mode: BatchMode, state: _RunState):
        self.mode, self.state = mode, state
        self.job, self.options, self.backend = mode.job, mode.options, mode.backend
        self.deferred: dict[str, Request] = {}
        self.estimates = 0.0                       # reserved for the deferred requests
        self.waiting_items: list[tuple[Work, Request]] = []
        self.failed: dict[str, str] = {}           # keys this run's batches failed to answer
        #: keys held by pending batches this run cannot poll (another URL): never sent
        self.blocked: set[str] = set()
        self.blocked_line: str | None = None

    # -- called by the engine ---------------------------------------------------------------
    def defer(self, req: Request) -> str | None:
        """An uncached request: the error its batch gave it, or None (deferred, or left for
        a re-run when the budget would not cover it)."""
        if req.key in self.failed:
            return self.failed[req.key]
        if req.key in self.deferred or req.key in self.blocked:
            return None
        estimate = self.state.estimate(req)
        if self.state.over_budget(estimate):
            return None
        self.deferred[req.key] = req
        self.state.reserved += estimate
        self.estimates += estimate
        return None

    def waiting(self, work: Work, first: Request, req: Request) -> None:
        """The item whose request `req` was deferred runs again after the round."""
        if req.key in self.deferred:
            self.waiting_items.append((work, first))

    async def run(self) -> None:
        """Rounds until nothing is deferred (or a signal, a fatal error, a batch file)."""
        state = self.state
        while self.deferred and not (state.interrupted or state.fatal):
            if self.options.batch_file is not None:
                await asyncio.to_thread(self._write_file)
                break
            # an import run only imports (README: the next round is a --batch-file); without
            # --teacher-url there is nowhere to send the rest anyway
            if self.options.import_batch is not None or not self.options.url:
                state._stop(f"{len(self.deferred):,} requests still need an answer (redraws "
                            "of rejected answers, or lines the results lacked): write them "
                            "with --batch-file PATH")
                break
            await state.gather(self._round())
            items, self.waiting_items, self.deferred = self.waiting_items, [], {}
            state.reserved -= self.estimates       # now spent (imported) or not owed
            self.estimates = 0.0
            if state.stop_reason:
                break
            await state.work(items)
        # the budget line is written now: when it was reached, the batch was not yet paid
        for line in (self.blocked_line, state.budget_reached and state.budget_line()):
            if line:
                state._stop(line)

    def count(self, row: dict[str, Any]) -> None:
        """An llm_calls row this run brought in: an answer (items using it were not answered
        from the cache) or the error of its key."""
        report = self.state.report
        report.requests += 1
        report.attempts += 1
        if row["status"] == "ok":
            self.state.answered(row)
            self.state.fresh.add(row["key"])
            self.failed.pop(row["key"], None)
        else:
            self.failed[row["key"]] = row["error"]

    # -- the warehouse ----------------------------------------------------------------------
    async def _write(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`fn` in one transaction, on a thread, never beside the engine's own writes."""
        def locked() -> T:
            with self.state.write_mutex, self.job.wh.write() as con:
                return fn(con)
        return await asyncio.to_thread(locked)

    def _record(self, con: duckdb.DuckDBPyConnection, batch_id: str, kind: str,
                requests: list[Request], **columns: Any) -> None:
        """The batch and its lines, before anything is sent."""
        opts, job = self.options, self.job
        shard = f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else None
        values = {"batch_id": batch_id, "kind": kind, "run_id": job.run_id, "job": job.job,
                  "dataset": job.dataset, "shard": shard, "model": self.backend.model,
                  "requests": len(requests), "url": safe_url(opts.url), **columns}
        names = ", ".join(values)
        con.execute(f"insert into teacher_batches ({names}) values"
                    f" ({', '.join('?' * len(values))})", list(values.values())).fetchall()
        upsert(con, "teacher_batch_lines", [
            {"batch_id": batch_id, "custom_id": r.key,
             "answers": [{"key": r.key, "request": r.canonical_json(), "sample": r.sample,
                          "draw": r.draw}]} for r in requests])

    def _lines(self, requests: list[Request]) -> list[bytes]:
        """The batch input file's lines: one request each, its body what online mode sends."""
        return [(json.dumps({"custom_id": r.key, "method": "POST", "url": ENDPOINT,
                             "body": self.backend.payload(r)}, ensure_ascii=False) + "\n"
                 ).encode() for r in requests]

    # -- --batch-file -----------------------------------------------------------------------
    def _write_file(self) -> None:
        """Write the deferred requests for `vllm run_batch`, record them, say what next."""
        path = Path(self.options.batch_file or "")
        requests = list(self.deferred.values())
        batch_id = self.mode.next_id()
        with self.state.write_mutex, self.job.wh.write() as con:
            self._record(con, batch_id, "file", requests, status="written",
                         path=str(path.resolve()))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab" if self.mode.file_written else "wb") as f:
                    f.writelines(self._lines(requests))
            except OSError as exc:
                raise FactoryError(f"--batch-file {path}: {exc.strerror or exc}") from None
        self.mode.file_written = True
        results = path.with_name(f"{path.stem}.results.jsonl")
        argv = recorded_argv()
        if argv is not None:
            for name in ("--batch-file", "--import-batch"):
                argv = _without_option(argv, name)
            argv += ["--import-batch", str(results)]
        again = "factory " + shlex.join(argv) if argv else (
            f"the same command with --import-batch {results}")
        say(
            f"wrote {len(requests):,} requests to {path} (batch {batch_id}, model "
            f"{self.backend.model}); run them, then import the results:\n"
            f"  python -m vllm.entrypoints.openai.run_batch -i {shlex.quote(str(path))} "
            f"-o {shlex.quote(str(results))} --model {shlex.quote(self.backend.model)}\n"
            f"  {again}")
        self.state._stop(f"{len(requests):,} requests written to {path} for a batch run; "
                         f"import its results with --import-batch")

    # -- one round at the provider ----------------------------------------------------------
    async def _round(self) -> None:
        try:
            await self._resume_and_submit()
        except JobError as exc:
            self.state._halt(redact(str(exc), self.job._key) or "fatal teacher error")
        except (TransientError, RequestError) as exc:
            self.state._halt(redact(f"batch mode: {exc}; every batch submitted is recorded "
                                    "(teacher_batches): a re-run resumes it", self.job._key))

    async def _resume_and_submit(self) -> None:
        await self.backend.start()
        keys = list(self.deferred)
        pending, covered = await self._write(lambda con: pending_batches(con, keys))
        # a batch is polled where it was submitted: another server's batch of the same id is
        # not it (and importing that one would orphan ours)
        here = safe_url(self.options.url)
        elsewhere = [b for b in pending if b.url != here]
        if elsewhere:
            ids = {b.batch_id for b in elsewhere}
            held = {k for k, b in covered.items() if b in ids and k in self.deferred}
            self.blocked |= held
            self.blocked_line = held_line(elsewhere, len(held))
            say(self.blocked_line)
            pending = [b for b in pending if b.url == here]
        if pending:
            say(f"resuming {len(pending)} batch(es) submitted before and not yet imported "
                f"({', '.join(b.batch_id for b in pending)}): their requests are not "
                "submitted again")
        new = [r for k, r in self.deferred.items() if k not in covered]
        batches = list(pending)
        for part, lines in _split(new, self._lines(new)):
            batches.append(await self._submit(part, b"".join(lines)))
        active = batches
        while active:
            active = [b for b in active if not await self._check(b)]
            if active and not await self._nap():
                say(
                    f"batch(es) {', '.join(b.provider_batch_id or b.batch_id for b in active)} "
                    "still running at the provider: a re-run polls and imports them (they are "
                    "not submitted again)")
                return

    async def _api(self, call: Callable[[], Awaitable[T]]) -> T:
        """A files/batches call, retried on transient errors as a request is."""
        async def once() -> T:
            with self.backend.translated_errors(self.options.timeout):
                return await call()
        return await with_retries(once, self.options.attempts,
                                  initial_wait=self.options.backoff)

    async def _submit(self, requests: list[Request], data: bytes) -> Batch:
        """Upload, record (before creating: a crash in between is resumed, not re-sent),
        create."""
        client = self.backend.clients[0]
        batch_id = self.mode.next_id()
        try:
            upload = await self._api(lambda: client.files.create(
                file=(f"{batch_id}.jsonl", data, "application/jsonl"), purpose="batch"))
        except JobError as exc:
            if "HTTP 404" not in str(exc):
                raise
            raise JobError(f"{self.backend.describe()} has no batch API (POST /files: HTTP "
                           "404); use --mode online, or --batch-file for vllm run_batch"
                           ) from None
        await self._write(lambda con: self._record(
            con, batch_id, "api", requests, status="submitting", input_file_id=upload.id))
        batch = Batch(batch_id, "api", None, upload.id, "submitting", len(requests),
                      str(self.job.run_id), time.time())
        await self._create(batch)
        price = self.job.pricing
        cost = f"; estimated ${self.estimates:.4f} ({price.label})" if price.known else ""
        say(f"batch {batch.provider_batch_id}: {batch.status} · {len(requests):,} requests "
            f"submitted as {batch_id}{cost}")
        return batch

    async def _create(self, batch: Batch) -> None:
        """Create `batch` at the provider and record its id. A create whose answer was lost
        (a dropped connection, a crash after it) may have created it: before creating again,
        look for it."""
        client = self.backend.clients[0]
        tries = 0 if batch.run_id == self.job.run_id else 1     # resumed: look first

        async def once() -> Any:
            nonlocal tries
            tries += 1
            with self.backend.translated_errors(self.options.timeout):
                found = await self._find(batch) if tries > 1 else None
                return found or await client.batches.create(
                    input_file_id=str(batch.input_file_id), endpoint=ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata={"factory_batch": batch.batch_id})

        created = await with_retries(once, self.options.attempts,
                                     initial_wait=self.options.backoff)
        batch.provider_batch_id, batch.status = created.id, created.status
        await self._write(lambda con: con.execute(
            "update teacher_batches set provider_batch_id = ?, status = ? where batch_id = ?",
            [created.id, created.status, batch.batch_id]).fetchall())

    async def _find(self, batch: Batch) -> Any:
        """The provider's batch made from `batch`'s input file, if one was created (newest
        first; batches a day older than ours are not looked at)."""
        async for other in self.backend.clients[0].batches.list(limit=100):
            if other.input_file_id == batch.input_file_id or (
                    other.metadata or {}).get("factory_batch") == batch.batch_id:
                return other
            if other.created_at < batch.created_at - 86400:
                return None
        return None

    async def _nap(self) -> bool:
        """Wait --poll-s seconds; False when the run is stopping (a signal)."""
        until = time.monotonic() + self.options.poll_s
        while (left := until - time.monotonic()) > 0:
            if self.state.stop_reason:
                return False
            await asyncio.sleep(min(WAKE_S, left))
        return not self.state.stop_reason

    async def _check(self, batch: Batch) -> bool:
        """Poll `batch` once: a line when its status changes; import it once it ended."""
        if batch.provider_batch_id is None:        # recorded, never created (a crash)
            await self._create(batch)
        client = self.backend.clients[0]
        provider_id = str(batch.provider_batch_id)
        try:
            info = await self._api(lambda: client.batches.retrieve(provider_id))
        except JobError as exc:
            if "HTTP 404" not in str(exc):
                raise
            await self._lose(batch)
            return True
        counts = info.request_counts
        done = (f" · {counts.completed + counts.failed:,}/{counts.total:,} done · "
                f"{counts.failed:,} failed" if counts else "")
        state = self.state
        state.bar.update(state.task, stats=f"batch {provider_id} {info.status}{done}")
        if info.status != batch.status:
            batch.status = info.status
            say(f"batch {provider_id}: {info.status}{done}")
            await self._write(lambda con: con.execute(
                "update teacher_batches set status = ?, completed = ?, failed = ?"
                " where batch_id = ?", [info.status, counts.completed if counts else None,
                                        counts.failed if counts else None, batch.batch_id]
            ).fetchall())
        if info.status not in ENDED:
            return False
        lines = []
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                content = await self._api(lambda f=file_id: client.files.content(f))
                lines += read_output(content.content.decode("utf-8", "replace"),
                                     f"batch {provider_id} file {file_id}", strict=False)
        errors = "; ".join(f"{e.code}: {e.message}" for e in (info.errors.data or [])
                           ) if info.errors else ""
        why = None if info.status == "completed" else (
            f"batch {provider_id} {info.status}" + (f": {errors}" if errors else ""))
        await self._import(batch, lines, why, info)
        return True

    async def _lose(self, batch: Batch) -> None:
        """The provider no longer knows `batch` (a restarted server, a purged account): it is
        marked lost and its requests go into the next round's batch."""
        why = f"{safe_url(self.options.url)} answers HTTP 404 for batch {batch.provider_batch_id}"
        await self._write(lambda con: con.execute(
            "update teacher_batches set status = 'lost', error = ?,"
            " finished_at = current_timestamp where batch_id = ?", [why, batch.batch_id]
        ).fetchall())
        say(f"batch {batch.provider_batch_id}: lost ({why}); its {batch.requests:,} requests "
            "are submitted again")

    async def _import(self, batch: Batch, lines: list[dict[str, Any]], why: str | None,
                      info: Any) -> None:
        """The batch's lines into llm_calls, and the batch marked imported, in one
        transaction; the requests without an answer say why (`why`, or no line)."""
        missing = why or f"batch {info.id}: no answer to this request in its output"

        def store(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            answers = dict(con.execute("select custom_id, answers from teacher_batch_lines"
                                       " where batch_id = ?", [batch.batch_id]).fetchall())
            # the importing run's rows (as --import-batch's): its counts hold them
            written = self.mode.store(con, self.mode.rows(
                batch.batch_id, str(self.job.run_id), answers, lines, missing))
            con.execute(
                "update teacher_batches set status = ?, error = ?, output_file_id = ?,"
                " error_file_id = ?, finished_at = current_timestamp,"
                " imported_at = current_timestamp where batch_id = ?",
                [info.status, why, info.output_file_id, info.error_file_id, batch.batch_id]
            ).fetchall()
            return written

        written = await self._write(store)
        for row in written:
            self.count(row)
        ok = sum(r["status"] == "ok" for r in written)
        say(f"imported batch {info.id}: {ok:,} answers, {len(written) - ok:,} failed"
            + (f" ({why})" if why else ""))


def pending_batches(con: duckdb.DuckDBPyConnection, keys: list[str]
                    ) -> tuple[list[Batch], dict[str, str]]:
    """Provider batches still pending (PENDING) that hold any of `keys`, and every key they
    hold -> its batch_id."""
    held = con.execute(
        "with k as (select batch_id, unnest(answers).key as key from teacher_batch_lines"
        " where batch_id in (select batch_id from teacher_batches where kind = 'api' and"
        f" {PENDING})) select key, batch_id from k where batch_id in (select batch_id from k"
        " where key in (select unnest(?::varchar[])))", [keys]).fetchall()
    covered = dict(held)
    rows = con.execute(f"select {_BATCH_COLUMNS} from teacher_batches where batch_id in"
                       " (select unnest(?::varchar[])) order by created_at",
                       [sorted(set(covered.values()))]).fetchall()
    return [Batch(*r) for r in rows], covered


def abandon(con: duckdb.DuckDBPyConnection, job: str, dataset: str | None, run_id: str
            ) -> tuple[int, int]:
    """--abandon-batches: the job's pending batches given up; (batches, requests)."""
    where = f"job = ? and dataset is not distinct from ? and {PENDING}"
    n, requests = con.execute(f"select count(*), coalesce(sum(requests), 0) from"
                              f" teacher_batches where {where}", [job, dataset]).fetchone()
    con.execute(f"update teacher_batches set status = 'abandoned', error = ?,"
                f" finished_at = current_timestamp where {where}",
                [f"abandoned by run {run_id} (--abandon-batches)", job, dataset]).fetchall()
    return n, requests


def held_line(batches: list[Batch], held: int) -> str:
    """One line: `held` requests of this run wait in `batches`, and how to collect them or
    give them up."""
    where = "; ".join(f"{b.batch_id} ({b.status}, {b.url or 'no URL'})" for b in batches)
    urls = sorted({b.url or "" for b in batches})
    return (f"{held:,} requests of this run wait in {len(batches)} batch(es) submitted before "
            f"and not yet imported: {where}; collect them with --mode batch --teacher-url "
            f"{' / '.join(urls)} (nothing is submitted again), or give them up with "
            "--abandon-batches (they are then paid again)")


def _split(requests: list[Request], lines: list[bytes]
           ) -> Iterable[tuple[list[Request], list[bytes]]]:
    """The requests and their lines in parts a provider accepts (MAX_LINES, MAX_BYTES)."""
    start, size = 0, 0
    for i, line in enumerate(lines):
        if i > start and (i - start >= MAX_LINES or size + len(line) > MAX_BYTES):
            yield requests[start:i], lines[start:i]
            start, size = i, 0
        size += len(line)
    if start < len(lines):
        yield requests[start:], lines[start:]


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out

