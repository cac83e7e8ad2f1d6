"""Line reading for (optionally gzipped) text files, with errors a user can act on."""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

from factory.errors import FactoryError


def require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FactoryError(f"{p}: no such file")
    return p


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for non-blank lines; gzip detected by magic bytes, not by name."""
    p = require_file(path)
    with open(p, "rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    lineno = 0
    try:
        raw = gzip.open(p, "rb") if gz else open(p, "rb")  # noqa: SIM115 - closed by the wrapper
        with io.TextIOWrapper(raw, encoding="utf-8", errors="strict") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield lineno, line
    except EOFError as exc:
        raise FactoryError(f"{p}: truncated gzip file (ends after line {lineno})") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise FactoryError(f"{p}: corrupt gzip data after line {lineno}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise FactoryError(f"{p}:{lineno + 1}: not UTF-8 text") from exc
