"""Prices: what a provider's models cost, in USD, as a manifest's ``prices:`` gives them.

batcher ships none: none of the providers it knows publishes prices in a form it could keep
up to date, and a stale built-in price is worse than an honest "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batcher.errors import HTTPStatusError, ProviderError, ResponseError, TransportError
from batcher.wording import plural, usd

PRICE_FIELDS = {
    "image": "per image returned",
    "input": "per 1M input tokens",
    "output": "per 1M output tokens",
    "request": "per request",
}
ANY_MODEL = "*"
TOKENS_PER_PRICE = 1_000_000
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


def answer_cost(
    kind: str, price: Price, *, images: int, usage: Mapping[str, Any] | None
) -> float | None:
    """What an answer cost: images by the number returned (and by their ``usage`` where the
    model is priced by tokens), chat by its ``usage``. ``None`` (unknown) when a token price
    applies and the answer did not say, as a whole count, how many tokens of that part it
    used: a missing part is never taken for 0."""
    cost = price.request + (images * price.image if kind != "chat" else 0.0)
    if not (price.input or price.output):
        return cost
    tokens = _usage_tokens(usage, input_priced=bool(price.input),
                           output_priced=bool(price.output))
    if tokens is None:
        return None
    prompt, completion = tokens
    return cost + (prompt * price.input + completion * price.output) / TOKENS_PER_PRICE


def failed_attempt_cost(
    error: ProviderError, estimated: float | None, *, kind: str = "image",
    price: Price | None = None,
) -> float | None:
    """What an attempt that brought no usable answer is counted at: nothing when the provider
    refused it (a 4xx: rate limit, validation, key) or it never reached the provider; a chat
    answer that came but could not be used, by the ``usage`` it carried (it was paid for,
    and says how much) when that is readable; else its estimate: after a 5xx, a timeout, a
    reset or a malformed answer batcher cannot tell whether the work was done and charged,
    and a budget must assume it was."""
    if isinstance(error, HTTPStatusError) and 400 <= error.status < 500:
        return 0.0
    if isinstance(error, TransportError) and not error.reached:
        return 0.0
    usage = error.usage if isinstance(error, ResponseError) else None
    if kind == "chat" and price is not None and isinstance(usage, Mapping):
        paid = answer_cost(kind, price, images=0, usage=usage)
        if paid is not None:
            return paid
    return estimated


def _usage_tokens(
    usage: Mapping[str, Any] | None, *, input_priced: bool, output_priced: bool
) -> tuple[int, int] | None:
    """(input, output) tokens of a ``usage``; ``None`` when a priced part is missing or not
    a count. A part without a price counts 0 whatever the answer says of it."""
    if not isinstance(usage, Mapping):
        return None
    parts = []
    for priced, names in ((input_priced, ("prompt_tokens", "input_tokens")),
                          (output_priced, ("completion_tokens", "output_tokens"))):
        value = next((usage[name] for name in names if name in usage), None)
        if not priced:
            parts.append(0)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        else:
            parts.append(value)
    return parts[0], parts[1]


@dataclass(slots=True)
class Cost:
    """A sum of costs where some may be unknown: the known part and how many were not."""

    usd: float = 0.0
    unknown: int = 0
    known: int = 0

    def add(self, cost: float | None) -> None:
        if cost is None:
            self.unknown += 1
        else:
            self.usd += cost
            self.known += 1

    def merge(self, other: Cost) -> None:
        self.usd += other.usd
        self.unknown += other.unknown
        self.known += other.known

    @property
    def value(self) -> float | None:
        """The known total; ``None`` when only unknown costs were added (and so nothing is
        known), never a 0 standing for unknown."""
        if self.unknown and not self.known:
            return None
        return round(self.usd, 9)  # below the digits any amount shows

    def text(self, *, upper: bool = False) -> str:
        """For people: ``$1.23``, ``$1.23 + 4 unknown``, ``unknown``, ``$0.00``."""
        return cost_text(self.value, self.unknown, upper=upper)


def cost_text(amount: float | None, unknown: int = 0, *, upper: bool = False) -> str:
    """An amount that may be partly or wholly unknown, for people (``None``: unknown)."""
    if amount is None:
        return "unknown"
    text = f"<= {usd(amount)}" if upper else usd(amount)
    return f"{text} + {unknown} unknown" if unknown else text


def spend_text(cost: Cost, noun: str = "request") -> str:
    """What a run spent, for people, as its last line says it: ``$0.12``, ``unknown``, and
    ``(+ 3 requests of unknown price)`` where some costs were unknown."""
    text = cost_text(cost.value)
    if cost.unknown:
        text += f" (+ {plural(cost.unknown, noun)} of unknown price)"
    return text


def run_spend_text(tallies: Iterable[Any]) -> str:
    """:func:`spend_text` of the jobs' tallies (anything with a ``cost``) of one run."""
    total = Cost()
    for tally in tallies:
        total.merge(tally.cost)
    return spend_text(total)
