"""A stand-in for the `vllm` package, for the tests that run without vLLM: it records what
the backend builds the engine with and what it generates from, and answers from a callback.
The real engine is exercised by tests/test_vllm.py's real-vLLM tests where vLLM exists."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class EngineArgs:  # a few of vLLM's fields; the backend reads the names only
    model: str = ""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.92
    max_model_len: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    dtype: str = "auto"


@dataclasses.dataclass
class StructuredOutputsParams:  # vLLM >= 0.10.2 (SamplingParams(structured_outputs=...))
    json: Any = None
    regex: str | None = None
    disable_any_whitespace: bool = False


@dataclasses.dataclass
class GuidedDecodingParams:  # vLLM < 0.12 (SamplingParams(guided_decoding=...))
    json: Any = None
    regex: str | None = None


class Recorder:
    def __init__(self, tokenizer: Any, answer: Callable[[list[int]], str], cpu: bool):
        self.tokenizer, self.answer, self.cpu = tokenizer, answer, cpu
        self.engines: list[dict[str, Any]] = []
        self.prompts: list[Any] = []
        self.sampling: list[Any] = []           # the SamplingParams of each prompt
        self.lora_requests: list[Any] = []
        self.shutdowns = 0


def _output(text: str, top: int | None) -> Any:
    """One CompletionOutput: tokens of 4 characters; with `top`, vLLM's per-token logprobs
    ({token id: Logprob}: the drawn token, rank 1, and top - 1 alternatives)."""
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    ids = list(range(len(pieces)))
    logprobs = None
    if top is not None:
        logprobs = [{tid: types.SimpleNamespace(logprob=-0.1 * (tid + 1), rank=1,
                                                decoded_token=piece),
                     **{1000 + r: types.SimpleNamespace(logprob=-2.0 - r, rank=r + 2,
                                                        decoded_token=f"<alt{r}>")
                        for r in range(max(0, top - 1))}}
                    for tid, piece in zip(ids, pieces, strict=True)]
    return types.SimpleNamespace(text=text, token_ids=ids, finish_reason="stop",
                                 logprobs=logprobs)


def install(modules: dict[str, Any], tokenizer: Any, answer: Callable[[list[int]], str],
            cpu: bool = False, guided_decoding: bool = False) -> Recorder:
    """Put a fake `vllm` into `modules` (sys.modules, or monkeypatch's view of it);
    `guided_decoding`: an older vLLM, whose structured outputs are GuidedDecodingParams."""
    rec = Recorder(tokenizer, answer, cpu)

    class Core:
        def shutdown(self) -> None:
            rec.shutdowns += 1
            marker = os.environ.get("VLLM_STUB_SHUTDOWN_MARKER")
            if marker:
                with open(marker, "a", encoding="utf-8") as f:
                    f.write("shutdown\n")

    class LLM:
        def __init__(self, model: str, **kwargs: Any) -> None:
            rec.engines.append({"model": model, **kwargs})
            self.llm_engine = types.SimpleNamespace(engine_core=Core())

        def get_tokenizer(self) -> Any:
            return rec.tokenizer

        def generate(self, prompts: list[Any], sampling: list[Any], use_tqdm: bool = True,
                     lora_request: Any = None) -> list[Any]:
            rec.prompts.extend(prompts)
            rec.sampling.extend(sampling)
            rec.lora_requests.append(lora_request)
            outs = []
            for p, params in zip(prompts, sampling, strict=True):
                ids = p["prompt_token_ids"]
                # n choices (SamplingParams.n), each its own text; logprobs when asked
                choices = [_output(rec.answer(ids) + (f" (choice {i})" if i else ""),
                                   getattr(params, "logprobs", None))
                           for i in range(getattr(params, "n", 1) or 1)]
                outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=choices))
            return outs

    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        modules[name] = mod
        return mod

    module("vllm", LLM=LLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw),
           __path__=[])
    module("vllm.sampling_params", **(
        {"GuidedDecodingParams": GuidedDecodingParams} if guided_decoding
        else {"StructuredOutputsParams": StructuredOutputsParams}))
    module("vllm.lora", __path__=[])
    module("vllm.lora.request", LoRARequest=lambda name, id_, path: (name, id_, path))
    module("vllm.engine", __path__=[])
    module("vllm.engine.arg_utils", EngineArgs=EngineArgs)
    module("vllm.platforms", current_platform=types.SimpleNamespace(is_cpu=lambda: rec.cpu))
    module("vllm.distributed", __path__=[])
    module("vllm.distributed.parallel_state", destroy_model_parallel=lambda: None,
           destroy_distributed_environment=lambda: None)
    return rec


def install_here(**kwargs: Any) -> Recorder:
    return install(sys.modules, **kwargs)  # type: ignore[arg-type]
