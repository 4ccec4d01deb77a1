"""Spend: prices, what a task will cost before it is sent, what it cost once answered, and the
budget that stops a run before it overspends.

Prices are the user's (a manifest's ``prices:``); batcher ships none, since none of the
providers it knows publishes prices in a form it could keep up to date. A model without a price
is *unknown*: it is never counted as 0, and a budget cannot be kept with it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from batcher.errors import HTTPStatusError, ProviderError, ResponseError, TransportError
from batcher.providers.prices import Price
from batcher.tasks import Task
from batcher.wording import plural, usd

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text
# The output bound of a chat request without max_tokens: an upper estimate needs one, and
# replies longer than this are rare for prompts a batch runs.
DEFAULT_OUTPUT_TOKENS = 1024
TOKENS_PER_PRICE = 1_000_000


# --------------------------------------------------------------------------- estimates


def input_tokens(task: Task) -> int:
    """The task's input tokens, estimated from its text (about 4 characters a token)."""
    if task.messages is not None:
        chars = sum(len(_message_text(message)) for message in task.messages)
    else:
        chars = len(task.prompt) + len(task.system or "")
    return math.ceil(chars / CHARS_PER_TOKEN)


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: count their text, not the images
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def output_bound(task: Task) -> int:
    """The most output tokens a chat task may be answered with: its max_tokens, else the
    default bound."""
    params = task.params or {}
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_OUTPUT_TOKENS


def answers_asked(task: Task) -> int:
    """How many images (or chat choices) the task asks for: its ``n``, else 1."""
    value = (task.params or {}).get("n", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def estimate(task: Task, price: Price) -> float | None:
    """What one request of the task costs at most: images n x price; chat the estimated input
    plus the output bound for each of its n choices (an upper estimate). ``None`` for an image
    model priced by tokens: what an image's output tokens will be cannot be told beforehand."""
    n = answers_asked(task)
    if task.kind == "chat":
        return price.request + (input_tokens(task) * price.input
                                + n * output_bound(task) * price.output) / TOKENS_PER_PRICE
    if price.input or price.output:
        return None
    return price.request + n * price.image


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


# --------------------------------------------------------------------------- sums


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


# --------------------------------------------------------------------------- the budget


@dataclass(slots=True)
class Spend:
    """This run's spend, and the budget that holds it (``limit`` None: no budget).

    A request is sent inside :meth:`reserve`, a gate like ``Pacer.slot()``: it reserves the
    request's estimate (:meth:`start`), and once the request is answered (or has failed) its
    :meth:`Reservation.settle` replaces the reservation with what it cost. A request starts
    only while spent + reserved + its estimate stays within the limit, so the budget is passed
    only when answers cost more than their estimates.
    """

    limit: float | None = None
    spent: float = 0.0  # what the answers of this run cost, as far as it is known
    reserved: float = 0.0  # the estimates of the requests in flight
    assumed: float = 0.0  # the estimates of answers whose cost is unknown: held by the budget
    unknown: int = 0  # requests answered whose cost is unknown
    stopped: bool = False  # a request was refused: the run starts no more

    @asynccontextmanager
    async def reserve(self, estimated: float | None) -> AsyncIterator[Reservation]:
        """Hold a request's estimate while it is in flight. Raises :class:`OverBudget` (on
        entering) when the request would pass the budget. Left unsettled (cancelled in flight,
        or batcher's own error) the estimate stays held: the request may have been paid."""
        reservation = Reservation(self, self.start(estimated))
        try:
            yield reservation
        finally:
            if not reservation.settled:
                self.abandon(reservation.amount)

    def start(self, estimated: float | None) -> float | None:
        """Reserve a request's estimate; returns the reservation (``None`` for a request of
        unknown price, never refused without a budget). Raises :class:`OverBudget` when the
        request would pass the budget."""
        if self.limit is not None:
            if estimated is None:  # the run checks prices first: a bug if it comes here
                raise OverBudget("a request of unknown price")
            if self.stopped or self.held + estimated > self.limit + 1e-9:
                self.stopped = True
                raise OverBudget(f"the next request (estimate {usd(estimated)}) would pass the "
                                 f"budget of {usd(self.limit)} with {usd(self.held)} spent or "
                                 "in flight")
        if estimated is not None:
            self.reserved += estimated
        return estimated

    def settle(self, reservation: float | None, cost: float | None) -> None:
        """A started request's cost is known; ``None``: unknown, held against the budget at its
        estimate but never reported as spend."""
        if reservation is not None:
            self.reserved = max(self.reserved - reservation, 0.0)
        if cost is None:
            self.unknown += 1
            if reservation is not None:
                self.assumed += reservation
            return
        self.spent += cost

    def abandon(self, reservation: float | None) -> None:
        """A request was cancelled in flight: it may have been paid, so the budget keeps
        holding its estimate."""
        if reservation is not None:
            self.reserved = max(self.reserved - reservation, 0.0)
            self.assumed += reservation

    @property
    def held(self) -> float:
        """What the budget counts as used: spend, unknown costs at their estimates, and the
        requests in flight."""
        return self.spent + self.assumed + self.reserved


@dataclass(slots=True)
class Reservation:
    """One request's estimate, held by the budget until what the request cost is known."""

    spend: Spend
    amount: float | None  # None: a request of unknown price, without a budget
    settled: bool = False

    def settle(self, cost: float | None) -> None:
        """The request's cost is known (``None``: unknown); see :meth:`Spend.settle`."""
        self.spend.settle(self.amount, cost)
        self.settled = True


class OverBudget(Exception):
    """A request was not started: it would pass the run's budget."""
