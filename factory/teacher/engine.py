"""The teacher engine: turns a job's work items into stored, provenanced answers.

See `factory.teacher` for the API a job uses. Inside one `run()`:

1. every work item is rendered into its first-draw request; `--shard` keeps the items whose
   request hash falls in the shard, `--limit` the first N of those;
2. answers are looked up in `llm_calls` (one keyed join for all items); hits are replayed,
   misses are sent by `concurrency` workers, each request rate-limited (RPM/TPM) and retried
   on transient errors with jittered exponential backoff that honours Retry-After;
3. the job's parser checks each answer; a rejected answer is re-drawn (a new request with the
   next draw index) up to `parse_retries` times, then the item is recorded as failed;
4. every second (or every `batch` results) one short transaction stores the new llm_calls
   rows, the job's rows and the run's counts, so a killed job loses at most that much and
   `factory sql` gets in between;
5. the run stops early, keeping everything, at the `--max-cost` budget, on a fatal
   credentials/URL error, or when most recent requests fail.

In batch mode (`--mode batch`, factory.teacher.batch) step 2 sends nothing: each uncached
request is deferred (its item gets no row yet), the deferred requests go out as one provider
batch, its results land in `llm_calls`, and the deferred items run again from the cache (a
redraw defers again: another batch), until nothing is deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
from rich.progress import TextColumn

from factory.console import console, progress, summary
from factory.errors import FactoryError, Interrupted, first_line
from factory.prompts import Prompt
from factory.runs import finish_run, live_runs, start_run
from factory.teacher.backends import Backend, TransformersBackend, make_backend
from factory.teacher.batch import (
    PENDING,
    BatchMode,
    abandon,
    file_backend,
    held_line,
    pending_batches,
)
from factory.teacher.cost import PriceTable, Pricing
from factory.teacher.journal import Journal, journal_dir
from factory.teacher.keys import api_key, redact
from factory.teacher.limits import (
    AttemptTimeout,
    JobError,
    RateLimiter,
    RequestError,
    TransientError,
    with_retries,
)
from factory.teacher.options import TeacherOptions, parse_shard
from factory.teacher.request import Reply, Request, Sampling, split_reasoning
from factory.teacher.store import (
    CachedAnswer,
    answer_fields,
    cached_answers,
    json_or_none,
    upsert,
    write_calls,
)
from factory.verdicts import TRUNCATED_ROW, truncated_note
from factory.warehouse import Warehouse

#: columns every teacher job's output table carries (Outcome.provenance() fills them)
PROVENANCE_COLUMNS = ("work_key", "call_key", "run_id", "prompt_name", "prompt_hash", "backend",
                      "model", "sample", "draws", "cached", "status", "error")
#: early stop: look at the last WINDOW requests once MIN_SEEN have finished
FAILURE_WINDOW, FAILURE_MIN_SEEN, FAILURE_SHARE = 50, 20, 0.5
STOP_GRACE_S = 10.0       # after SIGINT/SIGTERM, how long requests in flight may still land
HEARTBEAT_S = 30.0        # a run that stores nothing for this long still says it is alive
STORE_LOCK_WAIT_S = 1.0   # a batch write waits this long for a lock, then retries later
STORE_TIMEOUT_S = 600.0   # keep retrying a warehouse that cannot be written this long
#: the progress bar is updated at most this often (a terminal redraws 10 times a second;
#: an update per item cost more CPU than the rest of the engine)
PROGRESS_S = 0.1


@dataclass(frozen=True)
class Work:
    """One unit of work: the prompt variables for one item (and sample)."""

    id: str                                   # the job's id for the item; not hashed
    vars: Mapping[str, Any]                   # template variables (strict: all must be given)
    sample: int = 0                           # several answers per item: 0, 1, 2, ...
    history: tuple[Mapping[str, str], ...] = ()   # earlier turns, sent before the prompt's
    data: Any = None                          # anything the job wants back in its Outcome


@dataclass
class Outcome:
    """What happened to one work item: a parsed value, or a failure saying why."""

    work: Work
    status: str                 # ok | failed | truncated (cut by max_tokens or a filter)
    value: Any                  # the parser's result (None when failed)
    text: str | None            # the raw answer text used (None when none came back)
    error: str | None
    work_key: str               # key of the first-draw request: identifies the teacher setup
    call_key: str | None        # llm_calls key of the answer used / the last request tried
    draws: int
    cached: bool                # no request was sent for this item in this run
    meta: dict[str, Any] = field(default_factory=dict)   # run_id, prompt, backend, model
    reasoning: str | None = None    # the model's thinking (reasoning_content or <think>)
    #: per token of `text` (--logprobs): {"token", "logprob", "top_logprobs": [...]}
    logprobs: list[dict[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def provenance(self) -> dict[str, Any]:
        """The PROVENANCE_COLUMNS of this outcome's row."""
        return {"work_key": self.work_key, "call_key": self.call_key, **self.meta,
                "sample": self.work.sample, "draws": self.draws, "cached": self.cached,
                "status": self.status, "error": self.error}


#: how an item whose every draw the parser refused is worded (jobs call it rejected)
PARSER_GAVE_UP = "answer rejected by the parser"


@dataclass
class Report:
    """Counts of one run() (or of a dry run's estimate)."""

    items: int = 0
    ok: int = 0
    failed: int = 0              # failures of every kind, truncated answers included
    truncated: int = 0           # of which: answers cut at max_tokens or by a content filter
    rejected: int = 0            # of which: answers the parser refused on every draw
    cached: int = 0              # items answered entirely from the cache
    ok_paid: int = 0             # ok items whose answer this run paid for (not cached)
    not_done: int = 0            # items left when the run stopped early
    requests: int = 0            # requests sent (parse-retry draws included)
    attempts: int = 0            # HTTP attempts (retries included)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    seconds: float = 0.0
    stopped: str | None = None   # why the run stopped early
    dry_run: bool = False
    run_id: str | None = None

    def counts(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("run_id", "dry_run")}

    def rows(self) -> dict[str, Any]:
        cost = "unknown (no price)" if self.cost_usd is None else f"${self.cost_usd:.4f}"
        rows: dict[str, Any] = {
            "items": self.items, "rows written": self.ok + self.failed, "ok": self.ok,
            # failed = rejected + truncated + no usable answer; a rejected answer came back
            # and is no transport failure, so each is shown once, and they add up
            **({"rejected by the parser": self.rejected} if self.rejected else {}),
            "failed (no answer)" if self.rejected or self.truncated else "failed":
                self.failed - self.rejected - self.truncated,
            "answered from cache": self.cached, "requests sent": self.requests,
            "tokens in/out": f"{self.input_tokens:,} / {self.output_tokens:,}",
            "cost": cost, "seconds": round(self.seconds, 1), "run": self.run_id,
        }
        if self.truncated:
            rows[TRUNCATED_ROW] = truncated_note(self.truncated)
        if self.not_done:
            rows["not done"] = self.not_done
        if self.stopped:
            rows["stopped"] = self.stopped
        return rows

    def print_summary(self, title: str, sql_hint: str | None = None) -> None:
        """The end-of-job summary (nothing after a dry run, which printed its estimate)."""
        if not self.dry_run:
            summary(title, self.rows(), sql_hint)


@dataclass
class _Call:
    """Result of asking for one request: an answer, or an error, or None when stopped."""

    answer: CachedAnswer | None
    error: str | None
    cached: bool


@dataclass
class _Failure:
    """A request that got no answer after its attempts."""

    error: str
    body: str | None
    refused: bool           # the server refused it (4xx): the same request would fail again
    latency_s: float = 0.0


def setup_of(req: Request) -> tuple[Any, ...]:
    """What the samples of one setup share: everything in the request but the sample (and the
    seed derived from it)."""
    return (req.model, req.messages, tuple(p for p in req.params if p[0] != "seed"), req.draw)


def by_setup(requests: Iterable[Request]) -> dict[str, list[Request]]:
    """Each request's key -> the distinct requests of its setup, by sample: the samples one
    `n` request may ask together (--n-per-request)."""
    setups: dict[tuple[Any, ...], dict[str, Request]] = {}
    for req in requests:
        setups.setdefault(setup_of(req), {})[req.key] = req
    out: dict[str, list[Request]] = {}
    for members in setups.values():
        ordered = sorted(members.values(), key=lambda r: r.sample)
        out.update(dict.fromkeys(members, ordered))
    return out


class TeacherJob:
    """One job run against the teacher. Use as a context manager; call run() once per round.

    `defaults` are the job's sampling defaults (from its paper); the user's options override
    them field by field. `backend` replaces the one the options name (a distilled student:
    a base model with its adapter, see factory.student_backends). `redraw` = (first draw, its
    sampling): draws from that index on are sent with that sampling instead (a greedy
    student's redraws need a temperature and a seed, or they repeat the first answer).
    """

    def __init__(self, wh: Warehouse, job: str, *, dataset: str | None,
                 options: TeacherOptions, params: Mapping[str, Any] | None = None,
                 defaults: Sampling | None = None, batch: int = 1000, flush_s: float = 1.0,
                 backend: Backend | None = None, redraw: tuple[int, Sampling] | None = None):
        self.wh = wh
        self.job = job
        self.dataset = dataset
        self.options = options
        self.params = dict(params or {})
        self.sampling = (defaults or Sampling()).merged(options.sampling)
        self.redraw = redraw
        self.batch = batch
        self.flush_s = flush_s
        self._key = api_key()
        self.backend: Backend = backend or file_backend(options, self._key) or make_backend(
            options.backend_name, options.url, options.model, self._key, options.timeout,
            options.concurrency, options.vllm_args)
        self.concurrency = options.concurrency or self.backend.default_concurrency
        #: ask for the prompt's answer shape (--structured; by default where the backend is
        #: a small in-process model that rarely follows a free-text format)
        self.structured = (options.structured if options.structured is not None
                           else self.backend.structured_by_default)
        self._shapeless: set[str] = set()   # prompts already said to have no answer shape
        table = PriceTable.load(options.price_table) if options.price_table else None
        self.pricing = Pricing.for_model(table, self.backend.model, self.backend.local,
                                         batch=options.mode == "batch")
        if options.max_cost is not None and not self.pricing.known:
            raise FactoryError(
                f"--max-cost needs a price for model {self.backend.model!r}: add it to the "
                "price table (--price-table / FACTORY_PRICE_TABLE)")
        self.stall_timeout = options.stall_timeout or (
            4 * options.timeout + options.attempt_timeout(self.sampling.max_tokens))
        self.store_timeout = float(os.environ.get("FACTORY_STORE_TIMEOUT", STORE_TIMEOUT_S))
        self.journal: Journal | None = None
        self.run_id: str | None = None
        self.spent = 0.0
        self.totals = Report()
        self._prompts: list[Prompt] = []
        self._prompts_unrecorded = False
        #: a provider batch was pending at the last transaction (None: not looked yet)
        self._batches_pending: bool | None = None
        self._all_stored = True
        self._last_failure: str | None = None
        self._answers = 0            # answers obtained (sent or cached), over all rounds
        self.announced = False       # "starting <backend>" printed
        self.batch_mode = BatchMode(self) if options.mode == "batch" else None
        self.notes: set[str] = set()     # what the run said once
        self.n_refused = False       # the teacher refused an n-request: ask one by one
        self._abandoned = False      # --abandon-batches done

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> TeacherJob:
        if self.options.dry_run:
            return self
        params = {**self.params, "sampling": self.sampling.as_dict(),
                  "teacher": {**self.options.as_params(), "structured": self.structured}}
        with self.wh.write() as con:
            self._refuse_concurrent(con)
            self.run_id = start_run(con, self.job, self.dataset, params)
            con.execute("update job_runs set backend = ?, model = ? where run_id = ?",
                        [self.backend.name, self.backend.model, self.run_id]).fetchall()
            self.note_batches(con)
        self.journal = Journal(journal_dir(self.wh.path) / f"{self.run_id}.jsonl")
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.run_id is None:
            return
        totals = self.totals
        nothing = (exc_type is None and totals.items and not totals.ok and not totals.not_done
                   and not self._answers)
        if nothing:     # no answer at all: a broken endpoint, whatever the early stop saw
            cut = f" ({totals.truncated:,} cut: raise --max-tokens)" if totals.truncated else ""
            error = f"all {totals.items:,} items failed{cut}; last: {self._last_failure}"
            status = "failed"
        elif exc_type is None:
            status, error = ("stopped", totals.stopped) if totals.stopped else ("succeeded", None)
        elif issubclass(exc_type, KeyboardInterrupt):
            status, error = "interrupted", str(exc) or "interrupted"
        else:
            status, error = "failed", redact(str(exc) or exc_type.__name__, self._key)
        # after a signal there is only a grace period: don't wait a minute for a lock
        wait = _RunState.grace() if exc_type is not None else None
        try:
            with self.wh.write(lock_timeout=wait) as con:
                self.store_prompts(con)
                finish_run(con, self.run_id, status, totals.counts(), error)
        except Exception as store_exc:
            if exc_type is None:       # else the error already on its way says more
                raise FactoryError(
                    f"could not record the end of run {self.run_id}: "
                    f"{first_line(store_exc)}; its answers are stored or in "
                    f"{journal_dir(self.wh.path)}, and the next command marks it died"
                ) from None
        finally:
            if self.journal is not None:    # everything stored: the journal is not needed
                self.journal.close(delete=self._all_stored)
        if nothing:
            raise FactoryError(f"{self.job}: {error}; the failures are stored (see the job's "
                               "table); fix the cause and re-run")

    def _refuse_concurrent(self, con: duckdb.DuckDBPyConnection) -> None:
        """Two live runs of the same work would pay for the same requests: refuse."""
        mine = self.options.shard
        for other in live_runs(con, self.job, self.dataset):
            theirs = parse_shard(other.shard)
            if mine and theirs and mine[1] == theirs[1] and mine[0] != theirs[0]:
                continue                      # disjoint shards of the same split
            raise FactoryError(
                f"another {self.job} run on {self.dataset or 'this warehouse'} is running "
                f"({other.run_id}, pid {other.pid} on {other.host}, last sign of life "
                f"{other.heartbeat_age_s:.0f}s ago): two runs would pay for the same "
                "requests. Wait for it or stop it; to work in parallel, give each process "
                "its own --shard i/N")

    # -- the one call a job makes -----------------------------------------------------------
    def run(self, works: Iterable[Work], *, prompt: Prompt, parse: Callable[..., Any],
            table: str, row: Callable[[Outcome], Mapping[str, Any]],
            with_reasoning: bool = False, label: str | None = None) -> Report:
        """Answer every work item with `prompt`, store one row per item in `table`.

        `label` names the progress bar (default: the job), e.g. a round of several.

        `parse` gets the answer without the model's thinking (a reasoning model's
        `reasoning_content`, or its inline <think> blocks); with `with_reasoning` it is
        called as `parse(answer, reasoning)` with the thinking (None when there was none).
        The thinking is also on the Outcome (`reasoning`) and in llm_calls.reasoning.

        `parse(text)` returns the value to store or raises ValueError for a malformed answer.
        `row(outcome)` returns the job's columns of the item's row; the PROVENANCE_COLUMNS are
        added. Failed items get a row too (value None, status 'failed', error), never a
        made-up value. Items left when the run stops early get no row; a re-run does them.
        """
        if not self.options.dry_run and self.run_id is None:
            raise RuntimeError("use TeacherJob as a context manager: with TeacherJob(...) as job")
        if self.options.structured and prompt.answer is None and (
                prompt.name not in self._shapeless):
            self._shapeless.add(prompt.name)
            console.print(f"--structured: prompt {prompt.name} declares no answer shape "
                          f"(prompts/{prompt.name}.answer.json); it is asked in free text")
        items = self._select(works, prompt)
        if self.options.dry_run:
            return self._dry_run(items, prompt)
        self._record_prompt(prompt)
        if self.options.abandon_batches:
            self._abandon_batches()
        if self.batch_mode is not None:
            self.batch_mode.import_file()      # --import-batch: its answers first
        elif self._batches_pending is not False:
            self._refuse_held(items, prompt)
        if self.options.cache_only:
            self._require_cached(items)
        state = _RunState(self, items, prompt, parse, table, row, with_reasoning)
        state.label = label or self.job
        unstored = None
        try:
            asyncio.run(state.run())
        finally:
            try:
                state.finish()
            except FactoryError as exc:
                if not state.interrupted:    # a signal's line says it, with the exit code
                    raise
                unstored = str(exc)
            finally:
                self._all_stored = self._all_stored and state.stored_everything()
                self._add(state.report)
        if state.interrupted:
            raise Interrupted(state.interrupt_line(unstored), state.interrupted)
        if state.fatal:
            raise FactoryError(state.fatal)
        self._last_failure = state.last_failure or self._last_failure
        return state.report

    # -- helpers ----------------------------------------------------------------------------
    def request(self, prompt: Prompt, work: Work, draw: int = 0) -> Request:
        messages = [dict(m) for m in work.history] + prompt.render(**work.vars)
        sampling = (self.redraw[1] if self.redraw is not None and draw >= self.redraw[0]
                    else self.sampling)
        shape = prompt.answer if self.structured else None
        return Request.build(self.backend.model, messages, sampling, work.sample, draw,
                             shape.response_format(work.vars) if shape else None)

    def _select(self, works: Iterable[Work], prompt: Prompt) -> list[tuple[Work, Request]]:
        shard, limit = self.options.shard, self.options.limit
        items = []
        for work in works:
            req = self.request(prompt, work)
            if shard and int(req.key[:16], 16) % shard[1] != shard[0]:
                continue
            items.append((work, req))
            if limit and len(items) >= limit:
                break
        return items

    def _lookup(self, keys: list[str]) -> dict[str, CachedAnswer]:
        if not self.wh.path.exists():
            return {}
        with self.wh.read() as con:
            if not con.execute("select 1 from information_schema.tables "
                               "where table_name = 'llm_call_rows'").fetchall():
                return {}
            return cached_answers(con, keys)

    def _require_cached(self, items: list[tuple[Work, Request]]) -> None:
        hits = self._lookup([r.key for _, r in items])
        missing = [w for w, r in items if r.key not in hits]
        if missing:
            raise FactoryError(
                f"--cache-only: {len(missing):,} of {len(items):,} requests are not in the cache "
                f"(first: {missing[0].id}); run without --cache-only to send them")

    def _abandon_batches(self) -> None:
        """--abandon-batches, once per run: say what was given up."""
        if self._abandoned:
            return
        self._abandoned = True
        with self.wh.write() as con:
            n, requests = abandon(con, self.job, self.dataset, str(self.run_id))
        console.print(f"--abandon-batches: {n} pending batch(es) of {self.job} abandoned "
                      f"({requests:,} requests: sent again when needed; a batch still running "
                      "at the provider is not cancelled there)", highlight=False)

    def _refuse_held(self, items: list[tuple[Work, Request]], prompt: Prompt) -> None:
        """Online mode never sends a request that a pending batch will answer (switching
        modes never pays twice): it stops, saying how to collect or give up the batch."""
        if self.options.cache_only or not self.wh.path.exists():
            return
        with self.wh.read() as con:
            if not con.execute(f"select count(*) from teacher_batches where kind = 'api'"
                               f" and {PENDING}").fetchone()[0]:
                return
            # every draw: a redraw may wait in a batch too
            keys = [r.key for _, r in items] + [
                self.request(prompt, w, d).key for w, _ in items
                for d in range(1, 1 + self.options.parse_retries)]
            batches, covered = pending_batches(con, keys)
            held = set(keys) & set(covered)
            if held and not self.options.refresh:
                held -= set(cached_answers(con, sorted(held)))
        if held:
            raise FactoryError(held_line([b for b in batches if b.batch_id in {
                covered[k] for k in held}], len(held)))

    def _held_keys(self, keys: list[str]) -> set[str]:
        """Those of `keys` that a pending provider batch holds (none sent by any mode)."""
        if not self.wh.path.exists():
            return set()
        with self.wh.read() as con:
            if not con.execute("select 1 from information_schema.tables "
                               "where table_name = 'teacher_batches'").fetchone():
                return set()
            return set(keys) & set(pending_batches(con, keys)[1])

    def _dry_run(self, items: list[tuple[Work, Request]], prompt: Prompt) -> Report:
        hits = {} if self.options.refresh else self._lookup([r.key for _, r in items])
        to_send = [r for _, r in items if r.key not in hits]
        held = self._held_keys([r.key for r in to_send])
        to_send = [r for r in to_send if r.key not in held]
        # with --n-per-request K, the uncached samples of a setup go K to a request whose
        # prompt is paid once
        n = self.options.n_per_request
        setups = by_setup(to_send) if n > 1 else {}
        sent = [r for r in to_send if not setups or setups[r.key].index(r) % n == 0]
        est_in = sum(r.estimated_input_tokens() for r in sent)
        seen_out = [h.output_tokens for h in hits.values() if h.output_tokens is not None]
        max_out = self.sampling.max_tokens or TransformersBackend.DEFAULT_MAX_TOKENS
        if seen_out:
            per_out, how = sum(seen_out) / len(seen_out), f"mean of {len(seen_out)} cached"
        else:
            per_out, how = max_out, "max tokens each"
        est_out = int(per_out * len(to_send))
        cost = self.pricing.cost(est_in, est_out)
        summary(f"dry run: {self.job} ({self.backend.describe()}, prompt {prompt.name} "
                f"{prompt.hash})", {
            "work items": len(items), "cached": len(items) - len(to_send),
            "waiting in pending batches": len(held),
            "requests to send": len(sent), "estimated input tokens": est_in,
            f"estimated output tokens ({how})": est_out,
            "estimated cost": "unknown: no price for this model (--price-table)"
            if cost is None else f"${cost:.4f} ({self.pricing.label})",
        })
        return Report(items=len(items), cached=len(items) - len(to_send), dry_run=True,
                      input_tokens=est_in, output_tokens=est_out, cost_usd=cost)

    def _record_prompt(self, prompt: Prompt) -> None:
        """Name `prompt` in the run's record, in the next transaction that writes anyway (the
        run's first stored batch, or its end): a transaction of its own held up every
        round's first request by a warehouse open and commit."""
        if prompt not in self._prompts:
            self._prompts.append(prompt)
            self._prompts_unrecorded = True

    def store_prompts(self, con: duckdb.DuckDBPyConnection) -> None:
        """Write the prompts `_record_prompt` named (part of the caller's transaction, which
        clears `_prompts_unrecorded` once committed)."""
        if not self._prompts_unrecorded:
            return
        con.execute("update job_runs set prompt_name = ?, prompt_hash = ? where run_id = ?",
                    [",".join(p.name for p in self._prompts),
                     ",".join(p.hash for p in self._prompts), self.run_id]).fetchall()

    def note_batches(self, con: duckdb.DuckDBPyConnection) -> None:
        """Whether any provider batch is pending (part of a transaction that writes anyway):
        without one, run() needs no look at which requests batches hold (_refuse_held)."""
        self._batches_pending = bool(con.execute(
            f"select count(*) from teacher_batches where kind = 'api' and {PENDING}"
        ).fetchone()[0])

    def _add(self, r: Report) -> None:
        t = self.totals
        for name in ("items", "ok", "failed", "truncated", "rejected", "cached", "ok_paid",
                     "not_done", "requests", "attempts", "input_tokens", "output_tokens"):
            setattr(t, name, getattr(t, name) + getattr(r, name))
        t.cost_usd = None if r.cost_usd is None or t.cost_usd is None else t.cost_usd + r.cost_usd
        t.seconds += r.seconds
        t.stopped = t.stopped or r.stopped
        t.run_id = r.run_id = self.run_id


class _RunState:
    """Everything one run() needs while its event loop runs."""

    def __init__(self, job: TeacherJob, items: list[tuple[Work, Request]], prompt: Prompt,
                 parse: Callable[..., Any], table: str,
                 row: Callable[[Outcome], Mapping[str, Any]], with_reasoning: bool = False):
        self.job, self.items, self.prompt = job, items, prompt
        self.parse, self.table, self.row = parse, table, row
        self.with_reasoning = with_reasoning
        #: structured answers are JSON: the shape renders them for the unchanged parser
        self.shape = prompt.answer if job.structured else None
        opts = job.options
        self.refresh = opts.refresh
        self.cache: dict[str, CachedAnswer] = {}
        self.inflight: dict[str, asyncio.Future[_Call | None]] = {}
        self.flushes: set[asyncio.Task[None]] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.write_mutex = threading.Lock()
        self.backend_started = False
        self.label = job.job
        self.calls: list[dict[str, Any]] = []     # llm_calls rows not yet stored (journaled)
        self.outcomes: list[Outcome] = []         # job rows not yet stored
        self.report = Report(items=len(items), cost_usd=0.0 if job.pricing.known else None,
                             run_id=job.run_id)
        self.recent: deque[bool] = deque(maxlen=FAILURE_WINDOW)
        self.reserved = 0.0
        self.stop_reason: str | None = None
        self.budget_reached = False       # --max-cost refused a request
        self.fatal: str | None = None
        self.interrupted: str | None = None       # the signal's name
        self.dropped = 0                          # requests cancelled in flight
        self.last_error: str | None = None
        self.last_failure: str | None = None      # the last item's failure, any kind
        self.store_failing_since: float | None = None
        self.store_error: str | None = None
        self.store_retry_at = 0.0
        self.store_failures = 0
        self.store_kind: str | None = None
        self.last_heartbeat = time.monotonic()
        self.meta = {"run_id": job.run_id, "prompt_name": prompt.name,
                     "prompt_hash": prompt.hash, "backend": job.backend.name,
                     "model": job.backend.model}
        self.rpm = RateLimiter(opts.rpm) if opts.rpm else None
        self.tpm = RateLimiter(opts.tpm) if opts.tpm else None
        self.max_out = job.sampling.max_tokens or TransformersBackend.DEFAULT_MAX_TOKENS
        self.max_buffer = max(10 * job.batch, 4 * job.concurrency)
        self.started = time.perf_counter()
        self.last_answer = time.monotonic()        # or when the first request went out
        self.on_wire = 0                          # requests sent and not yet answered
        self.unshown = 0                          # items done, not yet on the progress bar
        self.shown_at = 0.0                       # when the bar was last updated
        #: keys answered in this run by a request made for another item (an n-request's
        #: other choices, a batch's lines): their items count as sent, not cached
        self.fresh: set[str] = set()
        self.batches = job.batch_mode.rounds(self) if job.batch_mode is not None else None
        #: --n-per-request: each first draw's key -> the samples of its setup
        self.n = opts.n_per_request
        self.setups = by_setup(r for _, r in items) if self.n > 1 else {}

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        job = self.job
        if not self.items:
            return
        self.start_lock = asyncio.Lock()
        self.write_lock = asyncio.Lock()
        bar = progress(TextColumn("{task.fields[stats]}"))
        self.bar = bar
        restore = self._catch_signals()
        with bar:
            self.task = bar.add_task(self.label, total=len(self.items), stats="")
            self.done = asyncio.Event()
            flusher = asyncio.create_task(self._flush_every())
            try:
                await self.work(self.items)
                if self.batches is not None:
                    await self.batches.run()
                elif self.budget_reached:
                    # said when the budget refused a request, before the reserved ones were
                    # answered and paid: the line gives what was spent in the end
                    self.stop_reason = self.report.stopped = self.budget_line()
            finally:
                self._cancel_all()
                self._show(now=True)         # the bar's last frame counts every item
                self.done.set()              # a flush in progress is finished, not cancelled
                await asyncio.gather(*self.tasks, flusher, *self.flushes,
                                     return_exceptions=True)
                await job.backend.aclose()
                restore()
            await self._drain()

    async def work(self, items: list[tuple[Work, Request]]) -> None:
        """Process `items` with the producer and `concurrency` workers (self.tasks)."""
        queue: asyncio.Queue[tuple[Work, Request] | None] = asyncio.Queue(
            self.job.concurrency * 2)
        await self.gather(self._produce(queue, items, self.job.concurrency),
                          *(self._worker(queue) for _ in range(self.job.concurrency)))

    async def gather(self, *coroutines: Any) -> None:
        """Run `coroutines` as self.tasks (what a signal's grace period cancels); re-raise the
        first error."""
        self.tasks = [asyncio.create_task(c) for c in coroutines]
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]

    async def _drain(self) -> None:
        """The last flushes: keep retrying a warehouse that cannot be written yet (a reader
        holds it, a query runs long) until it can, or until giving up is the only choice."""
        while not self.stored_everything():
            await self._flush()
            if self.stored_everything() or self.fatal or self.store_kind == "disk":
                return
            if self.interrupted and self.store_failing_since is not None and (
                    time.monotonic() - self.store_failing_since > self.grace()):
                return
            await asyncio.sleep(max(0.0, self.store_retry_at - time.monotonic()))

    def _catch_signals(self) -> Callable[[], None]:
        """SIGINT and SIGTERM (Slurm's time limit, scancel, docker stop) both stop cleanly:
        no new requests, FACTORY_STOP_GRACE seconds for those in flight, then the rest is
        cancelled; a second signal cancels at once. Returns what restores the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        loop = asyncio.get_running_loop()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in saved:
            loop.add_signal_handler(sig, self._on_signal, sig)

        def restore() -> None:
            for sig, handler in saved.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
        return restore

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.interrupted:
            self._cancel_all()
            return
        self.interrupted = sig.name
        self._stop(f"interrupted ({sig.name})")
        asyncio.get_running_loop().call_later(self.grace(), self._cancel_all)

    @staticmethod
    def grace() -> float:
        return float(os.environ.get("FACTORY_STOP_GRACE", STOP_GRACE_S))

    def _cancel_all(self) -> None:
        """Cancel the producer and the workers: requests in flight (and their retries) end."""
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            self.dropped += len(self.inflight)
        for task in pending:
            task.cancel()

    def _halt(self, reason: str) -> None:
        """Stop now: a fatal error; nothing more is worth waiting for."""
        self.fatal = self.fatal or reason
        self._stop(reason)
        self._cancel_all()

    def finish(self) -> None:
        """Store what the loop had not stored yet (also after Ctrl-C) and close the counts."""
        self.report.not_done = len(self.items) - self.report.ok - self.report.failed
        self.report.seconds = time.perf_counter() - self.started
        calls, outcomes = self._take()
        if not (calls or outcomes):
            return
        try:
            self._write(calls, outcomes)
        except Exception as exc:
            self._put_back(calls, outcomes)
            raise FactoryError(self._unstored_line(first_line(exc))) from None

    def stored_everything(self) -> bool:
        return not (self.calls or self.outcomes)

    def interrupt_line(self, unstored: str | None = None) -> str:
        r = self.report
        dropped = (f"; {self.dropped:,} request(s) in flight were dropped and will be re-sent"
                   if self.dropped else "")
        if unstored:
            journal = self.job.journal
            return (f"interrupted ({self.interrupted}) while the warehouse could not be "
                    f"written ({self.store_error}): the answers not stored are safe in "
                    f"{journal.path if journal else 'the journal'}{dropped}; re-run the same "
                    "command to resume: it imports them first")
        return (f"interrupted ({self.interrupted}): {r.ok + r.failed:,} of {r.items:,} items "
                f"stored{dropped}; re-run the same command to resume")

    def _unstored_line(self, reason: str) -> str:
        journal = self.job.journal
        where = f" are safe in {journal.path}" if journal is not None else " are kept"
        return (f"could not store results in {self.job.wh.path} ({reason}); the "
                f"{len(self.calls):,} answers received since the last store{where}; re-run "
                "the same command to resume: it imports them first and re-sends nothing "
                "already answered")

    async def _lookup(self, keys: list[str]) -> None:
        """Add cached answers for `keys` (a thread, serialised with the writes: one process
        must not hold a read-only and a read-write DuckDB connection at once)."""
        def locked() -> dict[str, CachedAnswer]:
            with self.write_mutex:
                return self.job._lookup(keys)

        self.cache.update(await asyncio.to_thread(locked))

    async def _produce(self, queue: asyncio.Queue, items: list[tuple[Work, Request]],
                       n_workers: int) -> None:
        if not self.refresh:    # one keyed join for every item (and the samples an n-request
            await self._lookup(list({s.key: None for _, r in items      # may ask with them)
                                     for s in self.setups.get(r.key, (r,))}))
        for item in items:
            if self.stop_reason:
                break
            await queue.put(item)
        for _ in range(n_workers):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            if self.stop_reason:
                continue
            outcome = await self._process(*item)
            if outcome is not None:
                self._count(outcome)
                self.outcomes.append(outcome)
                if len(self.outcomes) >= self.job.batch and not self.write_lock.locked():
                    task = asyncio.create_task(self._flush())
                    self.flushes.add(task)
                    task.add_done_callback(self.flushes.discard)

    async def _process(self, work: Work, first: Request) -> Outcome | None:
        draws = 1 + self.job.options.parse_retries
        problem, all_cached, req = None, True, first
        for draw in range(draws):
            if draw:
                req = self.job.request(self.prompt, work, draw)
                if not self.refresh and req.key not in self.cache:    # redraws are rare:
                    await self._lookup([req.key])                     # look them up lazily
            call = await self._ask(req)
            if call is None:                      # stopped before this could be sent, or
                if self.batches is not None:      # deferred to a batch: the item waits
                    self.batches.waiting(work, first, req)
                return None
            all_cached = all_cached and call.cached
            if call.error is not None:
                return self._outcome(work, first, req, draw + 1, all_cached, error=call.error)
            assert call.answer is not None
            cut = truncation(call.answer, req.param_dict().get("max_tokens") or (
                self.max_out if self.job.backend.local else None))
            if cut:     # a redraw at the same budget would be cut again: don't pay for it
                return self._outcome(work, first, req, draw + 1, all_cached, error=cut,
                                     text=call.answer.text, status="truncated",
                                     logprobs=call.answer.logprobs)
            # the parser never sees the thinking; rows stored before llm_calls.reasoning
            # existed have it only inline
            inline, answer = split_reasoning(call.answer.text)
            reasoning = call.answer.reasoning or inline
            try:
                if self.shape is not None:
                    answer = self.shape.as_text(answer, work.vars)
                value = (self.parse(answer, reasoning) if self.with_reasoning
                         else self.parse(answer))
            except ValueError as exc:
                problem = str(exc) or type(exc).__name__
                continue
            return self._outcome(work, first, req, draw + 1, all_cached, value=value,
                                 text=call.answer.text, reasoning=reasoning,
                                 logprobs=call.answer.logprobs)
        return self._outcome(work, first, req, draws, all_cached,
                             error=f"{PARSER_GAVE_UP} {draws} times; last: {problem}")

    def _outcome(self, work: Work, first: Request, last: Request, draws: int, cached: bool,
                 value: Any = None, text: str | None = None, error: str | None = None,
                 status: str | None = None, reasoning: str | None = None,
                 logprobs: list[dict[str, Any]] | None = None) -> Outcome:
        status = status or ("failed" if error else "ok")
        return Outcome(work=work, status=status, value=value, text=text,
                       error=error, work_key=first.key, call_key=last.key, draws=draws,
                       cached=cached, meta=self.meta, reasoning=reasoning, logprobs=logprobs)

    # -- one request ------------------------------------------------------------------------
    async def _ask(self, req: Request) -> _Call | None:
        hit = self.cache.get(req.key)      # with --refresh, only answers from this run
        if hit is not None:
            self.job._answers += 1
            return _Call(hit, None, cached=req.key not in self.fresh)
        if req.key in self.inflight:               # the same request from another item
            return await asyncio.shield(self.inflight[req.key])
        if self.job.options.cache_only:
            return _Call(None, "not in the cache (--cache-only)", cached=True)
        if self.batches is not None:               # never sent here: a batch sends it
            error = self.batches.defer(req)
            return None if error is None else _Call(None, error, cached=False)
        while len(self.calls) >= self.max_buffer and not self.stop_reason:
            await asyncio.sleep(0.05)     # the warehouse is behind: no new requests meanwhile
        if self.stop_reason:
            return None
        members = self._group_for(req)
        sent = Request.group(members) if len(members) > 1 else req
        # an n-request pays its prompt once and n answers: the budget reserves all of them
        estimate = self.estimate(sent, len(members))
        over = self.over_budget(estimate)
        if over:
            self._stop(over)
            return None
        loop = asyncio.get_running_loop()
        futures = {m.key: loop.create_future() for m in members}
        self.inflight.update(futures)     # the other members' items wait on these
        self.reserved += estimate
        calls: list[_Call | None] = [None] * len(members)
        try:
            calls = await self._send_group(sent) if sent.members else [await self._send(sent)]
        finally:                   # cancelled: items waiting on the same request stop too
            self.reserved -= estimate
            for member, call in zip(members, calls, strict=True):
                del self.inflight[member.key]
                futures[member.key].set_result(call)
        return calls[[m.key for m in members].index(req.key)]

    def _group_for(self, req: Request) -> list[Request]:
        """The samples one request asks for `req` (--n-per-request K): up to K first draws of
        its setup, by sample, that are neither answered nor asked already; just `req` when
        there is no other. Redraws are always asked alone."""
        if self.n <= 1 or req.draw or req.key not in self.setups or self.job.n_refused:
            return [req]
        open_ = [r for r in self.setups[req.key]
                 if r.key not in self.cache and r.key not in self.inflight]
        at = [r.key for r in open_].index(req.key) // self.n * self.n
        return open_[at:at + self.n]

    async def _send_group(self, group: Request) -> list[_Call | None]:
        """One request for n samples: a row per choice, under its sample's key. Samples the
        server did not answer (fewer choices than asked, or the request failed) are then
        asked one by one, so none is lost."""
        members = list(group.members)
        sent = await self._exchange(group)
        if sent is None:
            return [None] * len(members)
        reply, failure, base = sent
        calls: list[_Call | None] = []
        if reply is not None:
            for i, choice in enumerate(reply.all_choices()[:len(members)]):
                calls.append(self._answered(members[i], choice, {
                    **base, "group_key": group.key, "choice": i, "latency_s": reply.latency_s}))
                self.fresh.add(members[i].key)
        rest = members[len(calls):]
        if rest:
            if failure is not None and failure.refused:    # e.g. a server without `n`
                self.job.n_refused = True
                self._note("refused", f"the teacher refused a request with n={len(members)} "
                           f"({failure.error}); samples are asked one by one from now on")
            elif failure is not None:
                self._note("failed", f"a request for {len(members)} samples failed "
                           f"({failure.error}); its samples are asked one by one")
            else:
                self._note("fewer", f"the teacher answered {len(calls)} of the {len(members)} "
                           "choices asked (n); the other samples are asked one by one")
            calls += await asyncio.gather(*(self._send(m) for m in rest))
        return calls

    def _note(self, kind: str, line: str) -> None:
        """Say something of this `kind` once per job, not once per request."""
        if kind not in self.job.notes:
            self.job.notes.add(kind)
            console.print(f"[yellow]note:[/] {line}", highlight=False)

    def estimate(self, req: Request, answers: int = 1) -> float:
        """What `req` may cost (generous input, max_tokens out for each of its `answers`: an
        n-request pays its prompt once), reserved until answered."""
        return self.job.pricing.cost(req.estimated_input_tokens(),
                                     self.max_out * answers) or 0.0

    def over_budget(self, estimate: float) -> str | None:
        """Why a request of this estimate may not be sent (--max-cost), or None."""
        budget = self.job.options.max_cost
        if budget is not None and self.job.spent + self.reserved + estimate > budget:
            self.budget_reached = True
            return self.budget_line()
        return None

    def budget_line(self) -> str:
        """The --max-cost stop line, with what has been spent by now."""
        return (f"budget reached: ${self.job.spent:.4f} spent of --max-cost "
                f"${self.job.options.max_cost:g}; re-run with a higher --max-cost to continue")

    async def _send(self, req: Request) -> _Call | None:
        """One request for one sample: its llm_calls row, answered or failed."""
        sent = await self._exchange(req)
        if sent is None:
            return None
        reply, failure, base = sent
        if reply is not None:
            return self._answered(req, reply, {**base, "latency_s": reply.latency_s})
        assert failure is not None
        row = {**base, **_sample_columns(req), "status": "failed", "error": failure.error,
               "response": json_or_none(failure.body, self.job._key),
               "latency_s": failure.latency_s}
        self._record(row)
        return _Call(None, failure.error, cached=False)

    async def _exchange(self, req: Request) -> tuple[Reply | None, _Failure | None,
                                                      dict[str, Any]] | None:
        """Send `req` (an n-request too) with retries: (reply, None, columns every row of it
        shares) or (None, why, columns); None after a fatal error (the run halts)."""
        attempts = 0
        started = time.perf_counter()
        estimate = req.estimated_input_tokens() + self.max_out * (len(req.members) or 1)
        backend = self.job.backend
        options = self.job.options
        max_tokens = dict(req.params).get("max_tokens")
        limit = options.attempt_timeout(max_tokens)
        timed_out = 0

        def count_attempt() -> None:
            nonlocal attempts
            attempts += 1

        async def once() -> Reply:
            nonlocal timed_out
            if self.rpm:
                await self.rpm.acquire(1)
            if self.tpm:
                await self.tpm.acquire(estimate)
            if not self.on_wire:   # the stall clock runs only while a request is out
                self.last_answer = time.monotonic()
            self.on_wire += 1
            try:
                if backend.local:  # in-process: a batch, not a connection that can hang
                    reply = await backend.complete(req)
                elif backend.bounds_attempts:     # its own timer covers the whole attempt
                    reply = await backend.complete(req, timeout=limit)
                else:              # the whole attempt, a body trickling in included
                    reply = await _within(backend.complete(req, timeout=limit), limit)
            except (asyncio.TimeoutError, AttemptTimeout):
                timed_out += 1
                why = (f"no complete answer within {limit:g}s (--timeout {options.timeout:g}"
                       + (f" + {max_tokens} tokens at --min-tokens-per-s "
                          f"{options.min_tokens_per_s:g}" if max_tokens else "") + ")")
                if timed_out >= 2:
                    raise RequestError(f"{why}, twice; a slower server needs a lower "
                                       "--min-tokens-per-s or a larger --timeout") from None
                raise TransientError(why) from None
            finally:
                self.on_wire -= 1
            if self.tpm:
                used = (reply.input_tokens or 0) + (reply.output_tokens or 0)
                self.tpm.adjust(used - estimate)
            return reply

        async with self.start_lock:     # load a local model only when a request needs it
            if not self.backend_started:
                if not self.job.announced:     # once per job, not once per round
                    console.print(f"starting {backend.describe()}")
                    self.job.announced = True
                await backend.start()
                self.backend_started = True
                self.last_answer = time.monotonic()
        failure: _Failure | None = None
        reply: Reply | None = None
        try:
            reply = await _retried(once, self.job.options.attempts,
                                   self.job.options.backoff, count_attempt)
        except TransientError as exc:
            failure = _Failure(f"gave up after {attempts} attempts: {exc}", exc.body, False)
        except RequestError as exc:
            failure = _Failure(str(exc), exc.body, refused=not timed_out)
        except JobError as exc:
            self._halt(redact(str(exc), self.job._key) or "fatal teacher error")
            return None
        self.report.requests += 1
        self.report.attempts += attempts
        base = {"model": req.model, "backend": backend.name, "attempts": attempts,
                "run_id": self.job.run_id, "mode": "online"}
        if reply is None:
            assert failure is not None
            failure.error = redact(failure.error, self.job._key) or ""
            failure.latency_s = time.perf_counter() - started
            self.last_error = failure.error
            self.recent.append(False)
            self._check_failures()
            return None, failure, base
        self.recent.append(True)
        self.last_answer = time.monotonic()
        return reply, None, base

    def _answered(self, req: Request, reply: Reply, base: dict[str, Any]) -> _Call:
        """Record an answer (one choice of a reply) as `req`'s llm_calls row, cache it, and
        count its tokens and cost (a choice's share of its request's)."""
        row = {**base, **_sample_columns(req),
               **answer_fields(reply, self.job.pricing, self.job._key),
               "latency_s": base.get("latency_s", reply.latency_s)}
        self._record(row)
        return _Call(self.answered(row, reply.logprobs), None, cached=False)

    def answered(self, row: dict[str, Any],
                 logprobs: list[dict[str, Any]] | None = None) -> CachedAnswer:
        """Count an 'ok' llm_calls row received in this run (sent, one choice of an
        n-request, or imported from a batch) and cache its answer. `logprobs`: the row's, when
        the caller still holds them parsed (else read back from the row's JSON)."""
        self.job._answers += 1
        self.report.input_tokens += row["input_tokens"] or 0
        self.report.output_tokens += row["output_tokens"] or 0
        cost = row["cost_usd"]
        if cost is not None:
            self.job.spent += cost
            if self.report.cost_usd is not None:
                self.report.cost_usd += cost
        else:
            self.report.cost_usd = None
        if logprobs is None and row.get("logprobs"):
            logprobs = json.loads(row["logprobs"])
        answer = CachedAnswer(row["text"], row["finish_reason"], row["input_tokens"],
                              row["output_tokens"], row["reasoning"], logprobs)
        self.cache[row["key"]] = answer
        return answer

    def _record(self, row: dict[str, Any]) -> None:
        """Journal a received row before anything else happens to it, then buffer it."""
        self.calls.append(row)
        journal = self.job.journal
        if journal is None:
            return
        try:
            journal.append(row)
        except OSError as exc:
            self._stop(f"cannot write the answer journal {journal.path}: {exc.strerror or exc}")
            return
        if journal.full:
            self._stop(f"disk full at {journal.path.parent}: no new requests; the answers "
                       "in flight land in the journal's reserved space")

    def _check_failures(self) -> None:
        """Stop when most of the recent requests failed after all their retries."""
        if len(self.recent) < FAILURE_MIN_SEEN:
            return
        failed = self.recent.count(False)
        if failed > FAILURE_SHARE * len(self.recent):
            self._halt(f"stopped: {failed} of the last {len(self.recent)} requests failed "
                       f"({self.job.backend.describe()}); last error: {self.last_error}. "
                       "Everything done so far is kept; a re-run resumes")

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.report.stopped = reason

    # -- progress and storage ---------------------------------------------------------------
    def _count(self, outcome: Outcome) -> None:
        r = self.report
        if outcome.ok:
            r.ok += 1
            r.ok_paid += not outcome.cached
        else:
            r.failed += 1
            self.last_failure = outcome.error
            r.truncated += outcome.status == "truncated"
            r.rejected += (outcome.error or "").startswith(PARSER_GAVE_UP)
        if outcome.cached:
            r.cached += 1
        self.unshown += 1
        self._show()

    def _show(self, now: bool = False) -> None:
        """Hand the items done since the last update to the progress bar, at most every
        PROGRESS_S seconds (`now`: at once, e.g. at the end)."""
        clock = time.monotonic()
        if not now and clock - self.shown_at < PROGRESS_S:
            return
        self.shown_at = clock
        advance, self.unshown = self.unshown, 0
        self.bar.update(self.task, advance=advance, stats=self._stats())

    def _stats(self) -> str:
        r = self.report
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        cost = "" if r.cost_usd is None else f" · ${r.cost_usd:.4f}"
        behind = f" · {len(self.calls):,} waiting to be stored" if self.store_error else ""
        # an in-process model finishes a whole batch at once: its live token count shows
        # that it is generating long before the first item of the batch is done
        tokens = max(r.output_tokens, self.job.backend.generated_tokens)
        # items/s is the bar's own rate; a second (requests/s) read as a contradiction
        # the summary's words: rejected by the parser and truncated are not transport failures
        failed = r.failed - r.rejected - r.truncated
        parts = [f"cached {r.cached:,}"]
        parts += [f"{n:,} {w}" for n, w in ((r.rejected, "rejected"), (r.truncated, "truncated"))
                  if n]
        parts += [f"failed {failed:,}", f"{tokens / elapsed:,.0f} tok/s"]
        return " · ".join(parts) + cost + behind

    async def _flush_every(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.done.wait(), self.job.flush_s)
            if self.job.backend.generated_tokens or self.unshown:
                self._show(now=True)
            self._watch_stall()
            await self._flush()

    def _watch_stall(self) -> None:
        stall = self.job.stall_timeout
        if self.on_wire and time.monotonic() - self.last_answer > stall:
            self._halt(f"stopped: no answer from {self.job.backend.describe()} for "
                       f"{stall:g}s (--stall-timeout); everything received is kept; a re-run "
                       "resumes")

    async def _flush(self) -> None:
        async with self.write_lock:
            if time.monotonic() < self.store_retry_at:
                return
            calls, outcomes = self._take()
            beat = time.monotonic() - self.last_heartbeat > HEARTBEAT_S
            if not (calls or outcomes or beat):
                return
            try:
                await asyncio.to_thread(self._write, calls, outcomes)
            except Exception as exc:
                self._put_back(calls, outcomes)
                self._store_failed(exc)
            else:
                self._store_ok()

    def _store_ok(self) -> None:
        if self.store_error:
            console.print(f"stored again after {self.store_failures} failed attempt(s) "
                          f"({self.store_error})")
        self.store_failing_since, self.store_error, self.store_failures = None, None, 0
        self.store_kind = None
        self.last_heartbeat = time.monotonic()

    def _store_failed(self, exc: BaseException) -> None:
        """Keep everything, retry with backoff; stop on a full disk, a bug, or too long."""
        now = time.monotonic()
        reason = first_line(exc)
        kind = self.store_kind = _store_failure_kind(exc)
        if self.store_failing_since is None:
            self.store_failing_since = now
            console.print(f"[yellow]cannot store results yet[/] ({reason}); keeping them and "
                          "retrying", highlight=False)
        self.store_error = reason
        self.store_failures += 1
        self.store_retry_at = now + min(0.25 * 2 ** self.store_failures, 10.0)
        waited = now - self.store_failing_since
        if kind == "bug":
            self._halt(f"could not store the job's rows: {reason}")
        elif kind == "disk":
            self._stop(f"disk full: {reason}")
        elif waited > self.job.store_timeout:
            self._halt(self._unstored_line(f"{reason}; tried for {waited:.0f}s, "
                                           "FACTORY_STORE_TIMEOUT"))

    def _take(self) -> tuple[list[dict[str, Any]], list[Outcome]]:
        calls, outcomes = self.calls, self.outcomes
        self.calls, self.outcomes = [], []
        return calls, outcomes

    def _put_back(self, calls: list[dict[str, Any]], outcomes: list[Outcome]) -> None:
        """A batch that could not be stored goes back in front of what came since."""
        self.calls[:0] = calls
        self.outcomes[:0] = outcomes

    def _write(self, calls: list[dict[str, Any]], outcomes: list[Outcome]) -> None:
        """One short transaction. If the job's rows cannot be stored (a bug in its row() or
        table), the paid-for answers are still stored on their own before the error surfaces."""
        with self.write_mutex:          # never two transactions at once, whatever asyncio does
            self._write_locked(calls, outcomes)

    def _write_locked(self, calls: list[dict[str, Any]], outcomes: list[Outcome]) -> None:
        rows = [{**self.row(o), **o.provenance()} for o in outcomes]
        wh, lock_wait = self.job.wh, STORE_LOCK_WAIT_S
        try:
            with wh.write(lock_timeout=lock_wait) as con:
                write_calls(con, calls)
                upsert(con, self.table, rows)
                self.job.store_prompts(con)
                self.job.note_batches(con)
                con.execute("update job_runs set counts = ?, heartbeat_at = current_timestamp"
                            " where run_id = ?",
                            [json.dumps(self.report.counts()), self.job.run_id]).fetchall()
            self.job._prompts_unrecorded = False
        except Exception as exc:
            if _store_failure_kind(exc) == "bug" and calls:
                with wh.write(lock_timeout=lock_wait) as con:
                    write_calls(con, calls)
            raise


async def _retried(once: Callable[[], Awaitable[Reply]], attempts: int, backoff: float,
                   count_attempt: Callable[[], None]) -> Reply:
    """with_retries(once, ...), without building tenacity's retry loop for the requests
    that succeed at once (most): a first attempt that raises TransientError is handed to
    with_retries as its first attempt's outcome, so waits, Retry-After and the attempt
    count are exactly tenacity's."""
    count_attempt()
    try:
        return await once()
    except TransientError as exc:
        first: TransientError | None = exc
    counted = False

    def count() -> None:
        nonlocal counted
        if counted:
            count_attempt()
        counted = True

    async def attempt() -> Reply:
        nonlocal first
        if first is not None:        # the attempt already made
            failed, first = first, None
            raise failed
        return await once()
    return await with_retries(attempt, attempts, initial_wait=backoff, on_attempt=count)


async def _within(call: Awaitable[Reply], seconds: float) -> Reply:
    """`await call`, cancelled after `seconds` (asyncio.TimeoutError). asyncio.timeout
    (3.11+) arms one timer; wait_for wraps the call in a task of its own before 3.12."""
    if _timeout is None:
        return await asyncio.wait_for(call, seconds)
    async with _timeout(seconds):
        return await call


_timeout: Callable[[float], Any] | None = getattr(asyncio, "timeout", None)


def _store_failure_kind(exc: BaseException) -> str:
    """'disk' (no space), 'retry' (a lock, I/O, memory: may pass) or 'bug' (the job's rows
    do not fit its table: retrying cannot help)."""
    text = str(exc).lower()
    if "no space left" in text or "disk full" in text or (
            isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return "disk"
    if isinstance(exc, (FactoryError, OSError, duckdb.IOException, duckdb.TransactionException,
                        duckdb.OutOfMemoryException, duckdb.InterruptException)):
        return "retry"
    return "bug"


def truncation(answer: CachedAnswer, limit: int | None) -> str | None:
    """Why `answer` is incomplete (cut at max_tokens `limit`, stopped by a content filter,
    or a reasoning block never closed), or None when it is whole."""
    budget = (f"cut at max_tokens={limit}; raise --max-tokens" if limit else
              "cut at the server's token limit (no max_tokens sent); set --max-tokens")
    if answer.finish_reason == "length" or (     # servers that send no finish_reason
            answer.finish_reason is None and limit and answer.output_tokens is not None
            and answer.output_tokens >= limit):
        return budget
    if answer.finish_reason == "content_filter":
        return "stopped by the provider's content filter (finish_reason content_filter)"
    text = answer.text
    if text.count("<think>") > text.count("</think>"):
        if answer.finish_reason is not None and (
                limit is None or answer.output_tokens is None or answer.output_tokens < limit):
            # not the budget: the model ended its answer inside its reasoning
            used = "" if answer.output_tokens is None else f", {answer.output_tokens} tokens"
            return (f"reasoning block (<think>) never closed: the model stopped inside it "
                    f"(finish_reason {answer.finish_reason}{used})")
        return f"reasoning block (<think>) never closed: {budget}"
    return None


def _sample_columns(req: Request) -> dict[str, Any]:
    """The llm_calls columns that name the sample a row answers."""
    return {"key": req.key, "sample": req.sample, "draw": req.draw,
            "request": req.canonical_json()}
