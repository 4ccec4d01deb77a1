"""The steps every generation request takes, shared by the image and chat endpoints: admission
(rolling-window rate limit, spent quota, a JSON object body), then the latency and the request's
fate (a permanent failure, a fault or none), and the count of a success.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any

from aiohttp import web

from batcher.server.faults import FaultPicker
from batcher.server.options import ServerOptions
from batcher.server.records import ARRIVED, BODY_HASH, ServerStats
from batcher.server.requests import ApiError, _too_many, parse_json_object


class RollingWindow:
    """At most ``count`` accepted arrivals in any trailing ``period``; rejected ones don't count."""

    def __init__(self, count: float, period: float) -> None:
        self._count, self._period = count, period
        self._times: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> float | None:
        """Accept an arrival and return None, or return the seconds until there is room."""
        while self._times and self._times[0] <= now - self._period:
            self._times.popleft()
        if len(self._times) >= self._count:
            return self._times[0] + self._period - now
        self._times.append(now)
        return None


class Generation:
    """Admits generation requests, decides their fate and counts the ones answered."""

    def __init__(self, options: ServerOptions, stats: ServerStats, slow_seconds: float) -> None:
        self._options, self._stats = options, stats
        self._window = RollingWindow(*options.rate_limit) if options.rate_limit else None
        self._faults = FaultPicker(options, stats, slow_seconds)

    async def admit(self, request: web.Request) -> dict[str, Any]:
        """Rate limit, quota and JSON checks; the body as a JSON object."""
        if self._window is not None:
            wait = self._window.admit(request[ARRIVED])
            if wait is not None:
                raise _too_many("Rate limit reached for requests.", max(1, math.ceil(wait * 1000)))
        if self._options.quota_exhausted:
            message = "You exceeded your current quota: the daily quota is spent; retry tomorrow."
            raise ApiError(429, message, type="insufficient_quota", code="insufficient_quota")
        return parse_json_object(await request.read())

    async def fate(self, request: web.Request, endpoint: str, response_format: str) -> str | None:
        """Sleep the latency, then pick this valid request's fault; None means answer it."""
        if self._options.latency > 0:
            await asyncio.sleep(self._options.latency)
        return await self._faults.pick(request, endpoint, response_format)

    def answered(self, request: web.Request) -> None:
        """Count a generation sent whole."""
        self._stats.generations[request[BODY_HASH]] += 1
