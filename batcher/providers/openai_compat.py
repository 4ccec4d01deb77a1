"""The OpenAI-compatible client: images/generations, chat/completions and models over aiohttp.

This is the single place where aiohttp and JSON failures become batcher's
:class:`~batcher.errors.ProviderError` family. The API key travels only in the requests this
client makes to its own base URL; redirects are never followed, so it cannot leak elsewhere.
"""

from __future__ import annotations

import re
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
READ_CHUNK = 256 * 1024
MAX_CHOICES = 128  # a streamed choice index beyond this is a bad answer, not a list to fill
# An image sent as a data URI (Modelverse's b64_json): the base64 after the comma is the image.
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
# A Modelverse error names its request id in error.param; a field name is not one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{7,199}")


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
        self._cap = config.max_response_bytes

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
            data = _decode_json(await read_capped(response, self._cap))
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
                    error = await _status_error(response, sent=body or {})
                    if self._key:  # a provider may echo the key back in its message
                        error.message = error.message.replace(self._key, "[api key]")
                        if self._key in fastjson.dumps(error.body):
                            error.body = None  # results.jsonl then shows the scrubbed message
                    raise error
                yield response
        except aiohttp.ConnectionTimeoutError as exc:  # the connection never opened: unsent
            raise TransportError(
                f"no connection within {self.config.connect_timeout:g} s", reason="connection",
                reached=False,
            ) from exc
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
            return _decode_json(await read_capped(response, self._cap)), request_id_of(response)

    async def _stream_chat(self, body: Mapping[str, Any]) -> ChatAnswer:
        async with self._request("POST", "/chat/completions", body) as response:
            request_id = request_id_of(response)
            if not _is_event_stream(response):
                # Some compatible servers ignore "stream": a whole completion is as good.
                data = _decode_json(await read_capped(response, self._cap))
                return replace(parse_chat_answer(data), request_id=request_id)
            stream = _Stream()
            try:
                async for payload in _events(response, self._cap):
                    if payload == b"[DONE]":
                        stream.finished = True
                        break
                    stream.add(_stream_chunk(_decode_json(payload)))
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise TransportError(f"the stream broke off: {exc}", reason="truncated") from exc
        return replace(stream.answer(), request_id=request_id)


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The answer's body, decoded (gzip inflated), refused once it passes ``cap`` bytes: the
    read stops there, so a huge or highly compressed answer never takes more memory."""
    length = response.content_length
    if length is not None and length > cap and not response.headers.get("Content-Encoding"):
        raise _too_large(cap)
    body = bytearray()
    async for block in response.content.iter_chunked(READ_CHUNK):
        if len(body) + len(block) > cap:
            raise _too_large(cap)
        body += block
    return bytes(body)


def _too_large(cap: int) -> ResponseError:
    return ResponseError(f"the answer is over max_response_bytes ({cap:,} bytes once decoded); "
                         "it was not read further", reason="too_large")


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of an (error) answer, the rest left unread."""
    body = bytearray()
    async for block in response.content.iter_chunked(READ_CHUNK):
        body += block[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    """Whether a streamed request got server-sent events (else a whole JSON answer)."""
    kind = response.content_type.lower()
    return kind == "text/event-stream" or "json" not in kind


async def _events(response: aiohttp.ClientResponse, cap: int) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream, at most ``cap`` bytes in all (a
    line longer than that included)."""
    pending = b""
    read = 0
    async for block in response.content.iter_chunked(READ_CHUNK):
        read += len(block)
        if read > cap:
            raise _too_large(cap)
        *lines, pending = (pending + block).split(b"\n")
        for raw_line in lines:
            line = raw_line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()
    line = pending.strip()
    if line.startswith(b"data:"):
        yield line[5:].strip()


class _Stream:
    """A streamed completion put together from its chunks, each choice by its ``index``."""

    def __init__(self) -> None:
        self.parts: dict[int, list[str]] = {}
        self.finish: dict[int, Any] = {}
        self.last: dict[str, Any] = {}
        self.usage: Any = None
        self.finished = False

    def add(self, chunk: dict[str, Any]) -> None:
        self.last = chunk
        self.usage = chunk.get("usage") or self.usage
        for index, text, finish in _delta_texts(chunk):
            self.parts.setdefault(index, [])
            if text:
                self.parts[index].append(text)
            if finish is not None:
                self.finish[index] = finish

    def answer(self) -> ChatAnswer:
        if not self.finished:
            raise TransportError("the stream ended without [DONE]", reason="truncated")
        if self.usage is not None and not isinstance(self.usage, dict):
            raise ResponseError("the stream's usage is not an object", reason="bad_response")
        count = max(self.parts, default=0) + 1
        texts = tuple("".join(self.parts.get(index, [])) for index in range(count))
        completion = {
            "id": self.last.get("id"), "object": "chat.completion",
            "model": self.last.get("model"),
            "choices": [{"index": index, "message": {"role": "assistant", "content": text},
                         "finish_reason": self.finish.get(index, "stop")}
                        for index, text in enumerate(texts)],
            "usage": self.usage,
        }
        return ChatAnswer(texts=texts, body=_kept(completion), usage=self.usage)


def request_id_of(response: aiohttp.ClientResponse) -> str | None:
    """The provider's ``x-request-id`` header (OpenAI's name for it), cut to a sane length."""
    value = response.headers.get("x-request-id", "").strip()
    return value[:200] or None


def _stream_chunk(chunk: Any) -> dict[str, Any]:
    if not isinstance(chunk, dict):
        raise ResponseError(f"a stream chunk is not an object: {_show(chunk)}",
                            reason="bad_response")
    return chunk


def _delta_texts(chunk: dict[str, Any]) -> list[tuple[int, str, Any]]:
    """(choice index, content piece, finish_reason) of one stream chunk; a chunk of another
    shape is a bad answer."""
    choices = chunk.get("choices")
    if choices is None:
        return []  # the usage chunk has no choices
    if not isinstance(choices, list):
        raise ResponseError("a stream chunk's choices is not a list", reason="bad_response")
    texts = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise ResponseError("a stream chunk's choice is not an object", reason="bad_response")
        index = _choice_index(choice, position)
        delta = choice.get("delta")
        if delta is None:
            texts.append((index, "", choice.get("finish_reason")))  # only a finish_reason
            continue
        if not isinstance(delta, dict):
            raise ResponseError("a stream chunk's choice has no delta object",
                                reason="bad_response")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise ResponseError("a stream chunk's delta.content is not a string",
                                reason="bad_response")
        texts.append((index, content or "", choice.get("finish_reason")))
    return texts


def _choice_index(choice: dict[str, Any], position: int) -> int:
    """A choice's ``index`` (its position where it has none)."""
    index = choice.get("index", position)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHOICES:
        raise ResponseError(f"a choice's index is not a count below {MAX_CHOICES}: "
                            f"{_show(index)}", reason="bad_response")
    return index


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


async def _status_error(
    response: aiohttp.ClientResponse, *, sent: Mapping[str, Any]
) -> HTTPStatusError:
    """Turn a non-2xx answer into an error carrying the provider's own message and code; its
    request id is the ``x-request-id`` header, else (Modelverse) ``error.param`` where that
    names no field of the request ``sent``."""
    try:
        raw = await _read_at_most(response, MAX_ERROR_BODY + 1)
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
        request_id=request_id_of(response) or _param_request_id(body, sent), body=body,
    )


def _param_request_id(body: dict[str, Any] | None, sent: Mapping[str, Any]) -> str | None:
    """``error.param`` when it is a request id: an id-like string, not a field sent."""
    error = body.get("error") if body is not None else None
    param = error.get("param") if isinstance(error, dict) else None
    if not isinstance(param, str) or param in sent or not _REQUEST_ID.fullmatch(param):
        return None
    return param if any(char.isdigit() for char in param) else None


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
        if isinstance(b64, str) and (prefix := _DATA_URI.match(b64)):
            b64 = b64[prefix.end():]  # Modelverse sends data:image/png;base64,...
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
    """Check a chat completion: every choice's content, in ``index`` order; a missing message
    content is a retryable error."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ResponseError("the completion has no choices[0].message.content",
                            reason="bad_response")
    texts: dict[int, str] = {}
    for position, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise ResponseError(f"the completion has no choices[{position}].message.content",
                                reason="bad_response")
        index = _choice_index(choice, position)
        if index in texts:
            raise ResponseError(f"two choices have index {index}", reason="bad_response")
        texts[index] = content
    ordered = tuple(texts.get(index, "") for index in range(max(texts) + 1))
    return ChatAnswer(texts=ordered, body=_kept(data), usage=_usage(data))
