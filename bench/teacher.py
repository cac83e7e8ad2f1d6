"""Teacher engine throughput at the C/latency bound (run: python bench/teacher.py).

1. Concurrency: C x ROUNDS requests at concurrency C against a server that answers every
   request after a fixed LATENCY. The bound is C / LATENCY requests/s. Printed per client,
   medians of interleaved repeats: achieved req/s as a share of the bound, and client CPU per
   request (this process's CPU time, all threads, / requests). Clients:
   - factory: `TeacherJob.run()` (journal and warehouse writes included; the job's run
     record, written once per job on entering and leaving, is not timed);
   - backend: factory's OpenAIBackend alone (one aiohttp session), no engine around it;
   - openai client: the transport factory used before (AsyncOpenAI's generic `post()` with
     the same body, clients of 8 connections each), no engine around it;
   - bare httpx2: a bare httpx2 client (what the openai client is built on), JSON in and out;
   - bare aiohttp: the same with aiohttp;
   - curator: bespokelabs-curator, when installed (else a line says it is not).
   The server is a minimal asyncio server in its own process (`--serve`), so its CPU is not
   the client's; its own CPU per request is printed too: it must not be the bottleneck.
   `--load K` runs K busy processes meanwhile (a machine shared with other work).
2. Replay (`--replay N`): N requests answered once, then the same job again from the cache,
   against the cost of only rendering and hashing the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.prompts import parse_prompt  # noqa: E402
from factory.teacher import TeacherJob, TeacherOptions, Work  # noqa: E402
from factory.teacher.backends import (  # noqa: E402
    OpenAIBackend,
    _tls_context,
    reply_from_body,
)
from factory.teacher.request import Request, Sampling  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402

MODEL = "bench-model"
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
#: the one answer the bench server gives (a typical short chat completion)
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "A sturdy, well-reviewed item that does what it "
                                         "says, in one sentence."}}],
    "usage": {"prompt_tokens": 24, "completion_tokens": 16, "total_tokens": 40}}).encode()


# -- the server: fixed latency, as little CPU as possible -----------------------------------
class _Serve(asyncio.Protocol):
    """HTTP/1.1 keep-alive: every request answered with ANSWER after `latency` seconds."""

    latency = 0.0
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.loop.call_later(self.latency, self._answer)

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.head)


def serve(latency: float) -> None:
    async def main() -> None:
        _Serve.latency = latency
        server = await asyncio.get_running_loop().create_server(_Serve, "127.0.0.1", 0,
                                                                backlog=4096)
        print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
        await server.serve_forever()
    asyncio.run(main())


class Server:
    """The bench server in a subprocess, with its CPU time read from /proc."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(latency)],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()      # type: ignore[union-attr]

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# -- the clients: each sends n requests at concurrency c -----------------------------------
def works(n: int, tag: str) -> list[Work]:
    return [Work(id=f"{tag}-{i}", vars={"n": i, "title": f"{tag} title {i}"}) for i in range(n)]


def requests(n: int, tag: str) -> list[Request]:
    return [Request.build(MODEL, PROMPT.render(**w.vars), Sampling()) for w in works(n, tag)]


def factory_run(wh: Warehouse, url: str, items: list[Work], concurrency: int,
                cache_only: bool = False) -> object:
    opts = TeacherOptions(url=url, model=MODEL, concurrency=concurrency, cache_only=cache_only)
    with TeacherJob(wh, "bench", dataset=None, options=opts) as job:
        # the run record's own writes (start, finish) are per job, not per request: untimed
        global RUN_TIME
        cpu, wall = time.process_time(), time.perf_counter()
        report = job.run(items, prompt=PROMPT, parse=str, table="bench_answers",
                         row=lambda o: {"item": o.work.id, "answer": o.value})
        RUN_TIME = time.perf_counter() - wall, time.process_time() - cpu
        return report


async def _bounded(c: int, jobs: list, send: Callable) -> None:
    slots = asyncio.Semaphore(c)

    async def one(job: object) -> None:
        async with slots:
            await send(job)
    await asyncio.gather(*(one(j) for j in jobs))


def backend_alone(url: str, reqs: list[Request], c: int) -> None:
    async def go() -> None:
        backend = OpenAIBackend(url, MODEL, None, 120.0, c)
        await backend.start()                   # the clients are opened in the running loop
        await _bounded(c, reqs, backend.complete)
        await backend.aclose()
    asyncio.run(go())


def openai_client(url: str, reqs: list[Request], c: int) -> None:
    """The old transport: AsyncOpenAI.post() over ceil(c / 8) clients of 8 connections."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    async def go() -> None:
        backend = OpenAIBackend(url, MODEL, None, 120.0, c)     # for its payload() only
        clients = [AsyncOpenAI(base_url=url, api_key="no-key", max_retries=0, timeout=120.0,
                               http_client=DefaultAsyncHttpxClient(verify=_tls_context()))
                   for _ in range(-(-c // 8))]
        turn = iter(range(10**9))

        async def send(req: Request) -> None:
            client = clients[next(turn) % len(clients)]
            body = await client.post("/chat/completions", cast_to=str,
                                     body=backend.payload(req), options={"timeout": 120.0})
            reply_from_body(body, backend.secrets)
        await _bounded(c, reqs, send)
        for client in clients:
            await client.close()
    asyncio.run(go())


def bare_httpx(url: str, reqs: list[Request], c: int) -> None:
    import httpx2

    async def go() -> None:
        limits = httpx2.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
            async def send(req: Request) -> None:
                body = {"model": MODEL, "messages": req.message_dicts()}
                r = await client.post("/chat/completions", content=json.dumps(body),
                                      headers={"Content-Type": "application/json"})
                json.loads(r.content)["choices"][0]["message"]["content"]   # noqa: B018
            await _bounded(c, reqs, send)
    asyncio.run(go())


def bare_aiohttp() -> Callable[[str, list[Request], int], None] | None:
    try:
        import aiohttp
    except ImportError:
        return None

    def run(url: str, reqs: list[Request], c: int) -> None:
        async def go() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as s:
                async def send(req: Request) -> None:
                    body = {"model": MODEL, "messages": req.message_dicts()}
                    async with s.post(f"{url}/chat/completions", data=json.dumps(body),
                                      headers={"Content-Type": "application/json"}) as r:
                        json.loads(await r.read())["choices"][0]["message"]["content"]  # noqa: B018
                await _bounded(c, reqs, send)
        asyncio.run(go())
    return run


def curator_client() -> Callable[[str, list[Request], int], None] | None:
    try:
        from bespokelabs import curator
    except ImportError:
        return None

    def run(url: str, reqs: list[Request], c: int) -> None:
        llm = curator.LLM(model_name=MODEL, backend="openai", backend_params={
            "base_url": url, "api_key": "no-key", "max_concurrent_requests": c,
            "max_requests_per_minute": 10**9, "max_tokens_per_minute": 10**12,
            "require_all_responses": False}, generation_params={})
        llm([r.message_dicts()[-1]["content"] for r in reqs])
    return run


# -- the measurement -------------------------------------------------------------------------
#: (wall, CPU) of the last factory_run's job.run(), which measure() uses instead of its own
RUN_TIME: tuple[float, float] | None = None


def measure(server: Server, send: Callable[[], object]) -> tuple[float, float, float]:
    """(wall s, client CPU s, server CPU s) of send()."""
    global RUN_TIME
    RUN_TIME = None
    scpu, cpu, wall = server.cpu(), time.process_time(), time.perf_counter()
    send()
    wall, cpu = RUN_TIME or (time.perf_counter() - wall, time.process_time() - cpu)
    return wall, cpu, server.cpu() - scpu


def concurrency(args: argparse.Namespace, wh: Warehouse) -> None:
    server = Server(args.latency)
    clients: dict[str, Callable[[str, int, str], object]] = {
        "factory": lambda url, c, tag: factory_run(wh, url, works(c * args.rounds, tag), c),
        "backend": lambda url, c, tag: backend_alone(url, requests(c * args.rounds, tag), c),
        "openai client": lambda url, c, tag: openai_client(url, requests(c * args.rounds, tag),
                                                           c),
        "bare httpx2": lambda url, c, tag: bare_httpx(url, requests(c * args.rounds, tag), c),
    }
    missing = []
    for name, optional in (("bare aiohttp", bare_aiohttp()), ("curator", curator_client())):
        if optional is not None:
            clients[name] = (lambda url, c, tag, f=optional:
                             f(url, requests(c * args.rounds, tag), c))
        else:
            missing.append(name)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.load)]
    if args.clients:
        clients = {k: v for k, v in clients.items() if k in args.clients}
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        factory_run(wh, server.url, works(8, "warm-up"), 8)      # imports, first connections
        for rep in range(args.repeats):                          # interleaved repeats
            for c in args.concurrency:
                for name, client in clients.items():
                    tag = f"{name}-{c}-{rep}"
                    results.setdefault((name, c), []).append(measure(
                        server, lambda f=client, c=c, t=tag: f(server.url, c, t)))
    finally:
        server.close()
        for proc in load:
            proc.kill()
            proc.wait()
    print(f"# server latency {args.latency * 1000:.0f} ms, {args.rounds} requests per slot, "
          f"medians of {args.repeats} interleaved repeats; CPU = client process CPU / request; "
          f"{args.load} busy processes beside; {os.cpu_count()} CPUs")
    bares = [b for b in ("bare aiohttp", "bare httpx2") if b in clients]
    print("| C | client | req/s | % of C/latency bound | "
          + " | ".join(f"% of {b}" for b in bares) + " | client CPU ms/req | server CPU ms/req |")
    print("| --- " * (6 + len(bares)) + "|")
    for c in args.concurrency:
        n, bound = c * args.rounds, c / args.latency
        bare = {b: n / statistics.median(w for w, _, _ in results[(b, c)]) for b in bares}
        for name in clients:
            runs = results[(name, c)]
            rate = n / statistics.median(w for w, _, _ in runs)
            cpu = statistics.median(u for _, u, _ in runs) / n * 1000
            scpu = statistics.median(s for _, _, s in runs) / n * 1000
            print(f"| {c} | {name} | {rate:,.0f} | {rate / bound:.0%} | "
                  + " | ".join(f"{rate / bare[b]:.0%}" for b in bares)
                  + f" | {cpu:.2f} | {scpu:.2f} |")
    for name in missing:
        print(f"{name}: not installed")


def replay(args: argparse.Namespace, wh: Warehouse) -> None:
    server = Server(0.0)
    try:
        items = works(args.replay, "replay")
        wall, cpu, _ = measure(server, lambda: factory_run(wh, server.url, items, 64))
        print(f"# replay of {args.replay:,} cached requests")
        print(f"first pass (sent, no server latency): {wall:6.2f} s "
              f"({args.replay / wall:,.0f} req/s, client CPU/request {cpu / args.replay * 1000:.2f}"
              " ms)")
        job = TeacherJob(wh, "bench", dataset=None, options=TeacherOptions(
            url=server.url, model=MODEL))              # not entered: records no run
        base = time.perf_counter()
        keys = [job.request(PROMPT, w).key for w in items]
        render = time.perf_counter() - base
        assert len(set(keys)) == args.replay
        for cache_only in (False, True):
            base = time.perf_counter()
            report = factory_run(wh, server.url, items, 64, cache_only=cache_only)
            wall = time.perf_counter() - base
            assert report.cached == args.replay and report.requests == 0, report
            label = "replay --cache-only" if cache_only else "replay"
            print(f"{label:<20}: {wall:6.2f} s ({args.replay / wall:,.0f} items/s); "
                  f"{wall / render:5.1f}x the time to render and hash them ({render:.2f} s)")
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=8, help="requests = C x rounds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--replay", type=int, default=0, help="also time a cache replay")
    parser.add_argument("--load", type=int, default=0,
                        help="busy processes running beside the clients")
    parser.add_argument("--clients", nargs="+", help="only these clients (names as printed)")
    parser.add_argument("--serve", type=float, metavar="LATENCY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    wh = Warehouse(tmp / "bench.duckdb")
    with wh.write() as con:
        con.execute(TABLE)
    if args.concurrency:
        concurrency(args, wh)
    if args.replay:
        replay(args, wh)


if __name__ == "__main__":
    main()
