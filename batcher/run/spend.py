"""The budget that stops a run before it overspends: what is spent, held and in flight.

What a request will cost is estimated by the plan (:func:`batcher.plan.estimate`) and what an
answer cost is priced by :mod:`batcher.providers.prices`; a cost that is unknown is never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from batcher.wording import usd


@dataclass(slots=True)
class Spend:
    """This run's spend, and the budget that holds it (``limit`` None: no budget).

    Before a request is sent, :meth:`start` reserves its estimate; once it is answered (or has
    failed) :meth:`settle` replaces the reservation with what it cost. A request starts only
    while spent + reserved + its estimate stays within the limit, so the budget is passed only
    when answers cost more than their estimates.
    """

    limit: float | None = None
    spent: float = 0.0  # what the answers of this run cost, as far as it is known
    reserved: float = 0.0  # the estimates of the requests in flight
    assumed: float = 0.0  # the estimates of answers whose cost is unknown: held by the budget
    unknown: int = 0  # requests answered whose cost is unknown
    stopped: bool = False  # a request was refused: the run starts no more

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


class OverBudget(Exception):
    """A request was not started: it would pass the run's budget."""
