"""In-process backends for a distilled student: its base model with its LoRA adapter.

They are the teacher platform's transformers and vLLM backends with a different loader, so
`distill generate` gets the same batching, cache, provenance, resume and sharding as every
teacher job. The backend's model id is the student's registry `model_id`, which is what the
request cache keys on: answers of one student are never mistaken for another's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.errors import FactoryError
from factory.student import Base, load_model, load_tokenizer
from factory.teacher.backends import TransformersBackend, VLLMBackend
from train.format import sha256_file


def _adapter(record: dict[str, Any]) -> Path:
    """The adapter directory, checked against the checksum the registry holds."""
    adapter = Path(record["adapter_dir"])
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FactoryError(f"student {record['run_id']}: its adapter is gone ({weights})")
    if sha256_file(weights) != record["adapter_sha256"]:
        raise FactoryError(f"student {record['run_id']}: {weights} changed since training "
                           "(checksum differs from the registry)")
    return adapter


class StudentTransformersBackend(TransformersBackend):
    """transformers + peft: the base model with the adapter merged in, batched generation."""

    def __init__(self, record: dict[str, Any], batch_size: int | None = None):
        super().__init__(record["model_id"], batch_size)
        self.record = record

    def describe(self) -> str:
        return f"transformers student {self.record['run_id']} ({self.record['base']} + LoRA)"

    def _load(self) -> None:
        import torch
        from peft import PeftModel

        adapter = _adapter(self.record)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = Base(self.record["base"], self.record["base_location"], self.record["base_gguf"])
        # the tokenizer saved beside the adapter: the same one, without parsing the GGUF again
        tokenizer = load_tokenizer(Base(self.record["base"], str(adapter)))
        model = load_model(base, device)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        tokenizer.padding_side = "left"
        self._tokenizer, self._model = tokenizer, model


#: the largest LoRA rank vLLM accepts (its max_lora_rank: 1, 8, 16, ..., 256, 320, 512)
MAX_LORA_RANK = 512


def refuse_gguf_student(record: dict[str, Any]) -> None:
    """A vLLM engine or server cannot put an adapter on a GGUF base: one line that says how
    to get a base it can load."""
    if record.get("base_gguf"):
        raise FactoryError(
            f"student {record['run_id']}: vLLM cannot load its GGUF base {record['base']!r}; "
            f"export it with `factory models export-hf {record['base']} DIR`, train the "
            "student with --base DIR, or use --backend transformers")


class StudentVLLMBackend(VLLMBackend):
    """Offline vLLM with LoRA enabled; the base must be a model directory or name."""

    def __init__(self, record: dict[str, Any], batch_size: int | None = None,
                 engine_args: dict[str, Any] | None = None):
        refuse_gguf_student(record)
        super().__init__(record["model_id"], batch_size, engine_args)
        self.record = record

    def describe(self) -> str:
        return f"vllm student {self.record['run_id']} ({self.record['base']} + LoRA)"

    def _engine_location(self) -> str:
        return self.record["base_location"]

    def _fixed_args(self) -> dict[str, Any]:
        rank = int(self.record["lora"]["r"])
        if rank > MAX_LORA_RANK:
            raise FactoryError(f"student {self.record['run_id']}: LoRA rank {rank} is above "
                               f"vLLM's maximum {MAX_LORA_RANK}; use --backend transformers")
        # vLLM takes powers of two from 8 up; the smallest that holds the adapter
        return {"enable_lora": True, "max_lora_rank": 1 << max(3, (rank - 1).bit_length())}

    def _load(self) -> None:
        adapter = _adapter(self.record)
        super()._load()
        from vllm.lora.request import LoRARequest

        self._lora = LoRARequest(self.record["model_id"], 1, str(adapter))
