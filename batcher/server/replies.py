"""What the local server answers to a chat request, as pure functions of the request: the
deterministic completion text and finish reason, the usage counts, the completion id and the
server-sent event chunks of a streamed answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

from batcher.server.requests import ChatRequest

# --- deterministic text (pure) -----------------------------------------------------------------

# fmt: off
_ADJECTIVES = (
    "amber", "bright", "calm", "distant", "gentle", "golden", "hidden", "quiet", "silver",
    "soft", "vivid", "warm", "wild", "early", "late", "small",
)
_NOUNS = (
    "harbour", "meadow", "river", "lantern", "window", "garden", "market", "street", "morning",
    "evening", "shadow", "light", "breeze", "journey", "moment", "story",
)
# fmt: on
_VERBS = ("glows", "drifts", "waits", "shines", "gathers", "settles", "rises", "turns")
_PREPOSITIONS = ("beside", "under", "beyond", "across", "near", "above", "through", "around")


def _draws(seed: bytes) -> Iterator[int]:
    """An endless stream of bytes derived from ``seed``, stable across Python versions."""
    for counter in range(1 << 62):
        yield from hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()


def chat_reply(request: ChatRequest, choice: int = 0) -> tuple[str, str]:
    """The completion text and finish_reason of choice ``choice``: fixed by model, messages,
    seed and the choice's index."""
    parts: list[Any] = [request.model, request.messages, request.seed]
    key = json.dumps(parts + [choice] if choice else parts).encode("utf-8")
    draws = _draws(hashlib.sha256(key).digest())

    def pick(words: tuple[str, ...]) -> str:
        return words[next(draws) % len(words)]

    user_texts = [text for role, text in request.messages if role == "user" and text.strip()]
    topic = " ".join(user_texts[-1].split()[:5]) if user_texts else "your message"
    text = (
        f'On "{topic}": the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS)} '
        f"{pick(_PREPOSITIONS)} the {pick(_ADJECTIVES)} {pick(_NOUNS)}."
    )
    if next(draws) % 2:
        text += (
            f" {pick(_ADJECTIVES).capitalize()} {pick(_NOUNS)} and {pick(_ADJECTIVES)} "
            f"{pick(_NOUNS)} {pick(_VERBS)} {pick(_PREPOSITIONS)} the {pick(_NOUNS)}."
        )
    words = text.split(" ")
    if request.max_tokens is not None and len(words) > request.max_tokens:
        return " ".join(words[: request.max_tokens]), "length"
    return text, "stop"


def chat_usage(request: ChatRequest, *contents: str) -> dict[str, int]:
    """Token counts, counted as whitespace-separated words, over every choice."""
    prompt = sum(len(text.split()) for _, text in request.messages)
    completion = sum(len(content.split()) for content in contents)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat_id(request: ChatRequest) -> str:
    key = json.dumps([request.model, request.messages, request.seed]).encode("utf-8")
    return "chatcmpl-" + hashlib.sha256(key).hexdigest()[:24]


def chat_choices(request: ChatRequest) -> list[tuple[str, str]]:
    """(content, finish_reason) of each of the request's ``n`` choices."""
    return [chat_reply(request, k) for k in range(request.n)]


def _pieces(content: str) -> list[str]:
    words = content.split(" ")
    return [("" if i == 0 else " ") + " ".join(words[i : i + 3])
            for i in range(0, len(words), 3)]


def _chat_events(request: ChatRequest) -> Iterator[bytes]:
    """Server-sent events: a role chunk per choice, the choices' content pieces interleaved
    (each chunk names its choice's ``index``), a finish chunk per choice, the last one with
    usage, [DONE]."""
    choices = chat_choices(request)
    pieces = [_pieces(content) for content, _ in choices]
    base = {
        "id": _chat_id(request),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
    }

    def event(k: int, delta: dict[str, str], finish: str | None, **extra: Any) -> bytes:
        choice = {"index": k, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n".encode()

    for k in range(request.n):
        yield event(k, {"role": "assistant", "content": ""}, None)
    for i in range(max(len(p) for p in pieces)):
        for k, own in enumerate(pieces):
            if i < len(own):
                yield event(k, {"content": own[i]}, None)
    usage = chat_usage(request, *(content for content, _ in choices))
    for k, (_, finish_reason) in enumerate(choices):
        last = k == request.n - 1
        yield event(k, {}, finish_reason, **({"usage": usage} if last else {}))
    yield b"data: [DONE]\n\n"
