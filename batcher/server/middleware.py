"""The API listener's own middleware: the API key check (401) and OpenAI's error shape for
every refusal, and an ``x-request-id`` on every answer."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from batcher.server.options import ServerOptions
from batcher.server.records import Handler
from batcher.server.requests import ApiError


def openai_errors(options: ServerOptions) -> Any:
    """Check the API key, then turn ``ApiError`` and unknown routes into OpenAI's error JSON."""

    @web.middleware
    async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            _check_key(request, options.api_key)
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status not in (404, 405):
                raise
            message = f"Invalid URL ({request.method} {request.path})"
            return ApiError(exc.status, message, code="unknown_url").response()

    return answer_errors


def _check_key(request: web.Request, api_key: str | None) -> None:
    if api_key is None or not request.path.startswith("/v1/"):
        return
    given = request.headers.get("Authorization")
    if given is None:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it in an Authorization "
            "header: 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    if not secrets.compare_digest(given, f"Bearer {api_key}"):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every API answer carries an ``x-request-id``, as OpenAI's do (streams and errors too)."""
    response.headers["x-request-id"] = "req_" + secrets.token_hex(12)
