"""Fault injection: which valid generation request faults, picked from the sha256 of its body so
a test can predict it and a retry of the same body succeeds, and how each kind of fault answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from batcher.server.options import ServerOptions
from batcher.server.records import BODY_HASH, FAULT, ServerStats
from batcher.server.requests import _server_error, _too_many

Answer = dict[str, Any] | bytes  # a JSON body, or a whole event stream


class FaultPicker:
    """Picks each body's fate: a permanent failure, one fault on its first arrival, or none."""

    def __init__(self, options: ServerOptions, stats: ServerStats, slow_seconds: float) -> None:
        self._options, self._stats = options, stats
        self._slow_seconds = slow_seconds  # how long a "slow" fault holds its answer back
        self._faulted: set[str] = set()  # body hashes whose one fault has been served

    async def pick(self, request: web.Request, endpoint: str, response_format: str) -> str | None:
        """This valid request's fault kind; None means answer it (a "slow" one, late)."""
        body_hash = request[BODY_HASH]
        fail_draw, fault_draw, pick = _hash_draws(body_hash)
        if fail_draw < self._options.fail_rate:
            request[FAULT] = "permanent failure"
            raise _server_error(500, "injected permanent failure", "injected_failure")
        kinds = self._options.fault_kinds
        if fault_draw >= self._options.fault_rate or not kinds or body_hash in self._faulted:
            return None
        self._faulted.add(body_hash)
        kind = _fault_for_shape(kinds[pick % len(kinds)], endpoint, response_format)
        self._stats.faults[kind] += 1
        request[FAULT] = kind
        if kind == "slow":
            await asyncio.sleep(self._slow_seconds)
            return None
        return kind


def _hash_draws(body_hash: str) -> tuple[float, float, int]:
    """Two independent floats in [0, 1) and an integer, all taken from a body hash."""
    return (
        int(body_hash[:13], 16) / 16**13,
        int(body_hash[13:26], 16) / 16**13,
        int(body_hash[26:34], 16),
    )


def _fault_for_shape(kind: str, endpoint: str, response_format: str) -> str:
    """Map a fault onto one the answer can show: chat has no images, b64 answers no URLs."""
    if endpoint == "chat" and kind in ("bad_b64", "url_404", "not_image"):
        return "garbage"
    if response_format == "b64_json" and kind in ("url_404", "not_image"):
        return "bad_b64"
    if response_format == "url" and kind == "bad_b64":
        return "not_image"
    return kind


async def answer_with_fault(
    request: web.Request, kind: str, answer: Callable[[], Awaitable[Answer]]
) -> web.StreamResponse:
    """Answer with fault ``kind``; ``answer`` builds the (spoilt) body where one is sent."""
    if kind in ("500", "502", "503"):
        raise _server_error(int(kind), f"injected fault: upstream answered {kind}")
    if kind == "429":
        raise _too_many("Rate limit reached (injected fault).", 200)
    if kind == "reset":
        if request.transport is not None:
            request.transport.close()
        return web.Response()  # never sent: the connection is already closing
    body = await answer()
    if isinstance(body, bytes):
        raw, content_type = body, "text/event-stream"
    else:
        raw, content_type = json.dumps(body).encode("utf-8"), "application/json"
    if kind == "garbage":
        raw = b"<html><body>502 Bad Gateway</body></html>"
    elif kind == "truncated":
        return await _send_half(request, raw, content_type)
    return web.Response(body=raw, content_type=content_type)


async def _send_half(request: web.Request, raw: bytes, content_type: str) -> web.StreamResponse:
    """Promise ``len(raw)`` bytes, send half of them, and close the connection."""
    response = web.StreamResponse(status=200)
    response.content_type = content_type
    response.content_length = len(raw)
    await response.prepare(request)
    await response.write(raw[: len(raw) // 2])
    if request.transport is not None:
        request.transport.close()
    return response
