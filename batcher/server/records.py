"""What the local server saw: a ``RequestRecord`` per request, the ``ServerStats`` tests and
benchmarks check a client against, the bounded ``RequestLog`` that keeps them, and the
``recorder`` middleware that writes a record when a request arrives and again when it is answered.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batcher.server.options import ServerOptions
from batcher.server.requests import canonical_hash

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What the recorder learnt about a request, for the handlers. Typed keys exist from aiohttp 3.13
# (and plain strings warn there); older versions take the plain strings.
_Key: Any = getattr(web, "RequestKey", None)
ARRIVED: Any = _Key("batcher_arrived", float) if _Key else "batcher_arrived"
BODY_HASH: Any = _Key("batcher_body_hash", str) if _Key else "batcher_body_hash"
FAULT: Any = _Key("batcher_fault", str) if _Key else "batcher_fault"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it; ``status`` is 0 when no answer was sent."""

    t: float  # time.monotonic() at arrival
    listener: str  # "api" | "files"
    method: str
    path: str
    authorization: str | None
    status: int
    body_hash: str | None


@dataclass(slots=True)
class ServerStats:
    """What the server did, for tests and benchmarks to check the client against."""

    requests: list[RequestRecord] = field(default_factory=list)  # arrival order
    generations: collections.Counter[str] = field(default_factory=collections.Counter)
    rate_limited: int = 0  # every 429 sent: rate limit, quota, injected
    faults: collections.Counter[str] = field(default_factory=collections.Counter)  # by kind

    def starts(self, path_suffix: str) -> list[float]:
        """Arrival times of API requests whose path ends with ``path_suffix``."""
        return [r.t for r in self.matching(path_suffix)]

    def statuses(self, path_suffix: str) -> list[int]:
        """Statuses answered to API requests whose path ends with ``path_suffix``."""
        return [r.status for r in self.matching(path_suffix)]

    def matching(self, path_suffix: str, listener: str = "api") -> list[RequestRecord]:
        return [r for r in self.requests if r.listener == listener and r.path.endswith(path_suffix)]


class RequestLog:
    """Keeps ``stats.requests`` to at most ``options.max_records``, newest last, and counts the
    429s sent."""

    def __init__(self, stats: ServerStats, options: ServerOptions) -> None:
        self._stats, self._options = stats, options
        self._dropped = 0  # records dropped so far, so an index stays valid across drops

    def arrive(self, record: RequestRecord) -> int:
        """Append ``record``; return the index ``finish`` takes."""
        requests, limit = self._stats.requests, self._options.max_records
        if limit is not None and len(requests) >= limit:
            # Drop the oldest half at once: a long `batcher serve` must not grow without end.
            dropped = len(requests) - limit // 2
            del requests[:dropped]
            self._dropped += dropped
        requests.append(record)
        return self._dropped + len(requests) - 1

    def finish(self, index: int, status: int, body_hash: str | None) -> None:
        """Fill in the answer of the record ``arrive`` returned ``index`` for, if still kept."""
        if status == 429:
            self._stats.rate_limited += 1
        position = index - self._dropped
        if position >= 0:
            record = self._stats.requests[position]
            self._stats.requests[position] = dataclasses.replace(
                record, status=status, body_hash=body_hash
            )


def recorder(listener: str, requests: RequestLog, options: ServerOptions) -> Any:
    """The middleware that records every request of ``listener`` and hashes each POST body."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[ARRIVED] = arrived = time.monotonic()
        authorization = request.headers.get("Authorization")
        entry = RequestRecord(
            arrived, listener, request.method, request.path, authorization, 0, None
        )
        index = requests.arrive(entry)
        status = 0  # stays 0 if the handler is cancelled (the client went away)
        try:
            if request.method == "POST":
                request[BODY_HASH] = canonical_hash(await request.read())
            response = await handler(request)
            status = _status_sent(request, response)
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            requests.finish(index, status, request.get(BODY_HASH))
            if options.log_requests:
                _log_request(request, status)

    return record


def _log_request(request: web.Request, status: int) -> None:
    """One line per request for `batcher serve`: what came, what went, what was injected."""
    answer = str(status) if status else "no answer (connection closed)"
    fault = request.get(FAULT)
    injected = f" (injected fault: {fault})" if fault else ""
    log.info("%s %s -> %s%s", request.method, request.path, answer, injected)


def _status_sent(request: web.Request, response: web.StreamResponse) -> int:
    """The status the client saw: 0 when the connection closed before any header went out."""
    transport = request.transport
    if not response.prepared and (transport is None or transport.is_closing()):
        return 0
    return response.status
