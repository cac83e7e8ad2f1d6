"""Platform commands around the teacher: `teacher check`, `runs`, `merge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from factory.teacher.options import TeacherOptions, teacher_options

teacher_app = typer.Typer(help="The teacher LLM: which backend and model, and does it answer.",
                          no_args_is_help=True)

CHECK_PROMPT = "Reply with the single word: ready"


@teacher_app.command("check")
@teacher_options(only=("teacher_url", "teacher_model", "backend", "timeout", "attempts",
                       "temperature", "max_tokens", "seed"))
def check_cmd(*, teacher: TeacherOptions) -> None:
    """Show the configured backend/model and send one test request (nothing is stored)."""
    import asyncio

    from factory.console import console, summary
    from factory.errors import FactoryError
    from factory.teacher.backends import make_backend
    from factory.teacher.keys import api_key, redact, safe_url
    from factory.teacher.limits import JobError, RequestError, TransientError, with_retries
    from factory.teacher.request import Request, Sampling

    key = api_key()
    backend = make_backend(teacher.backend_name, teacher.url, teacher.model, key,
                           teacher.timeout, 1)
    sampling = Sampling(temperature=0.0, max_tokens=16).merged(teacher.sampling)
    request = Request.build(backend.model, [{"role": "user", "content": CHECK_PROMPT}], sampling)

    async def ask() -> object:
        try:
            await backend.start()
            return await with_retries(lambda: backend.complete(request), teacher.attempts)
        finally:
            await backend.aclose()

    # a key only matters to a remote server; an in-process model never reads one
    console.print(f"teacher: {backend.describe()}"
                  + ("" if backend.local else f"; api key {'set' if key else 'not set'}"))
    try:
        with console.status("sending one request"):
            reply = asyncio.run(ask())
    except (TransientError, RequestError, JobError) as exc:
        raise FactoryError(f"teacher check failed ({backend.describe()}): "
                           f"{redact(str(exc), key)}") from None
    summary("teacher answered", {
        "backend": backend.name, "model": backend.model, "url": safe_url(teacher.url) or "-",
        "answer": repr(reply.text[:200]), "finish reason": reply.finish_reason,
        "tokens in/out": f"{reply.input_tokens} / {reply.output_tokens}",
        "latency": f"{reply.latency_s:.2f}s",
    })


def runs_cmd(
    job: str = typer.Option(None, "--job", help="Only runs of this job."),
    last: int = typer.Option(20, "--last", min=1, help="How many of the latest runs."),
    costs: bool = typer.Option(False, "--costs", help="Cost per kept row per job and way of "
                               "asking (online, online n=K, batch), over all teacher runs."),
) -> None:
    """Job runs, newest first: status (a dead run shows as died), requests, cached, failed,
    tokens, cost."""
    from factory.cli import stdout_console, warehouse
    from factory.console import console
    from factory.runs import liveness

    if costs:
        _costs(job)
        return

    sql = ("select run_id, job, dataset, status, started_at,"
           " date_diff('second', started_at, coalesce(finished_at, current_timestamp)),"
           " date_diff('second', started_at, coalesce(finished_at, heartbeat_at, started_at)),"
           " model, prompt_name, counts, error from job_runs"
           + (" where job = ?" if job else "") + " order by started_at desc, run_id desc limit ?")
    with warehouse(reader=True).read() as con:
        rows = con.execute(sql, ([job] if job else []) + [last]).fetchall()
        alive = {r.run_id: r for r in liveness(
            con, "status = 'running' and run_id in (select unnest(?::varchar[]))",
            [[r[0] for r in rows]])}
    if not rows:
        console.print("no job runs yet")
        return
    lines = []

    def n(counts: dict, name: str) -> str:
        value = counts.get(name)
        return "-" if value is None else f"{value:,}"

    for (run_id, _job, dataset, status, started, secs, secs_seen, model, prompt, counts,
         error) in rows:
        c = json.loads(counts) if counts else {}
        cost = c.get("cost_usd")
        tokens = (f"{c['input_tokens']:,} / {c['output_tokens']:,}"
                  if "input_tokens" in c else "-")
        live = alive.get(run_id)
        if live is not None:
            why = live.death
            if why:                    # dead but not marked yet (this command writes nothing)
                status, secs, error = "died", secs_seen, f"died ({why})"
            elif live.heartbeat_age_s is not None:
                status = f"running (beat {live.heartbeat_age_s:.0f}s ago)"
        lines.append((run_id, status, dataset or "-", f"{started:%Y-%m-%d %H:%M}", str(secs),
                      model or "-", prompt or "-", n(c, "items"), n(c, "requests"),
                      n(c, "cached"), n(c, "failed"), tokens,
                      "-" if cost is None else f"${cost:.4f}", (error or "")[:80]))
    out = stdout_console()
    out.print(_wide_table(lines) if out.width >= _wide_width(lines) else _narrow_table(lines))


#: how a teacher run asked: batch, online with n samples per request, or online
_MODE_SQL = """case when t->>'mode' = 'batch' then 'batch'
     when coalesce(try_cast(t->>'n_per_request' as integer), 1) > 1
     then 'online n=' || (t->>'n_per_request') else 'online' end"""
_COSTS_SQL = f"""
with paid as (   -- what each run paid, from the answers themselves (a killed run's too)
    select run_id, count(distinct coalesce(group_key, key)) as requests,
           sum(input_tokens) as input_tokens, sum(output_tokens) as output_tokens,
           sum(cost_usd) as cost,
           -- an answer without a price makes the run's cost unknown, not smaller
           bool_or(status = 'ok' and cost_usd is null) as unpriced
    from llm_calls group by run_id),
r as (select run_id, job, dataset, try_cast(params as json)->'teacher' as t,
             try_cast(counts as json) as c
      from job_runs where status <> 'running'),
m as (select job, coalesce(dataset, '-') as dataset, {_MODE_SQL} as mode,
             coalesce(p.requests, 0) as requests,
             coalesce(p.input_tokens, 0) as input_tokens,
             coalesce(p.output_tokens, 0) as output_tokens,
             case when not coalesce(p.unpriced, false) then coalesce(p.cost, 0) end as cost,
             -- rows kept whose answer this run paid for (not replayed from the cache);
             -- runs before ok_paid was counted: ok - cached, which also counts cached failures
             coalesce(try_cast(c->>'ok_paid' as bigint),
                      greatest(coalesce(try_cast(c->>'ok' as bigint), 0)
                               - coalesce(try_cast(c->>'cached' as bigint), 0), 0)) as kept
      from r left join paid p using (run_id) where t is not null)
select job, dataset, mode, count(*), sum(requests), sum(input_tokens), sum(output_tokens),
       case when count(cost) = count(*) then sum(cost) end, sum(kept)
from m {{where}} group by all order by job, dataset, mode
"""


def _costs(job: str | None) -> None:
    """`factory runs --costs`: per job, dataset and way of asking, what a kept row cost."""
    from rich.table import Table

    from factory.cli import stdout_console, warehouse
    from factory.console import console

    with warehouse(reader=True).read() as con:
        rows = con.execute(_COSTS_SQL.format(where="where job = ?" if job else ""),
                           [job] if job else []).fetchall()
    if not rows:
        console.print("no finished teacher runs yet")
        return
    table = Table("job", "dataset", "mode", "runs", "requests", "tokens in/out", "cost",
                  "rows kept", "$ / kept row", "tokens in / kept row",
                  caption="requests, tokens and cost: the llm_calls rows each run stored "
                          "(batch prices for batch); rows kept: ok rows whose answer the run "
                          "paid for (cache replays excluded)")
    for job_, dataset, mode, runs, requests, n_in, n_out, cost, kept in rows:
        table.add_row(job_, dataset, mode, f"{runs:,}", f"{requests:,}", f"{n_in:,} / {n_out:,}",
                      "unknown" if cost is None else f"${cost:.4f}", f"{kept:,}",
                      "-" if cost is None or kept <= 0 else f"${cost / kept:.6f}",
                      "-" if kept <= 0 else f"{n_in / kept:,.0f}")
    stdout_console().print(table)


_HEADERS = ("run", "status", "dataset", "started", "s", "model", "prompt", "items",
            "requests", "cached", "failed", "tokens in/out", "cost", "error")


def _wide_width(lines: list[tuple[str, ...]]) -> int:
    """Columns the wide table needs to show every field legibly: run id and status whole,
    the others at least their longest word (at most 16 characters)."""
    widths = [max(len(r[0]) for r in lines), max(24, *(len(r[1]) for r in lines))]
    for i, header in enumerate(_HEADERS[2:], start=2):
        words = [w for text in (header, *(r[i] for r in lines)) for w in text.split()]
        widths.append(min(16, max(len(w) for w in words)))
    return sum(widths) + 3 * len(widths) + 1


def _wide_table(lines: list[tuple[str, ...]]) -> Any:
    """One column per field: what a wide terminal (or a pipe) gets."""
    from rich.table import Table

    table = Table(_uncut_column("run", max(len(r[0]) for r in lines)),
                  _uncut_column("status", len("running (beat 9999s ago)")), *_HEADERS[2:])
    for line in lines:
        table.add_row(*line)
    return table


def _narrow_table(lines: list[tuple[str, ...]]) -> Any:
    """Where the wide table would not fit (80 columns), the whole run id stays in its own
    column (ids are copied into other commands) and the rest wraps beside it."""
    from rich.table import Table

    table = Table(_uncut_column("run", max(len(r[0]) for r in lines)), "status, details",
                  show_lines=True)
    for run_id, status, *rest in lines:
        named = [f"{h} {v}" for h, v in zip(_HEADERS[2:], rest, strict=True)
                 if v not in ("-", "") and h != "started"]
        table.add_row(run_id, " · ".join([status, rest[1], *named]))
    return table


def _uncut_column(header: str, width: int) -> Any:
    """A table column that is never shortened (run ids are copied into other commands)."""
    from rich.table import Column

    return Column(header, no_wrap=True, min_width=width, overflow="fold")


def merge_cmd(
    shards: list[Path] = typer.Argument(..., help="Shard warehouse files to fold in."),
) -> None:
    """Fold shard warehouses into this one by primary key; merging twice adds nothing."""
    from factory.cli import warehouse
    from factory.console import summary
    from factory.merge import merge_warehouses

    wh = warehouse()
    results = merge_warehouses(wh, shards)
    rows: dict[str, object] = {}
    for shard, changed in results.items():
        rows[shard] = ", ".join(f"{t} {n:,}" for t, n in sorted(changed.items())) or "nothing new"
    summary(f"merged {len(shards)} shard(s) into {wh.path}", rows,
            "select run_id, job, status, counts from job_runs order by started_at")


def register(app: typer.Typer) -> None:
    app.add_typer(teacher_app, name="teacher")
    app.command("runs")(runs_cmd)
    app.command("merge")(merge_cmd)
