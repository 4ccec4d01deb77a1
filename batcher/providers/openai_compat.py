"""The OpenAI-compatible client: images/generations, chat/completions and models over aiohttp.

This is the single place where aiohttp and JSON failures become batcher's
:class:`~batcher.errors.ProviderError` family; every answer is read with the provider's
``max_response_bytes`` cap (decoded bytes), and :mod:`batcher.providers.answers` checks what
it holds. The API key travels only in the requests this
client makes to its own base URL; redirects are never followed, so it cannot leak elsewhere.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import yarl
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError

from batcher import fastjson
from batcher.backoff import parse_retry_after
from batcher.errors import HTTPStatusError, ResponseError, TransportError
from batcher.providers.answers import (
    Stream,
    decode_json,
    parse_chat_answer,
    parse_image_answer,
    stream_chunk,
)
from batcher.providers.base import ChatAnswer, ImageAnswer
from batcher.providers.config import ProviderConfig

MAX_ERROR_MESSAGE = 500
MAX_ERROR_BODY = 64 * 1024
READ_CHUNK = 256 * 1024
ACCEPTED_ENCODINGS = "gzip, deflate"
_DECODED = {"", "identity", "gzip", "deflate"}  # what aiohttp inflates without extras
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
        # Only the encodings batcher can decode (aiohttp would offer br with a brotli package).
        self._headers = {"Accept-Encoding": ACCEPTED_ENCODINGS,
                         **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        # The connection has connect_timeout; the answer has timeout from the moment the
        # connection opened (see AnswerClock). One timer over both would fire while connecting
        # when timeout < connect_timeout, and a connection that never opened (free) would be
        # taken for an answer that never came.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_connect=config.connect_timeout,
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
            data = decode_json(await read_capped(response, self._cap))
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
            async with AnswerClock(self.config.timeout, self.config.connect_timeout) as clock, \
                    self._session.request(
                        method, self.base_url + path, data=data, headers=headers,
                        timeout=self._timeout, allow_redirects=False, trace_request_ctx=clock,
                    ) as response:
                if response.status >= 300:
                    error = await _status_error(response, sent=body or {})
                    if self._key:  # a provider may echo the key back in its message
                        error.message = error.message.replace(self._key, "[api key]")
                        if self._key in fastjson.dumps(error.body):
                            error.body = None  # results.jsonl then shows the scrubbed message
                    raise error
                _check_encoding(response)
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
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            if _undecodable(exc):
                raise _bad_encoding(str(exc.__cause__ or exc)[:200]) from exc
            if isinstance(exc, aiohttp.ClientResponseError):
                raise TransportError(f"connection failed: {exc}", reason="connection") from exc
            raise TransportError(f"the answer was cut short: {exc}", reason="truncated") from exc
        except aiohttp.ClientConnectorError as exc:  # before any byte was sent
            raise TransportError(f"connection failed: {exc}", reason="connection",
                                 reached=False) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"connection failed: {exc}", reason="connection") from exc

    async def _post_json(self, path: str, body: Mapping[str, Any]) -> tuple[Any, str | None]:
        """The decoded answer and its request id."""
        async with self._request("POST", path, body) as response:
            return decode_json(await read_capped(response, self._cap)), request_id_of(response)

    async def _stream_chat(self, body: Mapping[str, Any]) -> ChatAnswer:
        async with self._request("POST", "/chat/completions", body) as response:
            request_id = request_id_of(response)
            blocks = response.content.iter_chunked(READ_CHUNK)
            head = await _first_bytes(blocks, self._cap)
            if _is_whole_json(response, head):
                # Some compatible servers ignore "stream": a whole completion is as good.
                data = decode_json(await _read_rest(blocks, head, self._cap))
                return replace(parse_chat_answer(data), request_id=request_id)
            stream = Stream()
            try:
                async for payload in _events(blocks, head, self._cap):
                    if payload == b"[DONE]":
                        stream.finished = True
                        break
                    stream.add(stream_chunk(decode_json(payload)))
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                if not stream.whole:
                    raise TransportError(f"the stream broke off: {exc}",
                                         reason="truncated") from exc
        return replace(stream.answer(), request_id=request_id)


class AnswerClock:
    """The answer timer of one request: ``timeout`` seconds from the moment its connection
    opened (a session traced by :func:`connection_tracing` says when). Without that trace it
    runs ``timeout + connect_timeout`` from the start, so the connect timer, which alone marks a
    connection that never opened, still fires first."""

    def __init__(self, timeout: float, connect_timeout: float) -> None:
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._timer: asyncio.Timeout | None = None

    async def __aenter__(self) -> AnswerClock:
        loop = asyncio.get_running_loop()
        self._timer = asyncio.timeout(loop.time() + self._timeout + self._connect_timeout)
        await self._timer.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._timer is not None
        await self._timer.__aexit__(*exc)

    def connected(self) -> None:
        """The connection is open (new or reused): the answer has ``timeout`` from now."""
        if self._timer is not None:
            self._timer.reschedule(asyncio.get_running_loop().time() + self._timeout)


def connection_tracing() -> aiohttp.TraceConfig:
    """A trace for the API session: it tells each request's :class:`AnswerClock` when its
    connection opened."""
    trace = aiohttp.TraceConfig()

    async def opened(_session: aiohttp.ClientSession, context: Any, _params: Any) -> None:
        clock = context.trace_request_ctx
        if isinstance(clock, AnswerClock):
            clock.connected()

    trace.on_connection_create_end.append(opened)
    trace.on_connection_reuseconn.append(opened)
    return trace


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The answer's body, decoded (gzip inflated), refused once it passes ``cap`` bytes: the
    read stops there, so a huge or highly compressed answer never takes more memory."""
    length = response.content_length
    encoded = response.headers.get("Content-Encoding")
    if length is not None and not encoded:
        if length > cap:
            raise _too_large(cap)
        # The parser stops at the length: read at once (a chat answer, most image answers).
        return await response.read()
    return await _read_rest(response.content.iter_chunked(READ_CHUNK), b"", cap)


async def _read_rest(blocks: AsyncIterator[bytes], head: bytes, cap: int) -> bytes:
    """``head`` and the rest of ``blocks``, refused once past ``cap`` bytes."""
    body = bytearray(head)
    async for block in blocks:
        if len(body) + len(block) > cap:
            raise _too_large(cap)
        body += block
    return bytes(body)


async def _first_bytes(blocks: AsyncIterator[bytes], cap: int) -> bytes:
    """The start of an answer, up to its first byte that is not white space (or its end)."""
    head = bytearray()
    async for block in blocks:
        head += block
        if len(head) > cap:
            raise _too_large(cap)
        if head.strip():
            break
    return bytes(head)


def _check_encoding(response: aiohttp.ClientResponse) -> None:
    """An answer in a Content-Encoding batcher did not ask for and cannot decode is a bad
    answer (the same request would get the same), never a broken connection."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _DECODED:
        raise _bad_encoding(f"Content-Encoding {encoding[:40]!r}")


def _undecodable(exc: aiohttp.ClientError) -> bool:
    """Whether aiohttp failed on the answer's Content-Encoding (its own parser names it)."""
    cause = exc.__cause__
    return isinstance(cause, ContentEncodingError) or (
        isinstance(cause, HttpProcessingError) and "content-encoding" in str(cause).lower())


def _bad_encoding(what: str) -> ResponseError:
    return ResponseError(f"the answer is in an encoding batcher cannot decode ({what}); it "
                         f"asks for {ACCEPTED_ENCODINGS} only", reason="bad_encoding")


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


def _is_whole_json(response: aiohttp.ClientResponse, head: bytes) -> bool:
    """Whether a streamed request got a whole JSON answer rather than server-sent events: its
    Content-Type says JSON, or (whatever it says) the answer starts with ``{``, which no
    event stream does."""
    return "json" in response.content_type.lower() or head.lstrip()[:1] == b"{"


async def _events(blocks: AsyncIterator[bytes], head: bytes, cap: int) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream, at most ``cap`` bytes in all (a
    line longer than that included). An event's data lines are joined with a newline (a JSON
    chunk may be spread over several); a ``data:`` line that starts a new JSON object after a
    whole one ends the event before it, for servers that leave out the blank line."""
    pending = bytearray()
    event: list[bytes] = []
    read = 0

    def lines_of(text: bytes) -> Iterator[bytes | None]:
        """Each event's payload once it ends (``None``: nothing ended)."""
        for raw in text.split(b"\n"):
            line = raw.strip()
            if not line:  # a blank line ends the event
                yield _dispatch(event)
                continue
            value = _data(line)
            if value is None:
                continue  # a comment, an event name, an id: nothing batcher reads
            if event and value[:1] in (b"{", b"[") and _whole_json(b"\n".join(event)):
                yield _dispatch(event)
            event.append(value)

    async for block in _with_head(blocks, head):
        read += len(block)
        if read > cap:
            raise _too_large(cap)
        pending += block
        if b"\n" not in block:
            continue  # a long line grows in place until its end comes
        *complete, rest = bytes(pending).split(b"\n")
        pending = bytearray(rest)
        for payload in lines_of(b"\n".join(complete)):
            if payload is not None:
                yield payload
    for payload in lines_of(bytes(pending)):
        if payload is not None:
            yield payload
    if (payload := _dispatch(event)) is not None:
        yield payload


async def _with_head(blocks: AsyncIterator[bytes], head: bytes) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for block in blocks:
        yield block


def _dispatch(event: list[bytes]) -> bytes | None:
    """The payload of the event ``event`` holds (emptied), ``None`` when it held no data."""
    if not event:
        return None
    payload = b"\n".join(event).strip()
    event.clear()
    return payload


def _whole_json(payload: bytes) -> bool:
    try:
        fastjson.loads(payload)
    except ValueError:
        return False
    return True


def _data(line: bytes) -> bytes | None:
    """A ``data:`` line's value (one space after the colon taken off), else ``None``."""
    if not line.startswith(b"data:"):
        return None
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


def request_id_of(response: aiohttp.ClientResponse) -> str | None:
    """The provider's ``x-request-id`` header (OpenAI's name for it), cut to a sane length."""
    value = response.headers.get("x-request-id", "").strip()
    return value[:200] or None


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


__all__ = ["AnswerClock", "OpenAICompatible", "connection_tracing", "parse_chat_answer",
           "parse_image_answer", "read_capped"]
