"""Cost accounting against a user-supplied, versioned price table (TOML).

    # prices.toml
    version = "openai-2025-06"            # stored with every cost, so old costs stay explainable
    [models."gpt-4o-mini"]
    input_per_mtok = 0.15                  # USD per million input tokens
    output_per_mtok = 0.60

A model missing from the table has no cost (NULL), except on the in-process backends
(transformers, vllm), which cost 0 under the version "local" unless the table prices them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from factory.errors import FactoryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LOCAL_VERSION = "local"


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class PriceTable:
    version: str
    models: dict[str, Price] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise FactoryError(f"price table {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise FactoryError(f"price table {path}: not valid TOML: {exc}") from None
        version = data.get("version")
        if not isinstance(version, str) or not version.strip():
            raise FactoryError(f"price table {path}: needs a top-level version = \"...\"")
        models: dict[str, Price] = {}
        for model, entry in (data.get("models") or {}).items():
            try:
                price = Price(float(entry["input_per_mtok"]), float(entry["output_per_mtok"]))
            except (KeyError, TypeError, ValueError):
                raise FactoryError(
                    f"price table {path}: models.{model!r} needs numeric input_per_mtok "
                    "and output_per_mtok"
                ) from None
            if price.input_per_mtok < 0 or price.output_per_mtok < 0:
                raise FactoryError(f"price table {path}: models.{model!r} has a negative price")
            models[model] = price
        return cls(version=version.strip(), models=models)


@dataclass(frozen=True)
class Pricing:
    """How one job prices its model: a Price and the version to record, or unknown."""

    price: Price | None
    version: str | None

    @classmethod
    def for_model(cls, table: PriceTable | None, model: str, local: bool) -> Pricing:
        if table is not None and model in table.models:
            return cls(table.models[model], table.version)
        if local:
            return cls(Price(0.0, 0.0), LOCAL_VERSION)
        return cls(None, None)

    @property
    def known(self) -> bool:
        return self.price is not None

    def cost(self, input_tokens: int | None, output_tokens: int | None) -> float | None:
        if self.price is None:
            return None
        return self.price.cost(input_tokens or 0, output_tokens or 0)
