"""A scripted teacher for the distillation tests: writes Fig. 11 chains for the steps and the
history it finds in the prompt, and can be told to answer badly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from factory.cli import app


class ChainTeacher:
    """Responder for factory.testing.openai_server.OpenAIServer."""

    def __init__(self) -> None:
        self.mode = "good"  # good | swapped (steps 1 and 2 out of order) | same (fixed texts)

    @staticmethod
    def steps(prompt: str) -> list[str]:
        return re.search(r"High-level Steps\):\*\* (.*)", prompt).group(1).split(" → ")

    @staticmethod
    def history(prompt: str) -> list[str]:
        return re.findall(r"^- Item \d+: (.*?)\.(?: Desc:|$)", prompt, re.M)

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        steps, items = self.steps(prompt), self.history(prompt)
        texts = [f"Step {j + 1} looks at {items[-1 - j % len(items)]}." if self.mode != "same"
                 else f"The same thought number {j + 1}." for j in range(len(steps))]
        sections = list(zip(steps, texts, strict=True))
        if self.mode == "swapped":
            sections[0], sections[1] = sections[1], sections[0]
        parts = [f"**Overall Analysis:** {len(items)} items watched."]
        parts += [f"**{name}:** {text}" for name, text in sections]
        parts.append("**Summary:** more of the same.")
        return "\n\n".join(parts)


def invoke(wh: Path, *args: str) -> Any:
    """The CLI in-process (FactoryError surfaces as result.exception)."""
    return CliRunner().invoke(app, ["--warehouse", str(wh), *args], catch_exceptions=True)


def ok(wh: Path, *args: str) -> Any:
    result = invoke(wh, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def error_of(wh: Path, *args: str) -> str:
    """The one-line message of a FactoryError raised by the command."""
    from factory.errors import FactoryError

    result = invoke(wh, *args)
    assert isinstance(result.exception, FactoryError), (result.output, result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


def factory(wh: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(wh), *args],
                          capture_output=True, text=True, timeout=600)


def fake_student(con: Any, run_id: str, teach_chain_set: str, adapter_dir: Path,
                 status: str = "succeeded", error: str | None = None,
                 dataset: str = "ml-100k") -> str:
    """A registry row as `distill student` writes it, for generate runs served by the test
    server (the adapter is never loaded there). Returns the student's model id."""
    from factory.distill import MAX_HISTORY, PROMPT
    from factory.prompts import load_prompt
    from train.format import sha256_file

    con.execute("insert into job_runs (run_id, job, dataset, params, status, error) values"
                " (?, 'distill-student', ?, '{}', ?, ?)", [run_id, dataset, status, error])
    if status != "succeeded":
        return ""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(b"not really weights")
    model_id = f"student/{run_id}"
    tpl = con.execute("select any_value(template), any_value(template_steps) from chains"
                      " where chain_set = ?", [teach_chain_set]).fetchone()
    if tpl[0] is None:  # no teacher chains: any template will do
        tpl = ("three-step", ["User Profile Summary", "User Interest Extraction",
                              "Item Recommendation"])
    con.execute(
        "insert into student_models (run_id, dataset, split, chain_set, template,"
        " template_steps, prompt_name, prompt_hash, max_history, base, base_location,"
        " base_gguf, model_id, adapter_dir, adapter_sha256, lora, training, n_chains, n_train,"
        " n_too_long, steps, loss_curve) values (?, ?, 'loo', ?, ?, ?, ?, ?, ?,"
        " '/models/base', '/models/base', NULL, ?, ?, ?, ?, '{}', 1, 1, 0, 1, [1.0])",
        [run_id, dataset, teach_chain_set, tpl[0], tpl[1], PROMPT, load_prompt(PROMPT).hash,
         MAX_HISTORY, model_id, str(adapter_dir), sha256_file(weights),
         json.dumps({"r": 8})])
    return model_id
