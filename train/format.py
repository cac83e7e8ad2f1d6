"""The cache format's constants and checksum, shared by the reader here and the exporter in
factory (documented in README.md, "Training caches"). Imports nothing heavy."""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = "factory-cache"
VERSION = 1
SPLITS = ("train", "valid", "test")
FLOAT_DTYPES = ("float16", "float32")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
