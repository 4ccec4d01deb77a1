"""Chat: ``POST /v1/chat/completions`` answers deterministic text as one JSON completion or as a
server-sent event stream."""

from __future__ import annotations

import time
from functools import partial

from aiohttp import web

from batcher.server.faults import Answer, answer_with_fault
from batcher.server.generation import Generation
from batcher.server.replies import _chat_events, _chat_id, chat_choices, chat_usage
from batcher.server.requests import ChatRequest, parse_chat_request


class ChatEndpoint:
    """``POST /v1/chat/completions``."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    async def handle(self, request: web.Request) -> web.StreamResponse:
        chat_request = parse_chat_request(await self._generation.admit(request))
        fault = await self._generation.fate(request, "chat", "")
        if fault is not None:
            answer = partial(chat_answer, chat_request, fault)
            return await answer_with_fault(request, fault, answer)
        if chat_request.stream:
            response = await _stream_chat(request, chat_request)
        else:
            response = web.json_response(await chat_answer(chat_request, None))
        self._generation.answered(request)
        return response


async def chat_answer(request: ChatRequest, fault: str | None) -> Answer:
    """The completion JSON, or the whole event stream as bytes when streaming; ``fault``
    (``empty_data``) spoils it."""
    if request.stream and fault != "empty_data":
        return b"".join(_chat_events(request))
    answers = chat_choices(request)
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }
        for k, (content, finish_reason) in enumerate(answers)
    ]
    return {
        "id": _chat_id(request),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [] if fault == "empty_data" else choices,
        "usage": chat_usage(request, *(content for content, _ in answers)),
    }


async def _stream_chat(request: web.Request, chat_request: ChatRequest) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for chunk in _chat_events(chat_request):
        await response.write(chunk)
    await response.write_eof()
    return response
