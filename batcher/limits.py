"""Pacing for one provider: a strict rate limit, a concurrency cap and a shared 429 pause.

The policy lives here, apart from the work: the runner only calls ``async with pacer.slot()``
around each request and ``pacer.pause(seconds)`` when the provider says to slow down.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")

# Requests are spaced so that N+1 consecutive starts span the period plus this much: the
# provider counts arrivals, and arrivals jitter by a few milliseconds on the way there.
JITTER_MARGIN = 0.02


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` requests started in any rolling window of ``period`` seconds."""

    count: float
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @property
    def interval(self) -> float:
        """The even spacing between starts, with room for network jitter."""
        margin = min(JITTER_MARGIN * self.period / max(self.count, 1.0), JITTER_MARGIN)
        return self.period / self.count + margin

    def __str__(self) -> str:
        count = int(self.count) if self.count == int(self.count) else self.count
        return f"{count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """Parse ``N/s``, ``N/min``, ``N/h`` or ``N/<number><unit>`` such as ``20/10s``.

    Raises ``ValueError`` with a message fit for a user.
    """
    match = _RATE_RE.match(str(text).lower())
    if not match or match.group(3) not in _UNITS:
        raise ValueError(f"{text!r} is not a rate; write N/s, N/min, N/h or N/<number><unit>")
    count = float(match.group(1))
    period = float(match.group(2) or 1) * _UNITS[match.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"{text!r}: the count and the period must be positive")
    return Rate(count, period)


class Pacer:
    """Rate limit, concurrency cap and shared pause for one provider.

    The rate limit is the spacing form of a leaky bucket: one start per ``rate.interval``, so no
    rolling window of the period ever holds more than ``rate.count`` starts (a bucket of
    capacity N would let up to 2N-1 through one window). A 429 pauses every worker at once.
    """

    def __init__(self, rate: Rate | None, concurrency: int) -> None:
        self.rate = rate
        self._limiter = AsyncLimiter(1, rate.interval) if rate else None
        self._slots = asyncio.Semaphore(concurrency)
        self._resume_at = 0.0
        self.paused_total = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every new request to this provider for ``seconds`` from now."""
        loop = asyncio.get_running_loop()
        resume_at = loop.time() + seconds
        if resume_at > self._resume_at:
            self.paused_total += resume_at - max(self._resume_at, loop.time())
            self._resume_at = resume_at

    async def _wait_for_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while (delay := self._resume_at - loop.time()) > 0:
            await asyncio.sleep(delay)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a concurrency slot, the end of any pause and the next rate-limit start."""
        loop = asyncio.get_running_loop()
        async with self._slots:
            while True:
                await self._wait_for_pause()
                if self._limiter is not None:
                    await self._limiter.acquire()
                # A 429 that arrived while this request waited for its turn voids the turn:
                # going now would burst everyone queued behind the pause at once.
                if self._resume_at <= loop.time():
                    break
            yield
