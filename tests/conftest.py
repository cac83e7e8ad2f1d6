"""Shared fixtures. Tests are offline after the first MovieLens fetch (cached in the data dir)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# xdist workers get COLUMNS=80 from their launcher; a plain run has none. Tables printed to a
# pipe are then 240 wide (factory.cli.stdout_console) in both, as tests expect.
os.environ.pop("COLUMNS", None)

from factory.datasets.ingest import NormaliseOptions, ingest  # noqa: E402
from factory.datasets.movielens import load_movielens  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402


@pytest.fixture(scope="session")
def ml100k_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warehouse file holding ml-100k (5-core, loo split); copy it before writing to it."""
    path = tmp_path_factory.mktemp("wh") / "ml100k.duckdb"
    ingest(Warehouse(path), "ml-100k", load_movielens("100k"),
           NormaliseOptions(core=5, label_threshold=3.0))
    return path


@pytest.fixture()
def ml100k(ml100k_warehouse: Path, tmp_path: Path) -> Warehouse:
    """A private, writable copy of the ml-100k warehouse."""
    path = tmp_path / "factory.duckdb"
    shutil.copy(ml100k_warehouse, path)
    return Warehouse(path)


@pytest.fixture()
def wh(tmp_path: Path) -> Warehouse:
    """An empty warehouse in a temporary directory."""
    return Warehouse(tmp_path / "factory.duckdb")


@pytest.fixture()
def openai_server():
    """A local OpenAI-compatible server on 127.0.0.1 (factory.testing.openai_server).

    Deterministic canned answers; set `.responder`, `.faults`, `.latency` or `.api_key` to
    shape it, and read `.records` / `.count(...)` to see what a job sent.
    """
    from factory.testing.openai_server import OpenAIServer

    with OpenAIServer() as server:
        yield server
