"""Prices: what a provider's models cost, in USD, as a manifest's ``prices:`` gives them.

batcher ships none: none of the providers it knows publishes prices in a form it could keep
up to date, and a stale built-in price is worse than an honest "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PRICE_FIELDS = {
    "image": "per image returned",
    "input": "per 1M input tokens",
    "output": "per 1M output tokens",
    "request": "per request",
}
ANY_MODEL = "*"
# The price fields that can price an answer of each kind: an entry prices a model of a kind
# only when it names one of them (``"*": {image: 0.003}`` or ``m: {input: 1}`` leaves chat
# model m unknown: a chat answer is charged for its output, or per request).
KIND_FIELDS = {"image": frozenset({"image", "request", "input", "output"}),
               "chat": frozenset({"output", "request"})}


@dataclass(frozen=True, slots=True)
class Price:
    """What one model costs, in USD; a part the provider does not charge is 0."""

    image: float = 0.0
    input: float = 0.0
    output: float = 0.0
    request: float = 0.0
    # The fields the manifest named (a named 0 is free; a field left out is not priced).
    named: frozenset[str] = frozenset(PRICE_FIELDS)

    def prices_kind(self, kind: str) -> bool:
        """Whether this price names a part that an answer of ``kind`` is charged for."""
        return bool(self.named & KIND_FIELDS.get(kind, frozenset(PRICE_FIELDS)))


@dataclass(frozen=True, slots=True)
class PriceList:
    """One provider's prices by model, ``"*"`` for its other models."""

    models: tuple[tuple[str, Price], ...] = ()

    def of(self, model: str, kind: str) -> Price | None:
        """The price of ``model``, whose answers are of ``kind`` (image or chat); ``None``
        when unknown. An entry prices only the kinds it names a part of: a chat model's needs
        ``output`` or ``request``; a model's own entry that does not is unknown, not 0."""
        fallback = None
        for name, price in self.models:
            if name == model:
                return price if price.prices_kind(kind) else None
            if name == ANY_MODEL and price.prices_kind(kind):
                fallback = price
        return fallback

    def __bool__(self) -> bool:
        return bool(self.models)


def price_from_mapping(data: Mapping[str, Any]) -> Price:
    """A price from a manifest's mapping; raises ``ValueError("<field>: <message>")``."""
    values: dict[str, float] = {}
    for key, value in data.items():
        if key not in PRICE_FIELDS:
            known = ", ".join(f"{name} ({meaning})" for name, meaning in PRICE_FIELDS.items())
            raise ValueError(f"{key}: unknown price field (expected: {known})")
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key}: must be a price in USD, 0 or more, not {value!r}")
        values[key] = float(value)
    if not values:
        raise ValueError(f"a price needs at least one of {', '.join(PRICE_FIELDS)}")
    return Price(**values, named=frozenset(values))
