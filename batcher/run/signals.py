"""Ctrl-C and SIGTERM for the whole of a run, in every phase.

A run goes through stages: the startup (the lock, the listing of a store, adoption), the
requests, the uploads of their results, the final writes (ledger, summary, listings) and the
release of the lock. The handlers are in place from the first stage to the last, and each stage
is awaited through this module:

- :meth:`Signals.interruptible` (the startup: nothing is paid yet): the first signal cuts it
  short at once, and the run goes straight to its final writes.
- :meth:`Signals.graced` (uploads, final writes, the lock): not bounded before a signal (the
  store's own retry deadline applies); after the first, at most ``grace`` seconds each; after
  the second, at once (the final writes and the lock's release keep a moment,
  ``LAST_MOMENT``: a folder's summary is a local write, a lock's release one request).

The workers subscribe with :meth:`Signals.listen`: the first signal stops new requests and
gives those in flight the grace period; the second cancels them. Cutting a stage short never
leaves a partial file under a final name: files are renamed into place and objects are put
whole, so a cancelled write leaves nothing or a temporary name the next run removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from batcher.errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
LAST_MOMENT = 1.0  # seconds the final writes and the lock's release keep after a second signal
_T = TypeVar("_T")


class Signals:
    """The signals one run has received, and the stages they bound."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.count = 0
        self._first_at = 0.0
        self._second_at = 0.0
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[int], None]] = []

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    @contextlib.contextmanager
    def installed(self, enabled: bool = True) -> Iterator[Signals]:
        """Handle SIGINT and SIGTERM in the running loop while the block runs."""
        if not enabled:
            yield self
            return
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.receive, signum)
        try:
            yield self
        finally:
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)

    def listen(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call ``listener(count)`` on each signal; returns what stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def receive(self, signum: int) -> None:
        self.count += 1
        now = asyncio.get_running_loop().time()
        if self.count == 1:
            self._first_at = now
            log.warning("%s: stopping; what is under way gets up to %g s (a second signal "
                        "stops at once)", signal.Signals(signum).name, self.grace)
        elif self.count == 2:
            self._second_at = now
            log.warning("second signal: stopping at once")
        self._changed.set()
        for listener in list(self._listeners):
            listener(self.count)

    # ------------------------------------------------------------------ stages

    async def interruptible(self, step: Awaitable[_T]) -> _T:
        """Await a step that has paid nothing yet; the first signal cuts it short and raises
        :class:`Interrupted` (once the step has wound up, for at most ``grace``)."""
        completed, result = await self._until(step, lambda now: None if not self.count else 0.0)
        if not completed:
            raise Interrupted("interrupted before any request was sent")
        return result  # type: ignore[return-value]

    async def graced(self, step: Awaitable[_T], *,
                     last_moment: float = 0.0) -> tuple[bool, _T | None]:
        """Await a step; after the first signal it gets at most ``grace`` seconds (counted from
        the later of the signal and its start), after the second ``last_moment``. Returns
        (whether it completed, its result)."""
        started = asyncio.get_running_loop().time()

        def left(now: float) -> float | None:
            if self.count >= 2:
                return max(started, self._second_at) + last_moment - now
            if self.count == 1:
                return max(started, self._first_at) + self.grace - now
            return None
        return await self._until(step, left)

    async def _until(self, step: Awaitable[_T],
                     left: Callable[[float], float | None]) -> tuple[bool, _T | None]:
        """Await ``step`` while ``left(now)`` (seconds it may still take; None: no bound) stays
        positive, waking at each signal; else cancel it and let it wind up."""
        task = asyncio.ensure_future(step)
        loop = asyncio.get_running_loop()
        try:
            while not task.done():
                remaining = left(loop.time())
                if remaining is not None and remaining <= 0:
                    break
                await self._step_or_signal(task, remaining)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return True, task.result()
        task.cancel()
        await self._wind_up(task)
        return False, None

    async def _wind_up(self, task: asyncio.Future[_T]) -> None:
        """Let a cancelled step run its cleanup (a lock's release) for at most ``grace``,
        or ``LAST_MOMENT`` once a second signal came."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not task.done():
            limit = LAST_MOMENT if self.count >= 2 else self.grace
            remaining = started + limit - loop.time()
            if remaining <= 0:
                task.cancel()
                return
            await self._step_or_signal(task, remaining)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a step cut short failed", exc_info=task.exception())

    async def _step_or_signal(self, task: asyncio.Future[Any], seconds: float | None) -> None:
        """Wait until ``task`` is done, a signal comes, or ``seconds`` (None: no bound) pass."""
        self._changed.clear()
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            await _first_of(task, waiter, seconds)
        finally:
            waiter.cancel()


async def _first_of(step: asyncio.Future[Any], waiter: asyncio.Future[Any],
                    seconds: float | None) -> None:
    """Wait until ``step`` or ``waiter`` is done, or ``seconds`` have passed."""
    await asyncio.wait({step, waiter}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
