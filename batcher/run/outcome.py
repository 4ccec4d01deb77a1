"""How a run ended: why it (or a provider) stopped, its exit code and its last message.

Every stop reason is written here, in :class:`Stops`: a key refused, a provider stopped (a
redirect, a spent quota, a wait over ``max_wait``, an endpoint never reached), the budget
reached, batcher's own error. The exit code (DESIGN 1) and the message the CLI prints last
are made from them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher.errors import AuthError, BatcherError, Interrupted, ProviderError
from batcher.plan import Plan
from batcher.providers.prices import run_spend_text
from batcher.reports.progress import Counters
from batcher.reports.summary import JobTally
from batcher.run.retry import Cause, Verdict
from batcher.run.setup import Lane
from batcher.run.signals import Signals
from batcher.wording import usd

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """The result of a run, for the CLI and for summary.json."""

    exit_code: int
    plan: Plan
    counters: Counters
    summary: dict[str, Any]
    output: str  # the folder or the store URL
    root: Path  # where the ledger and files are on this machine (a store's working copy)
    message: str | None = None


class Stops:
    """Why the run, or one of its providers, stopped; what that makes of the exit code and
    of the last message."""

    def __init__(self, signals: Signals) -> None:
        self.signals = signals
        self.stopping = asyncio.Event()  # no new request starts
        self.lanes: dict[str, Lane] = {}  # the providers, once the run has tasks to send
        self.auth_error: AuthError | None = None
        self.crash: BaseException | None = None  # batcher's own or the store's, not a provider's
        self.budget: str | None = None  # why the budget stopped the run

    @property
    def interrupted(self) -> bool:
        return self.signals.interrupted

    def run(self, reason: str) -> None:
        """Stop starting requests; those in flight finish."""
        if not self.stopping.is_set():
            log.warning("%s: stopping; requests in flight may finish", reason)
            self.stopping.set()

    def crashed(self, exc: BaseException) -> None:
        """batcher's own environment failed (a full disk, a store that stays down): stop."""
        log.debug("stopped by an error", exc_info=exc)
        if self.crash is None:
            self.crash = exc
        self.run(f"error: {exc}")

    def verdict(self, lane: Lane, verdict: Verdict, error: ProviderError) -> None:
        """A verdict stops the run (a key refused) or the provider."""
        config = lane.config
        if verdict.cause is Cause.KEY_REFUSED:
            source = config.api_key_env or config.api_key_file or "no key configured"
            self.auth_error = AuthError(
                f"provider {config.name} refused the request ({error}); check its API key "
                f"({source}) and that the key may use this endpoint and model"
            )
            self.run(f"provider {config.name} refused the key")
        elif verdict.cause is Cause.REDIRECTED:
            self.provider(lane, error.message)
        elif verdict.cause is Cause.WAIT_TOO_LONG:
            self.provider(lane, f"it asked to wait {verdict.wait or 0:.0f} s, over max_wait "
                                f"{config.max_wait:g} s")
        elif verdict.cause is Cause.QUOTA_SPENT:
            self.provider(lane, f"the provider says its quota is spent ({error})")
        else:  # a cause classify() gained without a wording here
            self.provider(lane, str(error))

    def unreachable(self, lane: Lane) -> None:
        self.provider(lane, f"the endpoint {lane.client.base_url} is unreachable (every "
                            "connection refused or timed out)")

    def provider(self, lane: Lane, reason: str) -> None:
        """The provider takes no more tasks; its remaining tasks stay pending."""
        if lane.stopped is None:
            lane.stopped = reason
            log.error("provider %s: %s; its remaining tasks stay pending",
                      lane.config.name, reason)

    def over_budget(self, why: str, limit: float | None) -> None:
        """The budget is reached: no provider starts another task; those in flight finish
        (they are paid for) and the rest stay pending."""
        if self.budget is None:
            self.budget = why
            log.warning("budget %s reached; the requests in flight finish, no new one starts",
                        usd(limit or 0))
        for lane in self.lanes.values():
            if lane.stopped is None:
                lane.stopped = "budget reached"

    # ------------------------------------------------------------------ the ending

    def exit_code(self, summary: dict[str, Any], *, limited: bool) -> int:
        """DESIGN 1's exit code; ``limited``: the run was held to ``--limit`` tasks."""
        if self.interrupted:
            return Interrupted.exit_code
        if self.auth_error is not None:
            return AuthError.exit_code
        if summary["failed"] or self.crash is not None or self.budget:
            return 1
        # Tasks held back by --limit are what the user asked for; held back by a stopped
        # provider they are not.
        if summary["pending"] and (not limited or self._stopped_providers()):
            return 1
        return 0

    def message(self, tally: dict[str, JobTally]) -> str | None:
        """What the CLI prints last: why the run stopped, if it did."""
        if self.auth_error is not None:
            return str(self.auth_error)
        if isinstance(self.crash, BatcherError):  # the store stayed down: its own message
            return f"stopped: {self.crash}; the tasks not uploaded stay pending"
        if self.crash is not None:
            return f"stopped by an error: {self.crash!r} (run again with -v for details)"
        if self.budget:
            return (f"the budget stopped the run: {self.budget}; spent "
                    f"{run_spend_text(tally.values())} this run; the rest stay pending "
                    "(raise --budget and run again to finish)")
        return self._stopped_providers()

    def _stopped_providers(self) -> str | None:
        stopped = [f"{name}: {lane.stopped}" for name, lane in self.lanes.items() if lane.stopped]
        return "; ".join(stopped) or None


def interrupted(plan: Plan, counters: Counters, summary: dict[str, Any], output: str,
                root: Path, message: str) -> Outcome:
    """The outcome of a run a signal stopped before it sent anything."""
    summary["exit_code"] = Interrupted.exit_code
    return Outcome(Interrupted.exit_code, plan, counters, summary, output, root, message)
