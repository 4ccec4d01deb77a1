"""The OpenAI-compatible client: images/generations, chat/completions and models over aiohttp.

This is the single place where aiohttp and JSON failures become batcher's
:class:`~batcher.errors.ProviderError` family. The API key travels only in the requests this
client makes to its own base URL; redirects are never followed, so it cannot leak elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import yarl

from batcher import fastjson
from batcher.errors import HTTPStatusError, ResponseError, TransportError
from batcher.providers.base import ChatAnswer, ImageAnswer, ImageItem
from batcher.providers.config import ProviderConfig
from batcher.run.retry import parse_retry_after

MAX_ERROR_MESSAGE = 500
MAX_ERROR_BODY = 64 * 1024


class OpenAICompatible:
    """One provider reached through a shared ``aiohttp.ClientSession``."""

    def __init__(
        self,
        config: ProviderConfig,
        session: aiohttp.ClientSession,
        api_key: str | None,
        *,
        base_url: str | None = None,
    ) -> None:
        self.config = config
        self.base_url = (base_url or config.base_url).rstrip("/")
        self._session = session
        self._key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeout, sock_connect=config.connect_timeout
        )

    # ------------------------------------------------------------------ endpoints

    async def generate_image(self, body: Mapping[str, Any]) -> ImageAnswer:
        data, request_id = await self._post_json("/images/generations", body)
        return replace(parse_image_answer(data), request_id=request_id)

    async def complete_chat(self, body: Mapping[str, Any]) -> ChatAnswer:
        if body.get("stream"):
            return await self._stream_chat(body)
        data, request_id = await self._post_json("/chat/completions", body)
        return replace(parse_chat_answer(data), request_id=request_id)

    async def list_models(self) -> list[str]:
        async with self._request("GET", "/models") as response:
            data = _decode_json(await response.read())
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ResponseError("the model list has no data array", reason="bad_response")
        return sorted(str(item.get("id")) for item in items if isinstance(item, dict))

    # ------------------------------------------------------------------ transport

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        data, headers = (None, self._headers) if body is None else (
            fastjson.dumps_bytes(body), self._json_headers)
        try:
            async with self._session.request(
                method, self.base_url + path, data=data, headers=headers,
                timeout=self._timeout, allow_redirects=False,
            ) as response:
                if response.status >= 300:
                    error = await _status_error(response)
                    if self._key:  # a provider may echo the key back in its message
                        error.message = error.message.replace(self._key, "[api key]")
                        if self._key in fastjson.dumps(error.body):
                            error.body = None  # results.jsonl then shows the scrubbed message
                    raise error
                yield response
        except TimeoutError as exc:
            raise TransportError(
                f"no answer within {self.config.timeout:g} s", reason="timeout"
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise TransportError(f"the answer was cut short: {exc}", reason="truncated") from exc
        except aiohttp.ClientConnectorError as exc:  # before any byte was sent
            raise TransportError(f"connection failed: {exc}", reason="connection",
                                 reached=False) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"connection failed: {exc}", reason="connection") from exc

    async def _post_json(self, path: str, body: Mapping[str, Any]) -> tuple[Any, str | None]:
        """The decoded answer and its request id."""
        async with self._request("POST", path, body) as response:
            return _decode_json(await response.read()), request_id_of(response)

    async def _stream_chat(self, body: Mapping[str, Any]) -> ChatAnswer:
        parts: list[str] = []
        last: dict[str, Any] = {}
        usage = None
        finished = False
        async with self._request("POST", "/chat/completions", body) as response:
            request_id = request_id_of(response)
            try:
                async for raw_line in response.content:
                    line = raw_line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        finished = True
                        break
                    last = _stream_chunk(_decode_json(payload))
                    usage = last.get("usage") or usage
                    parts.extend(_delta_texts(last))
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise TransportError(f"the stream broke off: {exc}", reason="truncated") from exc
        if not finished:
            raise TransportError("the stream ended without [DONE]", reason="truncated")
        text = "".join(parts)
        if usage is not None and not isinstance(usage, dict):
            raise ResponseError("the stream's usage is not an object", reason="bad_response")
        completion = {
            "id": last.get("id"), "object": "chat.completion", "model": last.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": usage,
        }
        return ChatAnswer(text=text, body=_kept(completion), usage=usage, request_id=request_id)


def request_id_of(response: aiohttp.ClientResponse) -> str | None:
    """The provider's ``x-request-id`` header (OpenAI's name for it), cut to a sane length."""
    value = response.headers.get("x-request-id", "").strip()
    return value[:200] or None


def _stream_chunk(chunk: Any) -> dict[str, Any]:
    if not isinstance(chunk, dict):
        raise ResponseError(f"a stream chunk is not an object: {_show(chunk)}",
                            reason="bad_response")
    return chunk


def _delta_texts(chunk: dict[str, Any]) -> list[str]:
    """The content pieces of one stream chunk; a chunk of another shape is a bad answer."""
    choices = chunk.get("choices")
    if choices is None:
        return []  # the usage chunk has no choices
    if not isinstance(choices, list):
        raise ResponseError("a stream chunk's choices is not a list", reason="bad_response")
    texts = []
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if delta is None and isinstance(choice, dict):
            continue  # a choice with only a finish_reason
        if not isinstance(delta, dict):
            raise ResponseError("a stream chunk's choice has no delta object",
                                reason="bad_response")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise ResponseError("a stream chunk's delta.content is not a string",
                                reason="bad_response")
        if content:
            texts.append(content)
    return texts


def _show(value: Any) -> str:
    return repr(value)[:80]


def _kept(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` if it is plain JSON that the ledger and results.jsonl can hold as sent."""
    found = fastjson.unsendable(body)
    if found is not None:
        where, why = found
        raise ResponseError(f"the answer's {where or 'body'} {why}", reason="bad_response")
    return body


def _usage(data: dict[str, Any]) -> dict[str, Any] | None:
    usage = data.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise ResponseError(f"the answer's usage is not an object: {_show(usage)}",
                            reason="bad_response")
    return usage


def _decode_json(raw: bytes) -> Any:
    try:
        return fastjson.loads(raw)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ResponseError(
            f"the answer is not JSON: {raw[:80]!r}", reason="bad_json"
        ) from exc


async def _status_error(response: aiohttp.ClientResponse) -> HTTPStatusError:
    """Turn a non-2xx answer into an error carrying the provider's own message and code."""
    try:
        raw = await response.read()
    except aiohttp.ClientError:
        raw = b""
    message, code = _error_fields(raw)
    body = _error_body(raw)
    if 300 <= response.status < 400:
        message = _redirect_message(response)
    elif not message:
        message = response.reason or "no message"
    return HTTPStatusError(
        response.status, message[:MAX_ERROR_MESSAGE], code=code,
        retry_after=parse_retry_after(response.headers),
        request_id=request_id_of(response), body=body,
    )


def _error_body(raw: bytes) -> dict[str, Any] | None:
    """An error answer's body for results.jsonl: a JSON object of at most 64 KiB, else None
    (the message and code still say what it was)."""
    if len(raw) > MAX_ERROR_BODY:
        return None
    try:
        data = fastjson.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or fastjson.unsendable(data) is not None:
        return None
    return data


def _redirect_message(response: aiohttp.ClientResponse) -> str:
    """Where a redirect points, and the base_url that would reach it without one."""
    location = response.headers.get("Location", "")
    try:
        target = response.url.join(yarl.URL(location)) if location else None
    except (ValueError, UnicodeError):
        target = None
    if target is None:
        return (f"the API answered HTTP {response.status} (a redirect) without a usable "
                "Location; batcher does not follow redirects: check base_url")
    # The endpoint asked for, e.g. /images/generations, is what base_url adds to the path.
    asked = response.url.path
    endpoint = next((e for e in _ENDPOINTS if asked.endswith(e)), "")
    where = target.with_query(None).with_fragment(None)
    if endpoint and where.path.endswith(endpoint):
        base = str(where.with_path(where.path[: -len(endpoint)]))
        return (f"the API redirects to {where}; batcher does not follow redirects: "
                f"set base_url to {base.rstrip('/')}")
    return f"the API redirects to {where}; batcher does not follow redirects: check base_url"


_ENDPOINTS = ("/images/generations", "/chat/completions", "/models")


def _error_fields(raw: bytes) -> tuple[str, str | None]:
    try:
        data = fastjson.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:200], None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return str(error.get("message") or ""), None if code is None else str(code)
    if isinstance(error, str):
        return error, None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"], None
    return "", None


def parse_image_answer(data: Any) -> ImageAnswer:
    """Check an images/generations answer; a missing or empty ``data`` is a retryable error."""
    if not isinstance(data, dict):
        raise ResponseError(f"the answer is not a JSON object: {_show(data)}",
                            reason="bad_response")
    items = data.get("data")
    if not isinstance(items, list) or not items:
        raise ResponseError("the answer holds no images (empty or missing data)",
                            reason="empty_data")
    images = []
    for item in items:
        b64 = item.get("b64_json") if isinstance(item, dict) else None
        url = item.get("url") if isinstance(item, dict) else None
        if isinstance(b64, str) and b64:
            images.append(ImageItem(b64=b64))
        elif isinstance(url, str) and url:
            images.append(ImageItem(url=url))
        else:
            raise ResponseError("an image item has neither b64_json nor url", reason="bad_item")
    # The body kept for results.jsonl: every item's fields but the image bytes themselves.
    stripped = {**data, "data": [{k: v for k, v in item.items() if k != "b64_json"}
                                 for item in items]}
    return ImageAnswer(tuple(images), _kept(stripped), _usage(data))


def parse_chat_answer(data: Any) -> ChatAnswer:
    """Check a chat completion; a missing message content is a retryable error."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise ResponseError("the completion has no choices[0].message.content",
                            reason="bad_response")
    return ChatAnswer(text=content, body=_kept(data), usage=_usage(data))
