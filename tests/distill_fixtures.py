"""Helpers of the distillation tests; their teacher, ChainTeacher, lives in
factory.testing.simulated (it writes Fig. 11 chains and can be told to answer badly)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from factory.cli import app
from factory.testing.simulated import ChainTeacher
from factory.warehouse import Warehouse

__all__ = ["ChainTeacher", "error_of", "factory", "fake_student", "invoke", "ok"]


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


def tiny_table_dataset(tmp_path: Path) -> Warehouse:
    """6 users x 5 items each (10 items), ingested with `factory ingest table`."""
    lines = ["user_id,item_id,timestamp,rating"]
    for u in range(6):
        for j in range(5):
            lines.append(f"u{u},i{(u + 2 * j) % 10},{1000 * u + j},5")
    (tmp_path / "inter.csv").write_text("\n".join(lines) + "\n")
    items = ["item_id,title,description"] + [f"i{i},Thing {i},A useful thing number {i}"
                                            for i in range(10)]
    (tmp_path / "items.csv").write_text("\n".join(items) + "\n")
    wh = tmp_path / "tiny.duckdb"
    ok(wh, "ingest", "table", "--interactions", str(tmp_path / "inter.csv"), "--items",
       str(tmp_path / "items.csv"), "--name", "tiny", "--core", "1")
    return Warehouse(wh)
