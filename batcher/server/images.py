"""Images: ``POST /v1/images/generations`` answers deterministic PNGs, as ``b64_json`` or as
``url``s on the files listener, whose ``GET /images/<token>.png`` renders them on download.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import secrets
import time
from functools import partial
from typing import Any

from aiohttp import web

from batcher.imagegen import render_png
from batcher.server.faults import answer_with_fault
from batcher.server.generation import Generation
from batcher.server.options import ServerOptions
from batcher.server.requests import EDIT_MODELS, ImageRequest, parse_image_request

IMAGE_TOKENS_KEPT = 10_000
_NOT_IMAGE = None  # a files-listener token that serves text, for the "not_image" fault
_RenderSpec = tuple[str, int, int]  # (key, width, height)


class ImageFiles:
    """The files listener's images: tokens in a bounded LRU, each rendered when downloaded."""

    def __init__(self, options: ServerOptions) -> None:
        self._options = options
        self._images: collections.OrderedDict[str, _RenderSpec | None] = collections.OrderedDict()
        self.base_url: str | None = None  # ``http://HOST:PORT2``, set once the listener is bound

    def url(self, spec: _RenderSpec, fault: str | None) -> str:
        """Where the files listener serves ``spec`` (or the image-level ``fault``)."""
        return f"{self.base_url}/images/{self._token(spec, fault)}.png"

    def _token(self, spec: _RenderSpec, fault: str | None) -> str:
        """A files-listener token that serves ``spec``, remembered in a bounded LRU."""
        if fault == "url_404":
            return secrets.token_hex(16)  # never registered
        token = hashlib.sha256(f"{fault or 'image'}:{spec}".encode()).hexdigest()[:32]
        self._images[token] = _NOT_IMAGE if fault == "not_image" else spec
        self._images.move_to_end(token)
        while len(self._images) > IMAGE_TOKENS_KEPT:
            self._images.popitem(last=False)
        return token

    async def download(self, request: web.Request) -> web.Response:
        """``GET /images/<token>.png``."""
        token = request.match_info["token"]
        if self._options.download_status is not None:  # a host that refuses every download
            return web.Response(status=self._options.download_status, text="refused\n")
        if token not in self._images:
            raise web.HTTPNotFound(text="no such image (it may have expired)\n")
        self._images.move_to_end(token)
        spec = self._images[token]
        if spec is _NOT_IMAGE:
            return web.Response(text="this is not an image\n", content_type="text/plain")
        png = await asyncio.to_thread(render_png, *spec, grain=self._options.image_grain)
        return web.Response(body=png, content_type="image/png")


class ImageEndpoint:
    """``POST /v1/images/generations``."""

    def __init__(self, options: ServerOptions, generation: Generation, files: ImageFiles) -> None:
        self._options, self._generation, self._files = options, generation, files

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await self._generation.admit(request)
        image_request = parse_image_request(body, self._options.max_image_side)
        fault = await self._generation.fate(request, "images", image_request.response_format)
        if fault is not None:
            answer = partial(self._answer, image_request, fault)
            return await answer_with_fault(request, fault, answer)
        response = web.json_response(await self._answer(image_request, None))
        self._generation.answered(request)
        return response

    async def _answer(self, request: ImageRequest, fault: str | None) -> dict[str, Any]:
        """The generation's JSON; ``fault`` spoils it for the image-level faults."""
        items: list[dict[str, str]] = []
        for k in range(0 if fault == "empty_data" else request.n):
            spec = (request.key(k), request.width, request.height)
            if request.response_format == "url":
                items.append({"url": self._files.url(spec, fault)})
            elif fault == "bad_b64":
                items.append({"b64_json": "this is *not* base64!"})
            else:
                png = await asyncio.to_thread(render_png, *spec, grain=self._options.image_grain)
                items.append({"b64_json": base64.b64encode(png).decode("ascii")})
        if request.model in EDIT_MODELS:
            return self._modelverse_shape(request, items, fault)
        return {"created": int(time.time()), "data": items}

    def _modelverse_shape(
        self, request: ImageRequest, items: list[dict[str, str]], fault: str | None
    ) -> dict[str, Any]:
        """Modelverse's documented answer: ``b64_json`` as a data URI next to a ``url``, and a
        ``usage`` with empty token details."""
        shaped: list[dict[str, str]] = []
        for k, item in enumerate(items):
            if "b64_json" in item and fault != "bad_b64":
                spec = (request.key(k), request.width, request.height)
                item = {"url": self._files.url(spec, fault),
                        "b64_json": "data:image/png;base64," + item["b64_json"]}
            shaped.append(item)
        return {"created": int(time.time()), "data": shaped,
                "usage": {"input_tokens_details": {}}}
