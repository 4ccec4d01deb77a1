"""What an OpenAI-compatible answer must hold: images (bare base64 or a data URI, or a URL),
chat completions with every choice that has content, in ``index`` order, and a streamed
completion put together from its chunks. Each check raises a
:class:`~batcher.errors.ResponseError` naming what was wrong (carrying the answer's ``usage``,
so a paid answer is charged by it); nothing here touches the network.

A paid answer's good parts are kept: a choice without content (a content filter, a tool call)
or an image item without a payload is left out, and the answer fails only when nothing of it
is usable.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from batcher import fastjson
from batcher.errors import ResponseError, TransportError
from batcher.providers.base import ChatAnswer, ImageAnswer, ImageItem

_Answer = TypeVar("_Answer")

MAX_CHOICES = 128  # a choice index beyond this is a bad answer, not a list to fill
# An image sent as a data URI (RFC 2397; Modelverse's b64_json): any media type and parameters
# before the comma (the bytes are checked to be an image when saved).
_DATA_URI = re.compile(r"\s*data:([^,]*),", re.IGNORECASE)


class Stream:
    """A streamed completion put together from its chunks, each choice by its ``index``."""

    def __init__(self) -> None:
        self.parts: dict[int, list[str]] = {}
        self.finish: dict[int, Any] = {}
        self.last: dict[str, Any] = {}
        self.usage: Any = None
        self.finished = False
        self.closing = False  # the usage chunk (usage, no choices) came: the last one sent

    def add(self, chunk: dict[str, Any]) -> None:
        self.last = chunk
        self.usage = chunk.get("usage") or self.usage
        if isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
            self.closing = True
        for index, text, finish in _delta_texts(chunk):
            self.parts.setdefault(index, [])
            if text:
                self.parts[index].append(text)
            if finish is not None:
                self.finish[index] = finish

    @property
    def whole(self) -> bool:
        """Whether the stream holds a whole completion: it ended with ``[DONE]``, or without
        it once every choice had its ``finish_reason`` or the usage chunk (usage and no
        choices: the last one a provider sends) had come. A usage object inside every chunk
        (as some servers send) does not end a stream."""
        if self.finished:
            return True
        if not self.parts:
            return False
        return all(index in self.finish for index in self.parts) or self.closing

    def answer(self) -> ChatAnswer:
        if not self.whole:
            raise TransportError("the stream ended without [DONE]", reason="truncated")
        if self.usage is not None and not isinstance(self.usage, dict):
            raise ResponseError("the stream's usage is not an object", reason="bad_response")
        indices = sorted(self.parts)  # the choices present, densely: files -1 .. -k
        texts = tuple("".join(self.parts[index]) for index in indices)
        if not texts:
            raise ResponseError("the stream holds no choice", reason="bad_response",
                                usage=self.usage)
        completion = {
            "id": self.last.get("id"), "object": "chat.completion",
            "model": self.last.get("model"),
            "choices": [{"index": index, "message": {"role": "assistant", "content": text},
                         "finish_reason": self.finish.get(index, "stop")}
                        for index, text in zip(indices, texts, strict=True)],
            "usage": self.usage,
        }
        return ChatAnswer(texts=texts, body=_kept(completion), usage=self.usage)


def stream_chunk(chunk: Any) -> dict[str, Any]:
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
        index = _choice_index(choice)
        index = position if index is None else index
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


def _choice_index(choice: dict[str, Any]) -> int | None:
    """A choice's ``index``: a count below :data:`MAX_CHOICES` (written as a number or a
    string of digits); ``None`` when it has none or another one."""
    index = choice.get("index")
    if isinstance(index, str) and index.isascii() and index.isdigit():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHOICES:
        return None
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


def paid_usage(data: Any) -> dict[str, Any] | None:
    """An answer's ``usage`` where it is an object, whatever else is wrong with the answer."""
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None


def decode_json(raw: bytes) -> Any:
    try:
        return fastjson.loads(raw)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ResponseError(
            f"the answer is not JSON: {raw[:80]!r}", reason="bad_json"
        ) from exc


def image_base64(value: str) -> str:
    """The base64 of an image sent as bare base64 or as a data URI (any media type and
    parameters; a data URI without ``;base64`` is percent-encoded bytes), ASCII whitespace
    (line wrapping) taken out."""
    found = _DATA_URI.match(value)
    if found is None:
        return "".join(value.split())
    payload = value[found.end():]
    if found.group(1).lower().replace(" ", "").endswith(";base64"):
        return "".join(payload.split())
    return base64.b64encode(urllib.parse.unquote_to_bytes(payload.strip())).decode("ascii")


def is_data_uri(value: str) -> bool:
    return _DATA_URI.match(value) is not None


def _image_item(item: Any) -> ImageItem:
    """One image of an answer: its ``b64_json`` (bare or a data URI), else its ``url`` (a data
    URI there is decoded, never fetched); an item with neither is kept empty, and fails alone
    when saved."""
    b64 = item.get("b64_json") if isinstance(item, dict) else None
    url = item.get("url") if isinstance(item, dict) else None
    if isinstance(b64, str) and (payload := image_base64(b64)):
        return ImageItem(b64=payload)
    if isinstance(url, str) and is_data_uri(url):
        return ImageItem(b64=image_base64(url))
    if isinstance(url, str) and url.strip():
        return ImageItem(url=url.strip())
    return ImageItem()


def _charged(parse: Callable[[Any], _Answer], data: Any) -> _Answer:
    """``parse(data)``; a :class:`ResponseError` it raises carries the answer's paid usage."""
    try:
        return parse(data)
    except ResponseError as exc:
        exc.usage = paid_usage(data)
        raise


def parse_image_answer(data: Any) -> ImageAnswer:
    """Check an images/generations answer; a missing or empty ``data``, or one without any
    image, is a retryable error."""
    return _charged(_parse_image_answer, data)


def _parse_image_answer(data: Any) -> ImageAnswer:
    if not isinstance(data, dict):
        raise ResponseError(f"the answer is not a JSON object: {_show(data)}",
                            reason="bad_response")
    items = data.get("data")
    if not isinstance(items, list) or not items:
        raise ResponseError("the answer holds no images (empty or missing data)",
                            reason="empty_data")
    images = tuple(_image_item(item) for item in items)
    if all(image.b64 is None and image.url is None for image in images):
        raise ResponseError("no image item has b64_json or url", reason="bad_item")
    # The body kept for results.jsonl: every item's fields but the image bytes themselves.
    stripped = {**data, "data": [_without_payload(item) for item in items]}
    return ImageAnswer(images, _kept(stripped), _usage(data))


def _without_payload(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    return {key: value for key, value in item.items() if key != "b64_json"
            and not (key == "url" and isinstance(value, str) and is_data_uri(value))}


def parse_chat_answer(data: Any) -> ChatAnswer:
    """Check a chat completion: the content of every choice that has one, in ``index`` order
    (in the order sent when the indices are missing, repeated or not counts); an answer with
    no choice content at all is a retryable error."""
    return _charged(_parse_chat_answer, data)


def _parse_chat_answer(data: Any) -> ChatAnswer:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ResponseError("the completion has no choices[0].message.content",
                            reason="bad_response")
    found: list[tuple[int | None, str | None]] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        index = _choice_index(choice) if isinstance(choice, dict) else None
        found.append((index, content if isinstance(content, str) else None))
    indices = [index for index, _content in found]
    if None not in indices and len(set(indices)) == len(indices):
        found.sort(key=lambda pair: pair[0] or 0)
    texts = tuple(content for _index, content in found if content is not None)
    if not texts:
        raise ResponseError("the completion has no choice with a message.content",
                            reason="bad_response")
    return ChatAnswer(texts=texts, body=_kept(data), usage=_usage(data))
