"""Job runs: every job records what it was asked, what it did and how it ended.

A run is 'running' only while its process lives. Each run records its host, pid and the
pid's start time (`start_run`), and shows a sign of life (`heartbeat`) as it writes. A run
whose process is gone is *dead*:

- same host: its pid is gone, or now belongs to another process (another start time);
- another host (or no pid recorded): no sign of life for FACTORY_RUN_STALE_S seconds
  (default 600): a node lost, a job killed elsewhere.

A live process on this host is never taken for dead, however long it stays silent.
`reap_dead_runs` (called once per process on its first write connection) marks dead runs
'died'; read-only commands show them as died without writing (`run_state`, `liveness`).
Status: running | succeeded | stopped | failed | interrupted | died.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from factory.errors import FactoryError
from factory.settings import code_version

STALE_ENV = "FACTORY_RUN_STALE_S"
DEFAULT_STALE_S = 600.0
#: statuses a run ends with; 'died' is set by another process, the others by the run itself
FINISHED = ("succeeded", "stopped", "failed", "interrupted")


def new_run_id(job: str) -> str:
    """Sortable, readable and unique: job name, UTC time, random suffix."""
    return f"{job}-{datetime.utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def start_run(
    con: duckdb.DuckDBPyConnection, job: str, dataset: str | None, params: dict[str, Any]
) -> str:
    run_id = new_run_id(job)
    con.execute(
        "insert into job_runs (run_id, job, dataset, params, status, code_version, host, pid,"
        " pid_started, heartbeat_at)"
        " values (?, ?, ?, ?, 'running', ?, ?, ?, ?, current_timestamp)",
        [run_id, job, dataset, json.dumps(params, default=str, sort_keys=True), code_version(),
         socket.gethostname(), os.getpid(), process_started(os.getpid())],
    )
    return run_id


def _stat(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in clock ticks since boot) of `pid` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], float(fields[19])


def process_started(pid: int) -> float | None:
    """When process `pid` started (clock ticks since boot, from /proc), None if unknown or
    gone: with the pid it identifies a process even after the pid is reused."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def process_alive(pid: int) -> tuple[bool, float | None]:
    """(alive, start time or None) of `pid` on this host; a zombie is not alive."""
    stat = _stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X", "x"), stat[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except (PermissionError, OSError):
        return True, None          # exists (another user's), or we cannot tell: alive
    return True, None


def heartbeat(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """A sign of life: running runs without one for long are taken for dead. A run that was
    taken for dead by mistake (it only stayed silent too long) is running again."""
    (revived,) = con.execute(
        "update job_runs set heartbeat_at = current_timestamp, status = 'running',"
        " finished_at = null, error = null where run_id = ? and status = 'died'",
        [run_id]).fetchone()
    if revived:
        con.execute("update train_runs set status = 'running', finished_at = null,"
                    " error = null where run_id = ? and status = 'died'", [run_id]).fetchall()
    else:
        con.execute("update job_runs set heartbeat_at = current_timestamp where run_id = ?",
                    [run_id]).fetchall()


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of a block to `seconds[phase]` (stored with the run's counts)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = round(seconds.get(phase, 0.0) + time.perf_counter() - started, 3)


@contextmanager
def keep_alive(wh: Any, run_id: str, every_s: float | None = None) -> Iterator[None]:
    """Heartbeat `run_id` from a thread while a long step that does not write runs (training,
    clustering). A beat that finds the warehouse locked is skipped; the next one tries again."""
    every = every_s if every_s is not None else max(1.0, min(60.0, stale_after_s() / 10))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                con = duckdb.connect(str(wh.path))
            except duckdb.Error:
                continue
            try:
                heartbeat(con, run_id)
            except duckdb.Error:
                pass
            finally:
                con.close()

    thread = threading.Thread(target=beat, name=f"heartbeat {run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# -- liveness --------------------------------------------------------------------------------
def stale_after_s() -> float:
    """Seconds without a sign of life after which a run on another host counts as dead."""
    text = os.environ.get(STALE_ENV, "").strip()
    if not text:
        return DEFAULT_STALE_S
    try:
        value = float(text)
    except ValueError:
        raise FactoryError(f"{STALE_ENV}={text!r}: expected seconds, e.g. 600") from None
    if value <= 0:
        raise FactoryError(f"{STALE_ENV}={text!r}: must be positive")
    return value


@dataclass(frozen=True)
class RunLiveness:
    """What a job_runs row says about its process (see `liveness`)."""

    run_id: str
    job: str
    dataset: str | None
    status: str
    host: str | None
    pid: int | None
    pid_started: float | None
    heartbeat_age_s: float | None   # since the last heartbeat, or the start when it has none
    shard: str | None = None        # the teacher's --shard i/N, if any

    @property
    def death(self) -> str | None:
        return death(self)

    @property
    def state(self) -> str:
        return run_state(self)


def _get(row: RunLiveness | Mapping[str, Any], name: str) -> Any:
    return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)


def _is_own(host: str | None, pid: int | None, pid_started: float | None) -> bool:
    if host != socket.gethostname() or pid != os.getpid():
        return False
    mine = process_started(os.getpid())
    return pid_started is None or mine is None or abs(mine - pid_started) < 0.5


def death(row: RunLiveness | Mapping[str, Any]) -> str | None:
    """Why a 'running' row's process is dead (how it was found), or None when it may live.

    `row` has status, host, pid, pid_started, heartbeat_age_s (a RunLiveness or a mapping).
    Reads /proc and the environment; writes nothing."""
    if _get(row, "status") != "running":
        return None
    host, pid = _get(row, "host"), _get(row, "pid")
    pid_started, age = _get(row, "pid_started"), _get(row, "heartbeat_age_s")
    if _is_own(host, pid, pid_started):
        return None
    if host is not None and pid is not None and host == socket.gethostname():
        alive, started = process_alive(int(pid))
        if not alive:
            return f"pid check: process {pid} on {host} is gone"
        if pid_started is not None and started is not None and abs(started - pid_started) >= 0.5:
            return f"pid check: pid {pid} on {host} now belongs to another process"
        return None
    bound = stale_after_s()
    if age is not None and age > bound:
        where = f" on {host}" if host else ""
        return (f"heartbeat: no sign of life{where} for {age:.0f}s "
                f"(over {STALE_ENV}={bound:g})")
    return None


def run_state(row: RunLiveness | Mapping[str, Any]) -> str:
    """The status to show: 'died' for a 'running' run whose process is dead, else the stored
    status. For read-only commands: nothing is written."""
    status = _get(row, "status")
    return "died" if status == "running" and death(row) else status


def state_sql(alias: str = "") -> str:
    """A SQL expression for the status to show, by heartbeat only (SQL cannot check a pid):
    'died' for a 'running' run silent for longer than FACTORY_RUN_STALE_S. Prefer `run_state`
    in Python, which also checks the pids of this host."""
    a = f"{alias}." if alias else ""
    return (f"case when {a}status = 'running' and date_diff('millisecond',"
            f" coalesce({a}heartbeat_at, {a}started_at), current_timestamp::timestamp)"
            f" > {stale_after_s() * 1000:.0f} then 'died' else {a}status end")


def liveness(con: duckdb.DuckDBPyConnection, where: str = "true",
             params: list[Any] | None = None, *, database: str | None = None
             ) -> list[RunLiveness]:
    """RunLiveness of the job_runs rows matching `where` (SQL over job_runs' columns).
    `database`: an attached database (a shard), whose job_runs may predate the liveness
    columns; those rows then have no host/pid and are judged by their start time."""
    source = f'"{database}".main.job_runs' if database else "job_runs"
    have = {c for (c,) in con.execute(
        "select column_name from duckdb_columns() where table_name = 'job_runs'"
        " and schema_name = 'main' and database_name = coalesce(?, current_database())",
        [database]).fetchall()}

    def col(name: str) -> str:
        return name if name in have else f"null as {name}"

    beat = "heartbeat_at" if "heartbeat_at" in have else "null"
    rows = con.execute(
        f"select run_id, job, dataset, status, {col('host')}, {col('pid')},"
        f" {col('pid_started')},"
        f" date_diff('millisecond', coalesce({beat}, started_at),"
        f" current_timestamp::timestamp) / 1000.0,"
        f" try_cast(params as json)->'teacher'->>'shard'"
        f" from {source} where {where} order by started_at, run_id", params or []).fetchall()
    return [RunLiveness(r[0], r[1], r[2], r[3], r[4], None if r[5] is None else int(r[5]),
                        r[6], None if r[7] is None else float(r[7]), r[8]) for r in rows]


def live_runs(con: duckdb.DuckDBPyConnection, job: str, dataset: str | None
              ) -> list[RunLiveness]:
    """The other live runs of `job` on `dataset` (not this process's own): 'running' rows
    whose process is alive by the rules above. Each has run_id, host, pid, shard (the
    teacher's --shard, or None) and heartbeat_age_s. Writes nothing."""
    rows = liveness(con, "job = ? and dataset is not distinct from ? and status = 'running'",
                    [job, dataset])
    return [r for r in rows if not _is_own(r.host, r.pid, r.pid_started) and death(r) is None]


def reap_dead_runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Mark 'running' runs whose process is dead as 'died' (finished_at, and an error line
    saying how it was found); returns their ids. Never this process's own runs."""
    reaped = []
    for row in liveness(con, "status = 'running'"):
        why = death(row)
        if why is None:
            continue
        con.execute(   # it ended after its last sign of life, the best estimate we have
            "update job_runs set status = 'died', error = ?,"
            " finished_at = coalesce(heartbeat_at, current_timestamp)"
            " where run_id = ? and status = 'running'", [f"died ({why})", row.run_id]).fetchall()
        reaped.append(row.run_id)
    _reap_train_runs(con)
    return reaped


def _reap_train_runs(con: duckdb.DuckDBPyConnection) -> None:
    """train_runs rows share their run_id with job_runs: a 'running' one whose job run died
    died too."""
    if not con.execute("select 1 from duckdb_tables() where table_name = 'train_runs'"
                       " and schema_name = 'main' and database_name = current_database()"
                       ).fetchone():
        return
    con.execute(
        "update train_runs t set status = 'died',"
        " finished_at = coalesce(j.finished_at, current_timestamp), error = j.error"
        " from job_runs j where j.run_id = t.run_id and t.status = 'running'"
        " and j.status = 'died'").fetchall()


def finish_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    status: str,
    counts: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    con.execute(
        "update job_runs set status = ?, finished_at = current_timestamp, counts = ?, error = ?"
        " where run_id = ?",
        [status, json.dumps(counts or {}, default=str, sort_keys=True), error, run_id],
    )


# -- naming runs on the command line ---------------------------------------------------------
#: the word every run option accepts for "the newest succeeded run that fits"
LATEST = "latest"
_SHOWN = 5     # candidates named in an ambiguity error


def resolve_run(con: duckdb.DuckDBPyConnection, job: str | tuple[str, ...],
                dataset: str | None, text: str | None, *, within: str | None = None,
                what: str | None = None, option: str = "--run", first: str | None = None
                ) -> str:
    """The run id that `text` names among the runs of `job` (one or several job names) on
    `dataset`: None or 'latest' is the newest succeeded one; anything else is a whole id or a
    unique prefix of one, with or without the leading '<job>-' (as git takes short hashes).

    Every command resolves run options here, so they all read the same way. `within`: SQL
    listing the run ids that fit besides job and dataset (e.g. runs that left rows in a
    table); `what` names the runs in errors (default: the job); `first`: the command that
    makes such a run, for the error when there is none. A named run is returned whatever
    its status: callers that need a succeeded one check it (and say so)."""
    jobs = (job,) if isinstance(job, str) else tuple(job)
    what = what or "/".join(jobs)
    fits = ("job in (select unnest(?::varchar[])) and dataset is not distinct from ?"
            + (f" and run_id in ({within})" if within else ""))
    args: list[Any] = [list(jobs), dataset]
    of = f" for dataset {dataset!r}" if dataset is not None else ""
    listing = f"`factory runs --job {jobs[0]}` lists them"
    word = (text or "").strip()
    if not word or word == LATEST:
        row = con.execute(f"select run_id from job_runs where {fits} and status = 'succeeded'"
                          " order by started_at desc, run_id desc limit 1", args).fetchone()
        if row is not None:
            return str(row[0])
        (others,) = con.execute(f"select count(*) from job_runs where {fits}", args).fetchone()
        seen = (f" ({others} that did not finish: pass {option} to pick one; {listing})"
                if others else "")
        hint = f": run `{first}` first" if first else ""
        raise FactoryError(f"no finished {what} run{of}{seen}{hint}")
    starts = " or ".join(["starts_with(run_id, ?)"] * (1 + len(jobs)))
    words = [word] + [f"{j}-{word}" for j in jobs]
    named = con.execute(
        f"select run_id, job, dataset, ({fits}) from job_runs where run_id = ? or {starts}"
        " order by started_at desc, run_id desc", [*args, word, *words]).fetchall()
    exact = [r for r in named if r[0] == word]
    if exact:
        named = exact
    fitting = [r[0] for r in named if r[3]]
    if len(fitting) == 1:
        return str(fitting[0])
    if len(fitting) > 1:
        shown = ", ".join(fitting[:_SHOWN]) + (", ..." if len(fitting) > _SHOWN else "")
        raise FactoryError(f"{option} {word!r} is ambiguous: {len(fitting)} {what} runs{of} "
                           f"start with it ({shown}); give more of the id")
    if named:
        run_id, other_job, other_dataset, _ = named[0]
        if other_job not in jobs:
            raise FactoryError(f"run {run_id} is a {other_job} run, not a {what} run")
        if other_dataset != dataset:
            raise FactoryError(f"{what} run {run_id} is of dataset {other_dataset!r}, not "
                               f"{dataset!r}")
        raise FactoryError(f"{what} run {run_id} does not fit here (it left nothing to use); "
                           f"{listing}")
    latest = con.execute(f"select run_id from job_runs where {fits} and status = 'succeeded'"
                         " order by started_at desc, run_id desc limit 1", args).fetchone()
    joined = f"{option}latest" if option.endswith(":") else f"{option} latest"
    known = (f"the latest is {latest[0]}, or pass {joined}" if latest
             else f"there is none yet{': run `' + first + '`' if first else ''}")
    raise FactoryError(f"no {what} run {word!r}{of} ({known}; {listing})")
