"""Pacing for one provider: a strict rate limit, a concurrency cap and a shared 429 pause.

The policy lives here, apart from the work: a task's course (:mod:`batcher.run.course`) only
calls ``async with pacer.slot()`` around each request and ``pacer.pause(seconds)`` when the
provider says to slow down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from batcher.providers.rates import JITTER_MARGIN, Rate


class Pacer:
    """Rate limit, concurrency cap and shared pause for one provider.

    Starts are spaced evenly, one per ``interval``: no rolling window of the period ever holds
    more than ``rate.count`` starts (a token bucket of capacity N would let up to 2N-1 through
    one window). Each request reserves the next free start time, so waiters go in order. A 429
    pauses every worker at once and voids the turns reserved before it; the pacer then slows to
    the pace the provider accepted and creeps back up while no 429 comes.
    """

    RECOVERY = 1.1  # speed-up per quiet period after a slow-down
    MAX_SLOWDOWN = 4.0  # one 429 slows the pace by at most this factor

    def __init__(self, rate: Rate | None, concurrency: int) -> None:
        self.rate = rate
        self.interval = rate.interval if rate else 0.0
        self._slots = asyncio.Semaphore(concurrency)
        self._next = 0.0
        self._resume_at = 0.0
        self._epoch = 0
        self._starts: deque[float] = deque()
        self._quiet_since = 0.0
        self._first_start: float | None = None

    def pause(self, seconds: float) -> None:
        """Hold every new request to this provider for ``seconds`` from now."""
        resume_at = asyncio.get_running_loop().time() + max(seconds, 0.0)
        if resume_at > self._resume_at:
            self._resume_at = resume_at
            self._next = resume_at
            self._epoch += 1

    def slow_down(self) -> None:
        """The provider answered 429: pace at what it accepted over the last period.

        Before a whole period has passed the count says little, so the pace halves instead;
        either way one 429 slows it by at most ``MAX_SLOWDOWN``.
        """
        if self.rate is None:
            return
        now = asyncio.get_running_loop().time()
        self._forget(now)
        accepted = len(self._starts) - 1  # the start just refused does not count
        if self._first_start is not None and now - self._first_start >= self.rate.period \
                and accepted > 0:
            target = self.rate.period / accepted + JITTER_MARGIN / 10
        else:
            target = self.interval * 2
        self.interval = max(self.interval, min(target, self.interval * self.MAX_SLOWDOWN))
        self._quiet_since = now
        # Turns reserved at the old pace are void: every waiter takes a new one at the new pace.
        self._epoch += 1
        last = self._starts[-1] if self._starts else now
        self._next = max(self._resume_at, last + self.interval)

    def _forget(self, now: float) -> None:
        assert self.rate is not None
        while self._starts and self._starts[0] <= now - self.rate.period:
            self._starts.popleft()

    def _recover(self, now: float) -> None:
        assert self.rate is not None
        if self.interval > self.rate.interval and now - self._quiet_since >= self.rate.period:
            self.interval = max(self.rate.interval, self.interval / self.RECOVERY)
            self._quiet_since = now

    def _too_soon(self, now: float) -> float:
        """How long before a start now would come too close after the others.

        A start must follow the last by the bare spacing, period / N, and leave room in the
        rolling window. The jitter margin in ``interval`` is not asked of each gap, so a turn
        that woke a little late does not push every later turn back.
        """
        if not self._starts:
            return 0.0
        assert self.rate is not None
        spacing = max(self.rate.period / self.rate.count, self.interval - JITTER_MARGIN)
        return max(self._starts[-1] + spacing, self._window_opens()) - now

    def _window_opens(self) -> float:
        """When a start next fits: the N-th latest start must have left the rolling window.

        The even spacing already ensures this; checking the window itself keeps the promise
        when the loop wakes a turn late, which matters most for small counts such as 1/min.
        """
        assert self.rate is not None
        count = int(self.rate.count)
        if count < 1 or len(self._starts) < count:
            return 0.0
        # Half the margin the spacing leaves over a whole window, so that on time it never binds.
        margin = min(JITTER_MARGIN, JITTER_MARGIN * self.rate.period) / 2
        return self._starts[-count] + self.rate.period + margin

    async def _take_turn(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self.rate is None:
                if self._resume_at <= now:
                    return
                await asyncio.sleep(self._resume_at - now)
                continue
            self._recover(now)
            epoch = self._epoch
            start = max(now, self._next, self._resume_at, self._window_opens())
            self._next = start + self.interval
            if start > now:
                await asyncio.sleep(start - now)
            # The loop may wake several turns at once (it was busy): each waits in turn until
            # it is an interval after the last start and the rolling window has room.
            # (A wait for time to pass, not a poll of another task's state: no Event fits.)
            while epoch == self._epoch and (delay := self._too_soon(loop.time())) > 0:  # noqa: ASYNC110
                await asyncio.sleep(delay)
            if epoch != self._epoch:
                continue  # a 429 arrived while this request waited: its turn is void
            now = loop.time()
            self._starts.append(now)
            self._forget(now)
            if self._first_start is None:
                self._first_start = now
            return

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a concurrency slot from the next paced start until the request is done."""
        async with self._slots:
            await self._take_turn()
            yield
