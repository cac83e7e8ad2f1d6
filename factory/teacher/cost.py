"""Cost accounting against a user-supplied, versioned price table (TOML).

    # prices.toml
    version = "openai-2025-06"            # stored with every cost, so old costs stay explainable
    [models."gpt-4o-mini"]
    input_per_mtok = 0.15                  # USD per million input tokens
    output_per_mtok = 0.60
    batch_input_per_mtok = 0.075           # optional: what the provider's batch API charges
    batch_output_per_mtok = 0.30

Batch prices (--mode batch): a model's `batch_input_per_mtok`/`batch_output_per_mtok`, else
a top-level `batch_discount = 0.5` applied to its online prices, else its online prices (the
dry run says so).

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

    def scaled(self, factor: float) -> Price:
        return Price(self.input_per_mtok * factor, self.output_per_mtok * factor)


def _price(path: Path, model: str, entry: object, prefix: str = "") -> Price:
    """`{prefix}input_per_mtok` and `{prefix}output_per_mtok` of a model's entry."""
    names = f"{prefix}input_per_mtok", f"{prefix}output_per_mtok"
    try:
        price = Price(*(float(entry[n]) for n in names))  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise FactoryError(f"price table {path}: models.{model!r} needs numeric "
                           f"{names[0]} and {names[1]}") from None
    if price.input_per_mtok < 0 or price.output_per_mtok < 0:
        raise FactoryError(f"price table {path}: models.{model!r} has a negative price")
    return price


@dataclass(frozen=True)
class PriceTable:
    version: str
    models: dict[str, Price] = field(default_factory=dict)
    batch_models: dict[str, Price] = field(default_factory=dict)   # batch_*_per_mtok given
    batch_discount: float | None = None         # else batch = this share of the online price

    def batch_price(self, model: str) -> Price | None:
        """What a batch of `model` costs per token: its own batch prices, else the discount
        applied to its online prices, else None (batch priced as online)."""
        if model in self.batch_models:
            return self.batch_models[model]
        if self.batch_discount is not None and model in self.models:
            return self.models[model].scaled(self.batch_discount)
        return None

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
        batch_models: dict[str, Price] = {}
        for model, entry in (data.get("models") or {}).items():
            models[model] = _price(path, model, entry)
            if isinstance(entry, dict) and any(k.startswith("batch_") for k in entry):
                batch_models[model] = _price(path, model, entry, "batch_")
        discount = data.get("batch_discount")
        if discount is not None and (isinstance(discount, bool) or
                                     not isinstance(discount, (int, float)) or
                                     not 0 <= discount <= 1):
            raise FactoryError(f"price table {path}: batch_discount must be a number from 0 "
                               f"to 1 (the share of the online price a batch costs), not "
                               f"{discount!r}")
        return cls(version=version.strip(), models=models, batch_models=batch_models,
                   batch_discount=None if discount is None else float(discount))


@dataclass(frozen=True)
class Pricing:
    """How one job prices its model: a Price and the version to record, or unknown."""

    price: Price | None
    version: str | None
    #: how the price was chosen, for the dry run (e.g. "price table v1, batch prices")
    label: str = ""

    @classmethod
    def for_model(cls, table: PriceTable | None, model: str, local: bool,
                  batch: bool = False) -> Pricing:
        """Online prices, or with `batch` the table's batch prices (online ones if it has
        none for the model)."""
        if table is not None and model in table.models:
            label = f"price table {table.version}"
            if not batch:
                return cls(table.models[model], table.version, label)
            price = table.batch_price(model)
            if price is None:
                return cls(table.models[model], table.version,
                           f"{label}; it has no batch price: batch priced as online")
            return cls(price, table.version, f"{label}, batch prices")
        if local:
            return cls(Price(0.0, 0.0), LOCAL_VERSION, f"price table {LOCAL_VERSION}")
        return cls(None, None)

    @property
    def known(self) -> bool:
        return self.price is not None

    def cost(self, input_tokens: int | None, output_tokens: int | None) -> float | None:
        if self.price is None:
            return None
        return self.price.cost(input_tokens or 0, output_tokens or 0)
