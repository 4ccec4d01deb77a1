"""What an OpenAI-compatible answer must hold: images (bare base64 or a data URI, or a URL),
chat completions with every choice by its ``index``, and a streamed completion put together
from its chunks. Each check raises a :class:`~batcher.errors.ResponseError` naming what was
wrong; nothing here touches the network.
"""

from __future__ import annotations

import re
from typing import Any

from batcher import fastjson
from batcher.errors import ResponseError, TransportError
from batcher.providers.base import ChatAnswer, ImageAnswer, ImageItem

MAX_CHOICES = 128  # a choice index beyond this is a bad answer, not a list to fill
# An image sent as a data URI (Modelverse's b64_json): the base64 after the comma is the image.
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


class Stream:
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


def decode_json(raw: bytes) -> Any:
    try:
        return fastjson.loads(raw)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ResponseError(
            f"the answer is not JSON: {raw[:80]!r}", reason="bad_json"
        ) from exc


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
