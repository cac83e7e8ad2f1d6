"""Job runs: every job records what it was asked, what it did and how it ended."""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from factory.settings import code_version

#: a run of another host with no heartbeat for this long is taken for dead
STALE_S = float(os.environ.get("FACTORY_RUN_STALE_S", "600"))


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


def process_started(pid: int) -> float | None:
    """When process `pid` started (clock ticks since boot, from /proc), None if unknown or
    gone: with the pid it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])


def heartbeat(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """A sign of life: running runs without one for long are taken for dead."""
    con.execute("update job_runs set heartbeat_at = current_timestamp where run_id = ?",
                [run_id]).fetchall()


@dataclass(frozen=True)
class LiveRun:
    run_id: str
    host: str | None
    pid: int | None
    shard: tuple[int, int] | None
    heartbeat_age_s: float


def live_runs(con: duckdb.DuckDBPyConnection, job: str, dataset: str | None) -> list[LiveRun]:
    """Other runs of `job` on `dataset` that are running and alive."""
    rows = con.execute(
        "select run_id, host, pid, pid_started, params->>'$.teacher.shard',"
        " date_diff('millisecond', heartbeat_at, current_timestamp) / 1000.0"
        " from job_runs where status = 'running' and job = ? and dataset is not distinct from ?"
        " and pid is not null", [job, dataset]).fetchall()
    me = (socket.gethostname(), os.getpid())
    found = []
    for run_id, host, pid, started, shard, age in rows:
        if (host, pid) == me:
            continue
        if host == socket.gethostname():
            if process_started(pid) != started:
                continue
        elif age is None or age > STALE_S:
            continue
        i, _, n = (shard or "").partition("/")
        found.append(LiveRun(run_id, host, pid, (int(i), int(n)) if n else None, age or 0.0))
    return found


def reap_dead_runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Mark 'running' runs whose process is gone as 'died'; returns their ids."""
    here = socket.gethostname()
    dead = []
    for run_id, host, pid, started, age in con.execute(
            "select run_id, host, pid, pid_started,"
            " date_diff('millisecond', heartbeat_at, current_timestamp) / 1000.0"
            " from job_runs where status = 'running' and pid is not null").fetchall():
        if host == here:
            if pid != os.getpid() and process_started(pid) != started:
                dead.append(run_id)
        elif age is None or age > STALE_S:
            dead.append(run_id)
    if dead:
        con.execute("update job_runs set status = 'died', finished_at = current_timestamp,"
                    " error = 'its process is gone' where run_id in (select unnest(?))",
                    [dead]).fetchall()
    return dead


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
