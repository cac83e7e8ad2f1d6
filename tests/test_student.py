"""`distill student`: LoRA SFT of the embedded SmolLM2 on teacher chains (a few steps on CPU),
the model registry, and the student writing chains with the transformers backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distill_fixtures import ChainTeacher, error_of, fake_student, ok

from factory.errors import FactoryError
from factory.student import IGNORE, encode_pairs, resolve_base
from factory.student_backends import _adapter
from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse


class CharTokenizer:
    """A character-level stand-in with a ChatML-like template, to check the masking."""

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_prompt_tokens_are_masked_and_long_examples_left_out() -> None:
    tok = CharTokenizer()
    pairs = [([{"role": "user", "content": "hi"}], "chain"),
             ([{"role": "user", "content": "x" * 50}], "chain")]
    examples, too_long = encode_pairs(tok, pairs, max_length=40)
    assert too_long == 1 and len(examples) == 1
    ex = examples[0]
    prompt = "<user>hi</><assistant>"
    assert ex.input_ids == [ord(c) for c in prompt + "chain</>"]
    assert ex.labels == [IGNORE] * len(prompt) + [ord(c) for c in "chain</>"]


def test_base_models_resolve_offline(tmp_path: Path) -> None:
    smol = resolve_base("smollm2")
    assert smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(smol.location) / smol.gguf_file).is_file()
    with pytest.raises(FactoryError, match="no such GGUF file"):
        resolve_base(str(tmp_path / "m.gguf"))
    with pytest.raises(FactoryError, match="needs config.json"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base(str(tmp_path)).location == str(tmp_path.resolve())


def test_adapter_must_match_the_registry(ml100k: Warehouse, tmp_path: Path) -> None:
    with ml100k.write() as con:
        fake_student(con, "distill-student-a", "", tmp_path / "a")
        record = dict(zip(["run_id", "adapter_dir", "adapter_sha256"], con.execute(
            "select run_id, adapter_dir, adapter_sha256 from student_models").fetchone(),
            strict=True))
    assert _adapter(record) == tmp_path / "a"
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"retrained elsewhere")
    with pytest.raises(FactoryError, match="changed since training"):
        _adapter(record)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FactoryError, match="its adapter is gone"):
        _adapter(record)


def test_student_without_teacher_chains(ml100k: Warehouse) -> None:
    assert "no finished distill teach run for dataset 'ml-100k': run `factory distill teach" \
        " --dataset ml-100k` first" in error_of(
        ml100k.path, "distill", "student", "--dataset", "ml-100k")


@pytest.fixture()
def one_thread():
    """One torch thread: on a CPU shared with other work, two OpenMP threads spin against
    each other (a training step measured 27 s with two threads, 4 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_lora_student_trains_registers_and_generates(ml100k: Warehouse, one_thread) -> None:
    wh = ml100k.path
    with OpenAIServer(ChainTeacher()) as server:
        ok(wh, "distill", "teach", "--dataset", "ml-100k", "--template", "three-step",
           "--teacher-url", server.url, "--teacher-model", "t", "--limit", "3",
           "--max-history", "3")
    # a base model that is neither shipped nor in the local cache: a failed run, recorded
    assert "cannot load the tokenizer of 'no-such/model' offline" in error_of(
        wh, "distill", "student", "--dataset", "ml-100k", "--base", "no-such/model")
    with ml100k.read() as con:
        failed = con.execute("select run_id, status from job_runs where job ="
                             " 'distill-student'").fetchone()
    assert failed[1] == "failed"
    assert f"distill student run {failed[0]} failed: cannot load the tokenizer" in error_of(
        wh, "distill", "generate", "--dataset", "ml-100k", "--student", failed[0])

    ok(wh, "distill", "student", "--dataset", "ml-100k", "--max-steps", "2", "--batch-size",
       "1", "--lora-r", "4", "--max-length", "512", "--device", "cpu")
    with ml100k.read() as con:
        cur = con.execute("select * from student_models")
        rec = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
        status = con.execute("select status from job_runs where run_id = ?",
                             [rec["run_id"]]).fetchone()[0]
    assert status == "succeeded"
    assert (rec["base"], rec["base_gguf"], rec["template"], rec["max_history"]) == (
        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "three-step", 3)
    assert (rec["n_chains"], rec["n_train"] + rec["n_too_long"], rec["steps"]) == (3, 3, 2)
    assert len(rec["loss_curve"]) == 2 and all(0 < x < 20 for x in rec["loss_curve"])
    assert json.loads(rec["lora"])["r"] == 4 and json.loads(rec["training"])["max_steps"] == 2
    adapter = Path(rec["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert Path(rec["loss_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((adapter.parent / "student.json").read_text())
    assert saved["adapter_sha256"] == rec["adapter_sha256"]
    assert json.loads((adapter.parent / "loss.json").read_text()) == rec["loss_curve"]

    # the student (base + adapter, in-process) writes a chain; 8 tokens cannot hold three
    # steps, so the chain is truncated and the reason names the budget; never re-drawn
    ok(wh, "distill", "generate", "--dataset", "ml-100k", "--student", rec["run_id"],
       "--splits", "test", "--limit", "1", "--max-tokens", "8")
    with ml100k.read() as con:
        row = con.execute("select c.part, c.verdict, c.reason, c.backend, c.model, c.draws,"
                          " l.output_tokens from chains c join llm_calls l on l.key = c.call_key"
                          " where c.source = 'student'").fetchone()
    assert row[0:2] == ("test", "truncated") and "max_tokens=8; raise --max-tokens" in row[2]
    assert row[3:] == ("transformers", rec["model_id"], 1, 8)


def test_answer_loss_is_the_models_loss_without_full_logits(monkeypatch) -> None:
    """The chunked answer-only loss equals transformers' own (mean over the answer tokens),
    in value and gradient, while no logits tensor larger than a chunk is ever built."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from factory import student as sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    ids = torch.randint(1, 97, (3, 20))
    labels = ids.clone()
    labels[:, :8] = sft.IGNORE                      # the prompt
    labels[2, 15:] = sft.IGNORE                     # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    expected = model(**batch).loss
    expected.backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr(sft, "LOSS_CHUNK", 7)       # several chunks, the last one short
    widest: list[int] = []
    head = model.lm_head
    monkeypatch.setattr(model, "lm_head", torch.nn.Module())
    model.lm_head.forward = lambda h: (widest.append(h.shape[0]), head(h))[1]
    got = sft.answer_loss(model, batch)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight.grad, grad, atol=1e-6)
    assert max(widest) == 7
