"""Teacher engine throughput against the local test server (run: python bench/teacher.py).

1. Concurrency: N requests at concurrency C against a server that takes a fixed LATENCY per
   request. The bound is C / LATENCY requests/s; we print the achieved share (target >= 90%
   at C = 64) and the client's CPU time per request (the server runs in its own process),
   for the whole engine and, as a second baseline, for the backend alone (the same
   AsyncOpenAI calls with nothing around them: what this machine allows).
2. Replay: 10,000 requests answered once (server without latency), then the same job again,
   all from the cache; printed against the cost of only rendering and hashing the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.prompts import parse_prompt  # noqa: E402
from factory.teacher import TeacherJob, TeacherOptions, Work  # noqa: E402
from factory.teacher.backends import OpenAIBackend  # noqa: E402
from factory.teacher.request import Request, Sampling  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402

PROMPT = parse_prompt("bench", """{#
purpose: benchmark prompt
output: anything
source: bench/teacher.py
#}
{% block user %}Describe item {{ n }} ({{ title }}) in one sentence.{% endblock %}
""")
TABLE = ("create table if not exists bench_answers (item varchar, answer varchar,"
         " work_key varchar, call_key varchar, run_id varchar, prompt_name varchar,"
         " prompt_hash varchar, backend varchar, model varchar, sample integer,"
         " draws integer, cached boolean, status varchar, error varchar,"
         " primary key (item, work_key))")


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "factory.testing.openai_server",
                             "--latency", str(latency)], stdout=subprocess.PIPE, text=True,
                            env=env)
    return proc, proc.stdout.readline().strip()


def works(n: int, tag: str) -> list[Work]:
    return [Work(id=f"{tag}-{i}", vars={"n": i, "title": f"{tag} title {i}"}) for i in range(n)]


def run(wh: Warehouse, url: str, items: list[Work], concurrency: int,
        cache_only: bool = False) -> tuple[float, float, object]:
    """Wall and CPU seconds of job.run() (the run record's own writes excluded)."""
    opts = TeacherOptions(url=url, model="bench-model", concurrency=concurrency,
                          cache_only=cache_only)
    with TeacherJob(wh, "bench", dataset=None, options=opts) as job:
        cpu, wall = time.process_time(), time.perf_counter()
        report = job.run(items, prompt=PROMPT, parse=str, table="bench_answers",
                         row=lambda o: {"item": o.work.id, "answer": o.value})
        return time.perf_counter() - wall, time.process_time() - cpu, report


def backend_alone(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """Baseline: the same backend (AsyncOpenAI) sending n requests, no engine around it."""
    async def go() -> None:
        backend = OpenAIBackend(url, "bench-model", None, 120.0, concurrency)
        await backend.start()                   # the clients are made here
        slots = asyncio.Semaphore(concurrency)
        requests = [Request.build("bench-model", PROMPT.render(**w.vars), Sampling())
                    for w in works(n, f"raw{concurrency}")]

        async def one(request: object) -> None:
            async with slots:
                await backend.complete(request)

        await asyncio.gather(*(one(r) for r in requests))
        await backend.aclose()

    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=15, help="requests = C x rounds")
    parser.add_argument("--replay", type=int, default=10_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    wh = Warehouse(tmp / "bench.duckdb")
    with wh.write() as con:
        con.execute(TABLE)

    server, url = start_server(args.latency)
    try:
        print(f"# concurrency (server latency {args.latency * 1000:.0f} ms, "
              f"{args.rounds} requests per slot)")
        run(wh, url, works(8, "warm-up"), 8)          # imports and first connections
        for c in args.concurrency:
            n = c * args.rounds
            bound = c / args.latency
            raw_wall, raw_cpu = backend_alone(url, n, c)
            wall, cpu, report = run(wh, url, works(n, f"c{c}"), c)
            assert report.requests == n, report
            print(f"C={c:<4} requests={n:<5} bound={bound:6.1f} req/s | engine "
                  f"{n / wall:6.1f} req/s = {n / wall / bound:6.1%} of bound, "
                  f"CPU {cpu / n * 1000:.2f} ms/req | backend alone {n / raw_wall:6.1f} req/s = "
                  f"{n / raw_wall / bound:6.1%}, CPU {raw_cpu / n * 1000:.2f} ms/req")
    finally:
        server.terminate()

    server, url = start_server(0.0)
    try:
        items = works(args.replay, "replay")
        wall, cpu, report = run(wh, url, items, 64)
        print(f"# replay of {args.replay:,} cached requests")
        print(f"first pass (sent, no server latency): {wall:6.2f} s "
              f"({args.replay / wall:,.0f} req/s, client CPU/request {cpu / args.replay * 1000:.2f}"
              " ms)")
        job = TeacherJob(wh, "bench", dataset=None, options=TeacherOptions(
            url=url, model="bench-model"))              # not entered: records no run
        base = time.perf_counter()
        keys = [job.request(PROMPT, w).key for w in items]
        render = time.perf_counter() - base
        assert len(set(keys)) == args.replay
        for cache_only in (False, True):
            wall, cpu, report = run(wh, url, items, 64, cache_only=cache_only)
            assert report.cached == args.replay and report.requests == 0, report
            label = "replay --cache-only" if cache_only else "replay"
            print(f"{label:<20}: {wall:6.2f} s ({args.replay / wall:,.0f} items/s); "
                  f"{wall / render:5.1f}x the time to render and hash them ({render:.2f} s)")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
