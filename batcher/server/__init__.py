"""The built-in OpenAI-compatible server: the ``local`` provider, ``batcher serve``, and tests.

Two listeners on 127.0.0.1 (two ports, so two origins, like a real provider and its object store):

* the API, under ``/v1``: ``GET /models``, ``POST /images/generations`` (deterministic PNGs,
  ``url`` or ``b64_json``) and ``POST /chat/completions`` (deterministic text, optional SSE
  stream), with the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``;
* the files listener, ``GET /images/<token>.png``, which needs no key, like an object store.

Each generation request goes through the same checks, in this order: record the arrival, API key
(401), rolling-window rate limit (429), spent quota (429), JSON body (400), validation (400),
latency, permanent failure (500), fault on first arrival, success. Faults are picked from the
sha256 of the canonical body, so a test can predict them and a retry of the same body succeeds.
"""

from __future__ import annotations

from batcher.server.app import LocalServer, serve_forever
from batcher.server.options import FAULT_KINDS, ServerOptions
from batcher.server.records import RequestRecord, ServerStats
from batcher.server.replies import chat_reply, chat_usage
from batcher.server.requests import (
    CHAT_MODELS,
    IMAGE_MODELS,
    ApiError,
    ChatRequest,
    ImageRequest,
    canonical_hash,
    parse_chat_request,
    parse_image_request,
)

__all__ = [
    "CHAT_MODELS", "FAULT_KINDS", "IMAGE_MODELS", "ApiError", "ChatRequest", "ImageRequest",
    "LocalServer", "RequestRecord", "ServerOptions", "ServerStats", "canonical_hash", "chat_reply",
    "chat_usage", "parse_chat_request", "parse_image_request", "serve_forever",
]
