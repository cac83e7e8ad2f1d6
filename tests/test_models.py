"""`factory models export-hf`: the embedded GGUF as a transformers folder that generates
exactly what the GGUF does, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from distill_fixtures import error_of, ok

from factory.teacher.backends import EMBEDDED_GGUF, EMBEDDED_MODEL, embedded_model_dir


def test_bad_sources_and_targets_are_one_line(tmp_path: Path) -> None:
    wh = tmp_path / "wh.duckdb"
    assert "expected smollm2 or a .gguf file" in error_of(
        wh, "models", "export-hf", "llama", str(tmp_path / "out"))
    assert "no such GGUF file" in error_of(
        wh, "models", "export-hf", str(tmp_path / "m.gguf"), str(tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "exists and is not empty (--force replaces it)" in error_of(
        wh, "models", "export-hf", "smollm2", str(tmp_path / "full"))
    assert "--dtype 'int3'" in error_of(
        wh, "models", "export-hf", "smollm2", str(tmp_path / "out"), "--dtype", "int3")


@pytest.mark.slow
def test_export_generates_what_the_gguf_generates(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.teacher.backends import _load_transformers, chat_prompt_ids

    out = tmp_path / "smollm2-hf"
    # by path too: the same file the `smollm2` name resolves to
    ok(tmp_path / "wh.duckdb", "models", "export-hf",
       str(embedded_model_dir() / EMBEDDED_GGUF), str(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tok.chat_template and "quantization_config" not in model.config.to_dict()
    gguf_tok, gguf_model = _load_transformers(EMBEDDED_MODEL, str(embedded_model_dir()),
                                              EMBEDDED_GGUF)
    messages = [{"role": "user", "content": "Name one movie genre."}]
    ids = chat_prompt_ids(tok, messages)
    assert ids == chat_prompt_ids(gguf_tok, messages)
    with torch.no_grad():
        a = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        b = gguf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()
