"""The built-in server, over real HTTP on 127.0.0.1: answers, validation, limits and faults."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import struct
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from batcher.imagegen import image_kind, render_png
from batcher.server import LocalServer, ServerOptions, canonical_hash, serve_forever
from batcher.server import app as server_app

IMAGES = "/images/generations"
CHAT = "/chat/completions"
EDIT_MODEL = "black-forest-labs/flux-kontext-max/multi"

MakeServer = Callable[..., Awaitable[LocalServer]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession, server: LocalServer, path: str, body: Any, **kwargs: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with session.post(server.api_url + path, json=body, **kwargs) as response:
        text = await response.text()
        return response.status, json.loads(text), response


def image_body(prompt: str | None = "a hedgehog eating a burger", **extra: Any) -> dict[str, Any]:
    return {"model": "flux.1-schnell", "prompt": prompt, "response_format": "b64_json", **extra}


def chat_body(prompt: str = "Write a caption for a poster of Tokyo", **extra: Any) -> dict:
    messages = [
        {"role": "system", "content": "You write one-line captions."},
        {"role": "user", "content": prompt},
    ]
    return {"model": "llama-3.1-8b-instruct", "messages": messages, **extra}


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Parse a PNG by hand: (width, height, raw scanlines); fails on anything malformed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + payload) == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", payload[:8])
            assert payload[8:10] == b"\x08\x02"  # 8-bit RGB
        elif kind == b"IDAT":
            idat += payload
        pos += 12 + length
    width, height = size
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


async def b64_image(
    session: aiohttp.ClientSession, server: LocalServer, body: dict, headers: Any = None
) -> bytes:
    status, answer, _ = await post(session, server, IMAGES, body, headers=headers)
    assert status == 200, answer
    b64 = answer["data"][0]["b64_json"]
    if body.get("model") == EDIT_MODEL:  # Modelverse's documented shape: a data URI
        assert b64.startswith("data:image/png;base64,") and answer["data"][0]["url"]
        b64 = b64.partition(",")[2]
    return base64.b64decode(b64, validate=True)


# --- images -------------------------------------------------------------------------------------


async def test_models_lists_image_and_chat_models(server_factory, session):
    server = await server_factory()
    async with session.get(server.api_url + "/models") as response:
        answer = await response.json()
    assert response.status == 200 and answer["object"] == "list"
    ids = {model["id"] for model in answer["data"]}
    assert {"flux.1-schnell", EDIT_MODEL, "local-image", "llama-3.1-405b-instruct"} <= ids
    assert {"local-chat", "mixtral-8x7b-32768", "stable-diffusion-3.5-medium"} <= ids
    assert all(m["object"] == "model" and m["owned_by"] == "batcher-local" for m in answer["data"])


@pytest.mark.parametrize("size", ["256x256", "512x512", "1024x1024"])
async def test_b64_image_is_a_png_of_the_requested_size(server_factory, session, size):
    server = await server_factory()
    png = await b64_image(session, server, image_body(size=size))
    width, height, raw = decode_png(png)
    assert f"{width}x{height}" == size
    first_row, last_row = raw[1 : 1 + 3 * width], raw[-3 * width :]
    assert first_row != last_row  # a gradient, not one flat colour


async def test_images_are_deterministic_and_differ_by_prompt_model_and_seed(
    server_factory, session
):
    server = await server_factory()
    base = image_body(size="256x256", seed=1)
    first = await b64_image(session, server, base)
    assert await b64_image(session, server, dict(base)) == first
    variants = [
        {**base, "prompt": "a cat in Tokyo"},
        {**base, "model": "flux.1-dev"},
        {**base, "seed": 2},
    ]
    images = [await b64_image(session, server, body) for body in variants]
    assert len({first, *images}) == 4


async def test_n_images_are_distinct(server_factory, session):
    server = await server_factory()
    status, answer, _ = await post(session, server, IMAGES, image_body(n=3, size="256x256"))
    assert status == 200 and len(answer["data"]) == 3
    assert isinstance(answer["created"], int)
    assert len({item["b64_json"] for item in answer["data"]}) == 3


async def test_image_side_is_capped(server_factory, session):
    server = await server_factory(max_image_side=300)
    png = await b64_image(session, server, image_body(size="1024x1024"))
    assert decode_png(png)[:2] == (300, 300)


async def test_url_image_comes_from_the_files_listener_without_a_key(server_factory, session):
    server = await server_factory(api_key="sk-test")
    headers = {"Authorization": "Bearer sk-test"}
    body = {"model": "stable-diffusion-3.5-medium", "prompt": "a lighthouse", "size": "512x512"}
    status, answer, _ = await post(session, server, IMAGES, body, headers=headers)
    assert status == 200
    url = answer["data"][0]["url"]
    assert url.startswith(server.files_url + "/images/") and url.endswith(".png")
    assert server.files_url.split(":")[-1] != server.api_url.split(":")[-1].split("/")[0]
    async with session.get(url) as response:  # no Authorization header
        assert response.status == 200 and response.content_type == "image/png"
        png = await response.read()
    assert decode_png(png)[:2] == (512, 512)
    same = await b64_image(session, server, {**body, "response_format": "b64_json"}, headers)
    assert same == png
    fetch = server.stats.matching(".png", listener="files")
    assert [(r.method, r.status, r.authorization) for r in fetch] == [("GET", 200, None)]
    async with session.get(server.files_url + "/images/" + "0" * 32 + ".png") as response:
        assert response.status == 404


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def test_edit_model_takes_input_images_and_aspect_ratio(server_factory, session):
    server = await server_factory()
    picture = render_png("input", 64, 64)
    body = image_body(model=EDIT_MODEL, prompt="make it blue", aspect_ratio="16:9", seed=7)
    body["images"] = [data_uri(picture), "https://example.com/b.jpg"]
    edited = await b64_image(session, server, body)
    assert decode_png(edited)[:2] == (1024, 576)
    other_input = {**body, "images": [data_uri(render_png("other", 64, 64))]}
    assert await b64_image(session, server, other_input) != edited
    tall = await b64_image(session, server, {**body, "aspect_ratio": "9:16"})
    assert decode_png(tall)[:2] == (576, 1024)


PNG_URI = data_uri(render_png("input", 8, 8))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (image_body(prompt=""), "prompt"),
        (image_body(prompt=None), "prompt"),
        (image_body(n=5), "n"),
        (image_body(n=0), "n"),
        (image_body(n="2"), "n"),
        (image_body(size="300x300"), "size"),
        (image_body(model="flux.2-imaginary"), "model"),
        ({"prompt": "no model"}, "model"),
        (image_body(model="llama-3.1-8b-instruct"), "model"),
        (image_body(response_format="png"), "response_format"),
        (image_body(seed="7"), "seed"),
        (image_body(steps=51), "steps"),
        (image_body(guidance_scale=0.5), "guidance_scale"),
        (image_body(model=EDIT_MODEL), "images"),
        (image_body(model=EDIT_MODEL, images=[]), "images"),
        (image_body(model=EDIT_MODEL, images=["data:image/png;base64,not-base64!"]), "images"),
        (image_body(model=EDIT_MODEL, images=[data_uri(b"just text, no image")]), "images"),
        (image_body(model=EDIT_MODEL, images=["ftp://example.com/a.png"]), "images"),
        (image_body(model=EDIT_MODEL, images=[PNG_URI], aspect_ratio="wide"), "aspect_ratio"),
        (image_body(model=EDIT_MODEL, images=[PNG_URI], aspect_ratio="9:1"), "aspect_ratio"),
    ],
)
async def test_invalid_image_requests_are_400_with_the_field(server_factory, session, body, param):
    server = await server_factory()
    status, answer, _ = await post(session, server, IMAGES, body)
    assert status == 400
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and error["code"]
    assert not server.stats.generations


async def test_unknown_fields_are_ignored(server_factory, session):
    server = await server_factory()
    png = await b64_image(session, server, image_body(size="256x256", style="vivid", user="me"))
    assert image_kind(png) == "png"


async def test_body_that_is_not_a_json_object_is_400(server_factory, session):
    server = await server_factory()
    for data in (b"{not json", b"[1, 2]"):
        async with session.post(server.api_url + IMAGES, data=data) as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_unknown_paths_are_404_in_the_openai_shape(server_factory, session):
    server = await server_factory()
    async with session.get(server.api_url + "/embeddings") as response:
        assert response.status == 404
        assert "error" in await response.json()
    async with session.get(server.api_url + IMAGES) as response:
        assert response.status == 405
        assert "error" in await response.json()


# --- keys, rate limit, quota --------------------------------------------------------------------


async def test_api_key_is_required_when_set(server_factory, session):
    server = await server_factory(api_key="sk-right")
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
        status, answer, _ = await post(session, server, IMAGES, image_body(), headers=headers)
        assert status == 401
        assert answer["error"]["code"] in ("missing_api_key", "invalid_api_key")
        async with session.get(server.api_url + "/models", headers=headers) as response:
            assert response.status == 401
    headers = {"Authorization": "Bearer sk-right"}
    status, _, _ = await post(session, server, IMAGES, image_body(size="256x256"), headers=headers)
    assert status == 200
    assert [r.authorization for r in server.stats.matching(IMAGES)][-1] == "Bearer sk-right"
    assert server.stats.statuses(IMAGES) == [401, 401, 401, 200]


async def test_rate_limit_is_a_rolling_window_over_arrivals(server_factory, session):
    server = await server_factory(rate_limit=(5, 1.0))
    bodies = [image_body(f"prompt {i}", size="256x256") for i in range(8)]
    results = await asyncio.gather(*(post(session, server, IMAGES, b) for b in bodies))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [429] * 3
    waits = []
    for status, answer, response in results:
        if status == 429:
            assert answer["error"]["code"] == "rate_limit_exceeded"
            waits.append(float(response.headers["Retry-After"]))
            assert 0 < waits[-1] <= 1.0
            assert int(response.headers["retry-after-ms"]) == pytest.approx(waits[-1] * 1000, 1)
    assert server.stats.rate_limited == 3
    assert len(server.stats.generations) == 5
    # Rejected arrivals do not count: once the window has moved on, there is room again.
    await asyncio.sleep(max(waits) + 0.05)
    status, _, _ = await post(session, server, IMAGES, bodies[0])
    assert status == 200


async def test_quota_exhausted_answers_429_insufficient_quota(server_factory, session):
    server = await server_factory(quota_exhausted=True)
    for path, body in ((IMAGES, image_body()), (CHAT, chat_body())):
        status, answer, _ = await post(session, server, path, body)
        assert status == 429
        assert answer["error"]["code"] == "insufficient_quota"
        assert "quota" in answer["error"]["message"]
    assert server.stats.rate_limited == 2 and not server.stats.generations


# --- chat ---------------------------------------------------------------------------------------


async def test_chat_is_deterministic_about_the_prompt_with_word_usage(server_factory, session):
    server = await server_factory()
    status, answer, _ = await post(session, server, CHAT, chat_body())
    assert status == 200
    assert answer["object"] == "chat.completion" and answer["model"] == "llama-3.1-8b-instruct"
    assert answer["id"].startswith("chatcmpl-") and isinstance(answer["created"], int)
    choice = answer["choices"][0]
    content = choice["message"]["content"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert "Write a caption for" in content
    usage = answer["usage"]
    assert usage["prompt_tokens"] == 4 + 8  # words in the system and user messages
    assert usage["completion_tokens"] == len(content.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    _, again, _ = await post(session, server, CHAT, chat_body())
    assert again["choices"][0]["message"]["content"] == content
    _, other, _ = await post(session, server, CHAT, chat_body(seed=3))
    _, other_model, _ = await post(session, server, CHAT, chat_body(model="local-chat"))
    texts = {content, other["choices"][0]["message"]["content"]}
    texts.add(other_model["choices"][0]["message"]["content"])
    assert len(texts) == 3


async def test_chat_max_tokens_truncates_to_that_many_words(server_factory, session):
    server = await server_factory()
    status, answer, _ = await post(session, server, CHAT, chat_body(max_tokens=4))
    assert status == 200
    assert len(answer["choices"][0]["message"]["content"].split()) == 4
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(messages=[]), "messages"),
        (chat_body(messages=[{"content": "no role"}]), "messages"),
        (chat_body(messages=["hello"]), "messages"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(temperature=2.5), "temperature"),
        (chat_body(model="flux.1-dev"), "model"),
        (chat_body(stream="yes"), "stream"),
    ],
)
async def test_invalid_chat_requests_are_400_with_the_field(server_factory, session, body, param):
    server = await server_factory()
    status, answer, _ = await post(session, server, CHAT, body)
    assert status == 400 and answer["error"]["param"] == param


async def read_stream(response: aiohttp.ClientResponse) -> list[Any]:
    assert response.content_type == "text/event-stream"
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events


async def test_chat_stream_assembles_the_same_text(server_factory, session):
    server = await server_factory()
    _, plain, _ = await post(session, server, CHAT, chat_body(seed=5))
    async with session.post(server.api_url + CHAT, json=chat_body(seed=5, stream=True)) as resp:
        assert resp.status == 200
        events = await read_stream(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) >= 3
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == plain["usage"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --- faults -------------------------------------------------------------------------------------


async def observe_image_fault(session, server, kind: str, body: dict) -> None:  # noqa: ANN001
    """Send ``body`` once and check that the client sees fault ``kind``."""
    url = server.api_url + IMAGES
    if kind == "reset":
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(url, json=body)
        return
    if kind == "slow":
        with pytest.raises(asyncio.TimeoutError):
            await session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=0.3))
        return
    async with session.post(url, json=body) as response:
        if kind in ("500", "502", "503", "429"):
            assert response.status == int(kind)
            assert "error" in await response.json()
            if kind == "429":
                assert float(response.headers["Retry-After"]) == pytest.approx(0.2)
            return
        assert response.status == 200
        if kind == "truncated":
            assert response.content_length is not None
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
            return
        text = await response.text()
    if kind == "garbage":
        with pytest.raises(ValueError):
            json.loads(text)
        return
    data = json.loads(text)["data"]
    if kind == "empty_data":
        assert data == []
    elif kind == "bad_b64":
        with pytest.raises(binascii.Error):
            base64.b64decode(data[0]["b64_json"], validate=True)
    else:
        async with session.get(data[0]["url"]) as download:
            if kind == "url_404":
                assert download.status == 404
            else:
                assert kind == "not_image" and download.status == 200
                assert image_kind(await download.read()) is None


@pytest.mark.parametrize("kind", server_app.FAULT_KINDS)
async def test_each_fault_is_seen_once_then_the_retry_succeeds(
    server_factory, session, monkeypatch, kind
):
    monkeypatch.setattr(server_app, "SLOW_FAULT_SECONDS", 1.0)  # where _fate reads it
    server = await server_factory(fault_rate=1.0, fault_kinds=(kind,))
    url_kinds = ("url_404", "not_image")
    body = image_body(size="256x256", response_format="url" if kind in url_kinds else "b64_json")
    await observe_image_fault(session, server, kind, body)
    status, answer, _ = await post(session, server, IMAGES, body)
    assert status == 200
    item = answer["data"][0]
    if "url" in item:
        async with session.get(item["url"]) as download:
            assert image_kind(await download.read()) == "png"
    else:
        assert image_kind(base64.b64decode(item["b64_json"])) == "png"
    assert server.stats.faults == {kind: 1}
    assert server.stats.generations == {canonical_hash(json.dumps(body).encode()): 1}
    if kind == "reset":
        assert server.stats.statuses(IMAGES) == [0, 200]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["503", "reset", "truncated", "garbage", "empty_data"])
async def test_chat_faults_are_seen_once(server_factory, session, kind, stream):
    server = await server_factory(fault_rate=1.0, fault_kinds=(kind,))
    body = chat_body(stream=stream)
    url = server.api_url + CHAT
    if kind == "reset":
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(url, json=body)
    else:
        async with session.post(url, json=body) as response:
            if kind == "503":
                assert response.status == 503
            elif kind == "truncated":
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            elif kind == "garbage":
                with pytest.raises(ValueError):
                    json.loads(await response.text())
            else:
                assert (await response.json())["choices"] == []
    async with session.post(url, json=body) as response:
        assert response.status == 200
        text = await response.text()
    assert "caption" in text
    assert sum(server.stats.generations.values()) == 1


async def test_image_only_faults_become_garbage_for_chat(server_factory, session):
    server = await server_factory(fault_rate=1.0, fault_kinds=("url_404",))
    async with session.post(server.api_url + CHAT, json=chat_body()) as response:
        assert response.status == 200
        with pytest.raises(ValueError):
            json.loads(await response.text())
    assert server.stats.faults == {"garbage": 1}


async def test_faults_hit_a_fraction_of_bodies_chosen_by_their_hash(server_factory, session):
    options = {"fault_rate": 0.5, "fault_kinds": ("500", "503")}
    first, second = await server_factory(**options), await server_factory(**options)
    bodies = [chat_body(f"prompt number {i}") for i in range(40)]
    seen = []
    for server in (first, second):
        statuses = [(await post(session, server, CHAT, body))[0] for body in bodies]
        seen.append(statuses)
    assert seen[0] == seen[1]  # the same bodies fault on every server
    assert 5 < sum(status != 200 for status in seen[0]) < 35
    assert set(seen[0]) <= {200, 500, 503}
    retries = [(await post(session, first, CHAT, body))[0] for body in bodies]
    assert retries == [200] * 40


async def test_fail_rate_one_always_answers_500(server_factory, session):
    server = await server_factory(fail_rate=1.0)
    for _ in range(3):
        status, answer, _ = await post(session, server, IMAGES, image_body())
        assert status == 500
        assert answer["error"]["message"] == "injected permanent failure"
    assert not server.stats.generations


async def test_latency_delays_answers(server_factory, session):
    server = await server_factory(latency=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(post(session, server, CHAT, chat_body(f"p {i}")) for i in range(3)))
    elapsed = loop.time() - started
    assert elapsed >= 0.2  # every answer waited out the latency


# --- running it ---------------------------------------------------------------------------------


def test_start_in_thread_serves_synchronous_callers():
    server = LocalServer()
    server.start_in_thread()
    try:
        with urllib.request.urlopen(server.api_url + "/models", timeout=5) as response:
            assert json.load(response)["object"] == "list"
        request = urllib.request.Request(
            server.api_url + CHAT,
            data=json.dumps(chat_body()).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)["choices"][0]["message"]["content"]
    finally:
        server.stop_thread()
    assert [r.status for r in server.stats.requests] == [200, 200]
    with pytest.raises(OSError):
        urllib.request.urlopen(server.api_url + "/models", timeout=1)


async def test_serve_forever_announces_and_stops_when_cancelled(session):
    lines: list[str] = []
    announced = asyncio.Event()

    def announce(line: str) -> None:
        lines.append(line)
        announced.set()

    task = asyncio.create_task(serve_forever(ServerOptions(), announce=announce))
    await asyncio.wait_for(announced.wait(), 5)
    match = re.fullmatch(r"batcher serve: API at (\S+/v1) \(images at (\S+)\)", lines[0])
    assert match
    async with session.get(match[1] + "/models") as response:
        assert response.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        await session.get(match[1] + "/models")


# --- imagegen -----------------------------------------------------------------------------------


def test_render_png_is_deterministic_and_varied():
    first = render_png("a", 128, 96)
    assert render_png("a", 128, 96) == first
    assert render_png("b", 128, 96) != first
    width, height, raw = decode_png(first)
    assert (width, height) == (128, 96)
    rows = [raw[y * (1 + 3 * width) + 1 : (y + 1) * (1 + 3 * width)] for y in range(height)]
    colours = {row[i : i + 3] for row in rows for i in range(0, len(row), 3)}
    assert len(colours) > 10


def test_image_kind_reads_magic_bytes():
    assert image_kind(render_png("k", 4, 4)) == "png"
    assert image_kind(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert image_kind(b"GIF89a...") == "gif"
    assert image_kind(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert image_kind(b"<html>") is None
    assert image_kind(b"") is None
