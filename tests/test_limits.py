"""Pacing: rates, the strict rolling window, even spacing, the concurrency cap, 429 pauses.

Timing is measured with spies: each request records ``loop.time()`` when it enters its slot and
counts itself in flight. Most properties are checked twice: on a virtual clock, where they must
hold exactly, and on the real clock with small rates so each test takes a second or two.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from batcher.providers.rates import Rate, parse_rate
from batcher.run.limits import Pacer

# --------------------------------------------------------------------------- parse_rate


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("60/min", 60, 60.0),
        ("20/10s", 20, 10.0),
        ("5/s", 5, 1.0),
        ("100/h", 100, 3600.0),
        ("600/min", 600, 60.0),
        ("1.5/s", 1.5, 1.0),
        (" 10 / 2min ", 10, 120.0),
        ("50/500ms", 50, 0.5),
        ("60/MIN", 60, 60.0),
        ("3/hour", 3, 3600.0),
        ("7/sec", 7, 1.0),
        ("1/m", 1, 60.0),
    ],
)
def test_parse_rate(text: str, count: float, period: float) -> None:
    rate = parse_rate(text)
    assert rate == Rate(count, period)
    assert rate.per_second == pytest.approx(count / period)


@pytest.mark.parametrize(
    "text",
    ["fast", "", "60", "60/", "/min", "0/min", "-1/min", "5/0s", "5/day", "5/1x", "abc/s",
     "5/s/s", "5 per minute", "1e3/s", "60/min extra"],
)
def test_parse_rate_errors(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate(text)
    assert repr(text) in str(info.value)  # the message quotes what the user wrote


@pytest.mark.parametrize("rate", [Rate(60, 60.0), Rate(10, 0.5), Rate(1, 1.0), Rate(1000, 1.0)])
def test_interval_leaves_room_but_not_much(rate: Rate) -> None:
    plain = rate.period / rate.count
    assert plain < rate.interval <= plain * 1.03


# --------------------------------------------------------------------------- spies


class Spy:
    """Requests through a pacer that record when they start and how many are in flight."""

    def __init__(self, pacer: Pacer, work: float = 0.0) -> None:
        self.pacer = pacer
        self.work = work
        self.starts: list[float] = []
        self.in_flight = 0
        self.peak = 0
        self.hooks: dict[int, Callable[[], None]] = {}

    async def request(self) -> None:
        loop = asyncio.get_running_loop()
        async with self.pacer.slot():
            self.starts.append(loop.time())
            number = len(self.starts)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(self.work)
                hook = self.hooks.get(number)
                if hook is not None:  # e.g. this request's answer was a 429
                    hook()
            finally:
                self.in_flight -= 1

    async def run(self, count: int) -> None:
        await asyncio.gather(*(self.request() for _ in range(count)))


def most_in_window(starts: list[float], period: float) -> int:
    """The most starts inside any half-open window [t, t + period)."""
    ordered = sorted(starts)
    return max(
        (bisect.bisect_left(ordered, s + period) - i for i, s in enumerate(ordered)), default=0
    )


def gaps(starts: list[float]) -> list[float]:
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


# --------------------------------------------------------------------------- virtual clock


class _VirtualSelector:
    """Instead of blocking until the next timer, move the loop's clock forward to it."""

    def __init__(self, selector: Any, loop: VirtualLoop) -> None:
        self._selector = selector
        self._loop = loop

    def select(self, timeout: float | None = None) -> Any:
        events = self._selector.select(0)
        if events:
            return events
        if timeout is None:
            raise RuntimeError("every task is waiting and no timer is set: deadlock")
        self._loop.now += timeout
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when every task is sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self._selector = _VirtualSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.now


def virtual(coroutine: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        runner.run(coroutine())


def test_virtual_clock_is_virtual() -> None:
    async def check() -> None:
        loop = asyncio.get_running_loop()
        before, wall = loop.time(), time.monotonic()
        await asyncio.sleep(3600)
        assert loop.time() - before == pytest.approx(3600)
        assert time.monotonic() - wall < 60

    virtual(check)


# --------------------------------------------------------------------------- rate (virtual)


@pytest.mark.parametrize(
    ("rate", "concurrency", "work", "count"),
    [
        (Rate(10, 0.5), 8, 0.2, 40),
        (Rate(60, 60.0), 4, 3.0, 150),
        (Rate(20, 10.0), 20, 0.0, 65),
        (Rate(5, 1.0), 1, 0.0, 20),
        (Rate(3, 0.1), 50, 1.0, 30),
        (Rate(1000, 1.0), 64, 0.01, 2500),
    ],
)
def test_strict_window_and_even_spacing(
    rate: Rate, concurrency: int, work: float, count: int
) -> None:
    spy = Spy(Pacer(rate, concurrency), work)

    async def scenario() -> None:
        await spy.run(count)

    virtual(scenario)
    assert len(spy.starts) == count
    assert most_in_window(spy.starts, rate.period) <= rate.count
    assert min(gaps(spy.starts)) >= rate.period / rate.count
    # ... and no slower than the rate allows when nothing else holds it back
    if concurrency * rate.period / rate.count >= work:
        span = spy.starts[-1] - spy.starts[0]
        assert span <= (count - 1) * rate.interval * 1.001


def test_first_request_goes_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        spy = Spy(Pacer(Rate(1, 60.0), 1))
        await spy.run(1)
        assert spy.starts[0] == begin

    virtual(scenario)


def test_waiters_start_in_order() -> None:
    order: list[int] = []

    async def scenario() -> None:
        pacer = Pacer(Rate(10, 1.0), 100)

        async def one(number: int) -> None:
            async with pacer.slot():
                order.append(number)

        await asyncio.gather(*(one(i) for i in range(30)))

    virtual(scenario)
    assert order == list(range(30))


@pytest.mark.parametrize("rate", [None, Rate(1000, 1.0), Rate(10, 1.0)])
def test_concurrency_cap_virtual(rate: Rate | None) -> None:
    spy = Spy(Pacer(rate, 3), work=0.5)

    async def scenario() -> None:
        await spy.run(20)

    virtual(scenario)
    assert len(spy.starts) == 20
    if rate is None or rate.per_second * 0.5 >= 3:
        assert spy.peak == 3
    assert spy.peak <= 3


def test_pause_holds_every_worker_virtual() -> None:
    rate = Rate(10, 0.5)
    spy = Spy(Pacer(rate, 10), work=0.2)
    paused: list[tuple[int, float]] = []

    def answer_429() -> None:
        loop = asyncio.get_running_loop()
        paused.append((len(spy.starts), loop.time()))
        spy.pacer.pause(0.3)

    spy.hooks[8] = answer_429

    async def scenario() -> None:
        await spy.run(30)

    virtual(scenario)
    (before, at), = paused
    assert before > 8  # other workers had started and reserved turns before the 429
    assert all(start >= at + 0.3 for start in spy.starts[before:])
    assert len(spy.starts) == 30
    assert most_in_window(spy.starts, rate.period) <= rate.count
    assert min(gaps(spy.starts)) >= rate.period / rate.count


def test_pause_without_a_rate_virtual() -> None:
    spy = Spy(Pacer(None, 4), work=0.01)
    paused: list[tuple[int, float]] = []

    def answer_429() -> None:
        paused.append((len(spy.starts), asyncio.get_running_loop().time()))
        spy.pacer.pause(2.0)

    spy.hooks[2] = answer_429

    async def scenario() -> None:
        await spy.run(12)

    virtual(scenario)
    (before, at), = paused
    assert all(start >= at + 2.0 for start in spy.starts[before:])
    assert len(spy.starts) == 12


def test_a_shorter_pause_does_not_cut_a_longer_one() -> None:
    spy = Spy(Pacer(Rate(100, 1.0), 4), work=0.01)
    moments: list[float] = []

    def long_pause() -> None:
        moments.append(asyncio.get_running_loop().time())
        spy.pacer.pause(1.0)

    def short_pause() -> None:
        spy.pacer.pause(0.1)

    spy.hooks[3] = long_pause
    spy.hooks[4] = short_pause

    async def scenario() -> None:
        await spy.run(12)

    virtual(scenario)
    assert min(s for s in spy.starts if s > moments[0]) >= moments[0] + 1.0


def test_slow_down_lengthens_the_interval_and_recovers_virtual() -> None:
    rate = Rate(10, 0.5)
    pacer = Pacer(rate, 20)
    spy = Spy(pacer)
    intervals: list[float] = []

    async def scenario() -> None:
        await spy.run(10)
        intervals.append(pacer.interval)
        pacer.slow_down()
        intervals.append(pacer.interval)
        await spy.run(10)
        await spy.run(150)  # seven seconds without a 429
        intervals.append(pacer.interval)

    virtual(scenario)
    before, slowed, recovered = intervals
    assert before == rate.interval
    assert slowed > before
    fast, slow = spy.starts[:10], spy.starts[10:20]
    assert min(gaps(slow)) >= slowed - 1e-9
    assert min(gaps(slow)) > max(gaps(fast))
    assert recovered == pytest.approx(rate.interval)
    assert min(gaps(spy.starts)) >= rate.period / rate.count


def test_slow_down_without_a_rate_is_harmless() -> None:
    async def scenario() -> None:
        pacer = Pacer(None, 2)
        pacer.slow_down()
        spy = Spy(pacer)
        await spy.run(5)
        assert len(set(spy.starts)) == 1

    virtual(scenario)


def test_cancelled_waiter_frees_its_slot() -> None:
    async def scenario() -> None:
        pacer = Pacer(Rate(1, 1.0), 1)
        spy = Spy(pacer, work=0.1)
        first = asyncio.create_task(spy.request())
        waiting = asyncio.create_task(spy.request())
        await asyncio.sleep(0.5)  # the second one holds the slot, waiting for its turn
        waiting.cancel()
        await asyncio.gather(first, waiting, return_exceptions=True)
        await asyncio.wait_for(spy.run(2), timeout=10)
        assert len(spy.starts) == 3

    virtual(scenario)


# --------------------------------------------------------------------------- real clock


async def run_real(spy: Spy, count: int) -> None:
    await asyncio.wait_for(spy.run(count), timeout=30)


async def test_strict_window_real_clock() -> None:
    rate = Rate(10, 0.5)
    spy = Spy(Pacer(rate, 8), work=0.02)
    await run_real(spy, 25)
    assert len(spy.starts) == 25
    assert most_in_window(spy.starts, rate.period) <= rate.count
    # evenly spaced: on average at least period/count apart, with no burst at the start
    assert (spy.starts[-1] - spy.starts[0]) / 24 >= rate.period / rate.count
    assert spy.starts[int(rate.count)] - spy.starts[0] >= rate.period


async def test_concurrency_cap_real_clock() -> None:
    spy = Spy(Pacer(None, 3), work=0.05)
    await run_real(spy, 12)
    assert spy.peak == 3

    spy = Spy(Pacer(Rate(100, 0.5), 4), work=0.15)
    await run_real(spy, 16)
    assert spy.peak == 4


async def test_pause_holds_every_worker_real_clock() -> None:
    loop = asyncio.get_running_loop()
    spy = Spy(Pacer(Rate(10, 0.5), 10), work=0.2)
    paused: list[tuple[int, float]] = []

    def answer_429() -> None:
        paused.append((len(spy.starts), loop.time()))
        spy.pacer.pause(0.4)

    spy.hooks[5] = answer_429
    await run_real(spy, 15)
    (before, at), = paused
    assert before > 5
    assert all(start >= at + 0.4 - 1e-3 for start in spy.starts[before:])
    assert most_in_window(spy.starts, 0.5) <= 10


async def test_slow_down_lengthens_the_interval_real_clock() -> None:
    rate = Rate(10, 0.5)
    pacer = Pacer(rate, 10)
    spy = Spy(pacer)
    await run_real(spy, 10)
    pacer.slow_down()
    await run_real(spy, 10)
    fast, slow = spy.starts[:10], spy.starts[10:]
    assert (slow[-1] - slow[0]) / 9 > (fast[-1] - fast[0]) / 9 + 0.003
    assert most_in_window(spy.starts, rate.period) <= rate.count


async def test_a_busy_loop_does_not_cause_a_burst() -> None:
    # A synchronous step on the event loop (decoding a large image, a SQLite commit) can hold it
    # for a moment. The turns that fell due meanwhile must not all start at once afterwards:
    # the provider counts arrivals, and it would see a burst over its per-second limit.
    rate = Rate(10, 0.5)
    spy = Spy(Pacer(rate, 10))

    asyncio.get_running_loop().call_later(0.03, time.sleep, 0.25)  # holds the loop 250 ms
    await run_real(spy, 20)
    assert len(spy.starts) == 20
    assert most_in_window(spy.starts, rate.period) <= rate.count
    assert min(gaps(spy.starts)) >= rate.period / rate.count, [round(g, 3) for g in
                                                               gaps(spy.starts)]
