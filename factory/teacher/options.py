"""The options every teacher job shares, defined once.

A job command adds all of them with one decorator and receives a `TeacherOptions`::

    @app.command("describe-items")
    @teacher_options
    def describe_items(dataset: str = typer.Option(...), *, teacher: TeacherOptions) -> None:
        ...

The API key is deliberately not an option: it comes from FACTORY_TEACHER_API_KEY or
OPENAI_API_KEY only (see factory.teacher.keys).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import typer

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from factory.errors import FactoryError
from factory.teacher.keys import safe_url
from factory.teacher.request import Sampling


class BackendName(str, Enum):
    openai = "openai"
    transformers = "transformers"
    vllm = "vllm"


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"


class ModeName(str, Enum):
    online = "online"
    batch = "batch"


_argv: list[str] | None = None


def record_argv(args: list[str]) -> None:
    """Called by the root command group with this invocation's raw arguments."""
    global _argv
    _argv = list(args)


def recorded_argv() -> list[str] | None:
    """The raw arguments of the command being run (after the program name): an executor
    re-runs exactly that command on each shard."""
    return None if _argv is None else list(_argv)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/N' with 0 <= i < N (Slurm array task ids start at 0)."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise FactoryError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 3/16")
    return i, n


@dataclass(frozen=True)
class TeacherOptions:
    url: str | None = None
    model: str | None = None
    backend: str | None = None              # None: openai when a URL is set, else transformers
    concurrency: int | None = None          # None: the backend's default
    rpm: int | None = None
    tpm: int | None = None
    timeout: float = 120.0                  # seconds per HTTP attempt, before its tokens
    min_tokens_per_s: float = 5.0           # ... plus max_tokens at this decode rate
    stall_timeout: float | None = None      # no answer at all for this long: stop
    attempts: int = 6                       # HTTP attempts per request, retries included
    backoff: float = 0.5                    # first retry waits up to this long (doubling)
    parse_retries: int = 2                  # extra draws when the parser rejects an answer
    n_per_request: int = 1                  # samples of one setup asked in one request (`n`)
    structured: bool | None = None          # None: on for the embedded model, else off
    sampling: Sampling = field(default_factory=Sampling)   # the user's overrides
    price_table: Path | None = None
    dry_run: bool = False
    max_cost: float | None = None
    cache_only: bool = False
    refresh: bool = False
    limit: int | None = None
    shard: tuple[int, int] | None = None
    # executor: where the job runs (not work parameters, so not in as_params)
    executor: str = "local"
    shards: int | None = None               # --executor ray: how many shards
    ray_address: str | None = None          # None: RAY_ADDRESS, else a local ray.init()
    ray_gpus_per_shard: float = 0.0
    #: vLLM engine arguments (offline backend): --vllm-args FILE, then --vllm-arg key=value
    vllm_args: dict[str, Any] = field(default_factory=dict)
    #: online: one request per call; batch: the provider's batch API (factory.teacher.batch)
    mode: str = "online"
    batch_file: Path | None = None          # batch: write the input file instead of uploading
    import_batch: Path | None = None        # batch: read a results file into the cache first
    poll_s: float = 30.0                    # batch: seconds between polls of a batch
    abandon_batches: bool = False           # give up this job's pending batches first

    def __post_init__(self) -> None:
        if self.cache_only and self.refresh:
            raise FactoryError("--cache-only and --refresh contradict each other")
        self._check_executor()
        self._check_mode()
        if self.backend is not None and self.backend not in {b.value for b in BackendName}:
            raise FactoryError(f"unknown backend {self.backend!r}")
        if self.backend == "openai" and not self.url and not self.batch_offline:
            raise FactoryError("--backend openai needs --teacher-url (or FACTORY_TEACHER_URL)")
        if self.n_per_request < 1:
            raise FactoryError(f"--n-per-request {self.n_per_request}: needs at least 1")

    def _check_executor(self) -> None:
        if self.executor not in {e.value for e in ExecutorName}:
            raise FactoryError(f"unknown executor {self.executor!r}")
        if self.executor == "local":
            if self.shards is not None:
                raise FactoryError("--shards needs --executor ray (one process runs one shard "
                                   "with --shard i/N)")
            return
        if self.shards is None:
            raise FactoryError("--executor ray needs --shards N")
        if self.shards < 1:
            raise FactoryError(f"--shards {self.shards}: needs at least 1 shard")
        if self.shard is not None:
            raise FactoryError("--executor ray runs every shard itself: drop --shard i/N")
        if self.dry_run:
            raise FactoryError("--dry-run with --executor ray: run the dry run without "
                               "--executor (it sends nothing and reads the same cache)")
        if self.ray_gpus_per_shard < 0:
            raise FactoryError("--ray-gpus-per-shard cannot be negative")

    def _check_mode(self) -> None:
        if self.mode not in {m.value for m in ModeName}:
            raise FactoryError(f"unknown mode {self.mode!r}")
        if self.mode == "batch" and self.n_per_request > 1:
            raise FactoryError("--n-per-request asks several samples in one online request; "
                               "a batch line asks one sample: drop one of the two")
        files = self.batch_file is not None or self.import_batch is not None
        if files and self.mode != "batch":
            raise FactoryError("--batch-file and --import-batch belong to --mode batch")
        if self.mode != "batch":
            return
        if self.executor != "local":
            raise FactoryError("--mode batch with --executor ray: run one batch per process "
                               "with --shard i/N instead")
        if self.dry_run and self.import_batch is not None:
            raise FactoryError("--dry-run imports nothing: drop --import-batch")
        if self.backend_name != "openai":
            raise FactoryError(
                f"--mode batch sends OpenAI-compatible requests, not --backend "
                f"{self.backend_name}: give --teacher-url for a provider's batch API, or "
                "--batch-file PATH (with --teacher-model) to run the file with vLLM's run_batch")
        if self.poll_s <= 0:
            raise FactoryError("--poll-s must be positive")

    @property
    def batch_offline(self) -> bool:
        """Batch files only: nothing is uploaded, so no --teacher-url is needed."""
        return self.mode == "batch" and (self.batch_file is not None or
                                         self.import_batch is not None)

    @property
    def backend_name(self) -> str:
        return self.backend or ("openai" if self.url or self.batch_offline else "transformers")

    def attempt_timeout(self, max_tokens: int | None) -> float:
        """Seconds one HTTP attempt may take: a long generation is slow, not stuck, so the
        budget grows with the tokens asked for (8,192 tokens at 5/s: 120 + 1,638 s)."""
        return self.timeout + (max_tokens or 0) / self.min_tokens_per_s

    def with_(self, **changes: Any) -> TeacherOptions:
        return replace(self, **changes)

    def as_params(self) -> dict[str, Any]:
        """What job_runs.params records: everything but secrets (URL credentials stripped)."""
        params = asdict(self)
        params["url"] = safe_url(self.url)
        params["backend"] = self.backend_name
        params["sampling"] = self.sampling.as_dict()
        params["price_table"] = str(self.price_table) if self.price_table else None
        for name in ("batch_file", "import_batch"):
            params[name] = str(getattr(self, name)) if getattr(self, name) else None
        params["shard"] = f"{self.shard[0]}/{self.shard[1]}" if self.shard else None
        for name in EXECUTOR_FIELDS:        # how it ran, not what: rows match a local run
            params.pop(name)
        return params


#: TeacherOptions fields that choose where a job runs, never what it computes
EXECUTOR_FIELDS = ("executor", "shards", "ray_address", "ray_gpus_per_shard")


# (parameter name, annotation, typer option); the order is the order shown in --help
_OPTIONS: list[tuple[str, Any, Any]] = [
    ("teacher_url", str, typer.Option(
        None, "--teacher-url", envvar="FACTORY_TEACHER_URL",
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 [default: none: the "
             "embedded SmolLM2 runs in-process]. Key from FACTORY_TEACHER_API_KEY or "
             "OPENAI_API_KEY.")),
    ("teacher_model", str, typer.Option(
        None, "--teacher-model", envvar="FACTORY_TEACHER_MODEL",
        help="Model id (remote), or a local model dir / .gguf file (transformers, vllm).")),
    ("backend", BackendName, typer.Option(
        None, "--backend", help="[default: openai with a URL, else transformers]")),
    ("concurrency", int, typer.Option(
        None, "--concurrency", min=1, max=4096, help="Requests in flight (remote) or batch "
        "size (in-process), at most 4096 [default: 16 / 8 / 256 for openai / transformers / "
        "vllm].")),
    ("rpm", int, typer.Option(None, "--rpm", min=1, help="Requests per minute limit.")),
    ("tpm", int, typer.Option(None, "--tpm", min=1, help="Tokens per minute limit.")),
    ("timeout", float, typer.Option(120.0, "--timeout", min=0.01,
                                    help="Seconds per HTTP attempt before its tokens: an "
                                    "attempt may take --timeout + max_tokens / "
                                    "--min-tokens-per-s, the whole answer included.")),
    ("min_tokens_per_s", float, typer.Option(
        5.0, "--min-tokens-per-s", min=0.001, help="Slowest decode rate per request before "
        "an attempt is given up (a timed-out attempt is retried once, not --attempts times).")),
    ("stall_timeout", float, typer.Option(
        None, "--stall-timeout", min=0.01, help="Stop cleanly when no answer arrives for this "
        "many seconds while requests are in flight [default: the longest attempt + 4 x "
        "--timeout].")),
    ("attempts", int, typer.Option(6, "--attempts", min=1, help="HTTP attempts per request "
                                   "(retries on 408/409/429/5xx, timeouts, dropped "
                                   "connections).")),
    ("temperature", float, typer.Option(None, "--temperature", min=0.0,
                                        help="[default: the job's]")),
    ("top_p", float, typer.Option(None, "--top-p", min=0.0, max=1.0,
                                  help="[default: the job's]")),
    ("max_tokens", int, typer.Option(None, "--max-tokens", min=1,
                                     help="[default: the job's]")),
    ("seed", int, typer.Option(None, "--seed", help="Sampling seed sent to the backend.")),
    ("n_per_request", int, typer.Option(
        1, "--n-per-request", min=1, max=128, help="Ask up to K samples of the same prompt "
        "(a job's samples per item) in one request (`n`): the prompt is paid once. Each "
        "sample is cached as if asked alone.")),
    ("logprobs", int, typer.Option(
        None, "--logprobs", min=0, max=20, help="Store each answer token's logprob and its K "
        "most likely alternatives (llm_calls.logprobs); part of the request.")),
    ("structured", bool | None, typer.Option(
        None, "--structured/--no-structured", help="Ask for the JSON answer shape the prompt "
        "declares (prompts/<name>.answer.json): response_format, vLLM structured outputs, "
        "constrained decoding in-process [default: on for the embedded model, else off]")),
    ("price_table", Path, typer.Option(
        None, "--price-table", envvar="FACTORY_PRICE_TABLE",
        help="TOML price table (version + USD per million tokens per model).")),
    ("dry_run", bool, typer.Option(False, "--dry-run", help="Print requests to send, cache "
                                   "hits, estimated tokens and cost; send nothing.")),
    ("max_cost", float, typer.Option(None, "--max-cost", min=0.0, help="Stop cleanly before "
                                     "new spending would exceed this many USD.")),
    ("cache_only", bool, typer.Option(False, "--cache-only", help="Replay cached answers; "
                                      "fail if any request is not cached.")),
    ("refresh", bool, typer.Option(False, "--refresh", help="Send every request again, even "
                                   "when cached (a success still replaces the cache row).")),
    ("limit", int, typer.Option(None, "--limit", min=1, help="Only the first N work items "
                                "(after --shard).")),
    ("shard", str, typer.Option(None, "--shard", help="i/N: only the work whose request hash "
                                "falls in shard i of N (0-based).")),
    ("executor", ExecutorName, typer.Option(
        ExecutorName.local, "--executor", help="local: this process; ray: --shards N shard "
        "files, one Ray task each (the same command with --shard i/N), then merged.")),
    ("shards", int, typer.Option(None, "--shards", help="--executor ray: number of shards.")),
    ("ray_address", str, typer.Option(
        None, "--ray-address", envvar="RAY_ADDRESS", help="Ray cluster to use [default: a "
        "local ray.init()]. Shard files must be on a filesystem its workers share.")),
    ("ray_gpus_per_shard", float, typer.Option(
        0.0, "--ray-gpus-per-shard", help="GPUs Ray reserves for each shard's task (e.g. 1 "
        "with --backend vllm).")),
    ("vllm_arg", list[str], typer.Option(
        None, "--vllm-arg", help="key=value: a vLLM engine argument for --backend vllm "
        "(repeatable; the value is JSON when it parses, else a string), e.g. "
        "gpu_memory_utilization=0.5 [default: tensor_parallel_size = visible GPUs; on a CPU "
        "build a memory share that fits]")),
    ("vllm_args", Path, typer.Option(
        None, "--vllm-args", help="TOML or JSON file of vLLM engine arguments; --vllm-arg "
        "overrides its keys.")),
    ("mode", ModeName, typer.Option(
        ModeName.online, "--mode", help="online: one HTTP request per call; batch: the "
        "provider's batch API (files + batches endpoints; cheaper, slower): submitted, polled "
        "(a re-run resumes polling), imported into the same cache.")),
    ("batch_file", Path, typer.Option(
        None, "--batch-file", help="Batch mode: write the OpenAI batch input file (JSONL) for "
        "`vllm run_batch` instead of uploading it; implies --mode batch.")),
    ("import_batch", Path, typer.Option(
        None, "--import-batch", help="Batch mode: import a batch output file (JSONL) of a "
        "--batch-file run into the cache, then run the job; implies --mode batch.")),
    ("poll_s", float, typer.Option(
        30.0, "--poll-s", min=0.001, help="Batch mode: seconds between polls of a batch.")),
    ("abandon_batches", bool, typer.Option(
        False, "--abandon-batches", help="Give up the job's batches submitted and not yet "
        "imported (status 'abandoned'): their requests are sent again, and paid again.")),
]


def options_from_cli(values: dict[str, Any]) -> TeacherOptions:
    backend = values["backend"]
    return TeacherOptions(
        url=values["teacher_url"] or None, model=values["teacher_model"] or None,
        backend=backend.value if backend is not None else None,
        concurrency=values["concurrency"], rpm=values["rpm"], tpm=values["tpm"],
        timeout=values["timeout"], min_tokens_per_s=values["min_tokens_per_s"],
        stall_timeout=values["stall_timeout"],
        attempts=values["attempts"], n_per_request=values["n_per_request"],
        structured=values["structured"],
        sampling=Sampling(values["temperature"], values["top_p"], values["max_tokens"],
                          values["seed"], values["logprobs"]),
        price_table=values["price_table"], dry_run=values["dry_run"],
        max_cost=values["max_cost"], cache_only=values["cache_only"],
        refresh=values["refresh"], limit=values["limit"], shard=parse_shard(values["shard"]),
        executor=values["executor"].value if values["executor"] is not None else "local",
        shards=values["shards"], ray_address=values["ray_address"] or None,
        ray_gpus_per_shard=values["ray_gpus_per_shard"],
        vllm_args=parse_vllm_args(values.get("vllm_arg"), values.get("vllm_args")),
        mode="batch" if values["batch_file"] or values["import_batch"] else values["mode"].value,
        batch_file=values["batch_file"], import_batch=values["import_batch"],
        poll_s=values["poll_s"], abandon_batches=values["abandon_batches"],
    )


def _vllm_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_vllm_args(pairs: list[str] | None, file: Path | None) -> dict[str, Any]:
    """Engine arguments from a TOML/JSON file, then `key=value` pairs on top of it.

    Values are JSON when they parse (`0.5`, `true`, `{"a": 1}`), else the string as given,
    so `dtype=bfloat16` needs no quoting. Which keys vLLM accepts is checked when the engine
    is built (vLLM may not be installed where the options are parsed).
    """
    args: dict[str, Any] = {}
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise FactoryError(f"--vllm-args {file}: {exc.strerror or exc}") from None
        try:
            json_file = file.suffix.lower() == ".json"
            loaded = json.loads(text) if json_file else tomllib.loads(text)
        except ValueError as exc:      # JSONDecodeError and TOMLDecodeError are ValueErrors
            kind = "JSON" if file.suffix.lower() == ".json" else "TOML"
            raise FactoryError(f"--vllm-args {file}: not valid {kind} "
                               f"({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise FactoryError(f"--vllm-args {file}: expected a table of engine arguments")
        args.update(loaded)
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FactoryError(f"--vllm-arg {pair!r}: expected key=value, e.g. "
                               "gpu_memory_utilization=0.5")
        args[key] = _vllm_value(value.strip())
    return {k.replace("-", "_"): v for k, v in args.items()}


def teacher_options(func: Callable[..., Any] | None = None, *,
                    only: tuple[str, ...] | None = None) -> Any:
    """Decorator: add the shared teacher options to a Typer command.

    The command declares a keyword parameter `teacher: TeacherOptions`; the decorator replaces
    it, in the signature Typer reads, by the options, and passes the assembled TeacherOptions.
    `only` restricts the options shown (e.g. `teacher check` has no --limit).
    """
    if func is None:
        return lambda f: teacher_options(f, only=only)
    chosen = [o for o in _OPTIONS if only is None or o[0] in only]
    sig = inspect.signature(func, eval_str=True)
    if "teacher" not in sig.parameters:
        raise TypeError(f"{func.__name__} needs a `teacher: TeacherOptions` keyword parameter")
    kept = [p for p in sig.parameters.values() if p.name != "teacher"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, ann, opt in chosen]
    defaults = {name: opt.default for name, _, opt in _OPTIONS}

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = dict(defaults)
        values.update({name: kwargs.pop(name) for name, _, _ in chosen})
        teacher = options_from_cli(values)
        if teacher.executor == "ray":       # the driver: shards re-run this very command
            from factory.teacher.ray_executor import run_sharded

            return run_sharded(teacher)
        kwargs["teacher"] = teacher
        return func(*args, **kwargs)

    params = sorted(kept + added, key=lambda p: p.kind)    # keyword-only after the others
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
