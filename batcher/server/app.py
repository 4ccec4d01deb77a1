"""The running local server: ``LocalServer`` binds its two aiohttp listeners and wires the
collaborators that answer them (records, middleware, the generation steps, the image, chat and
files endpoints); ``serve_forever`` runs it for ``batcher serve``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from aiohttp import web

from batcher.server.chat import ChatEndpoint
from batcher.server.generation import Generation
from batcher.server.images import ImageEndpoint, ImageFiles
from batcher.server.middleware import add_request_id, openai_errors
from batcher.server.options import FAULT_KINDS, ServerOptions
from batcher.server.records import RequestLog, ServerStats, recorder
from batcher.server.requests import CHAT_MODELS, IMAGE_MODELS

# How long a "slow" fault holds its answer back; read when a server is built (tests shorten it).
SLOW_FAULT_SECONDS = 30.0
_MODELS_CREATED = 1_717_200_000  # a fixed date, so /models answers the same every time


class LocalServer:
    """The local OpenAI-compatible server: an API listener and a files listener on one host.

    Use ``async with LocalServer(options) as server`` inside a loop, or ``start_in_thread()`` /
    ``stop_thread()`` from synchronous code. ``api_url`` and ``files_url`` are valid once started.
    """

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self.stats = ServerStats()
        self._requests = RequestLog(self.stats, self.options)
        generation = Generation(self.options, self.stats, SLOW_FAULT_SECONDS)
        self._files = ImageFiles(self.options)
        self._image_endpoint = ImageEndpoint(self.options, generation, self._files)
        self._chat_endpoint = ChatEndpoint(generation)
        self._runners: list[web.AppRunner] = []
        self._api_url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    @property
    def api_url(self) -> str:
        """``http://HOST:PORT/v1``; valid after start."""
        if self._api_url is None:
            raise RuntimeError("the local server is not started")
        return self._api_url

    @property
    def files_url(self) -> str:
        """``http://HOST:PORT2``, where ``url`` images are served; valid after start."""
        if self._files.base_url is None:
            raise RuntimeError("the local server is not started")
        return self._files.base_url

    async def start(self) -> None:
        """Bind both listeners; returns once they accept connections."""
        try:
            api_port = await self._listen(self._api_app(), self.options.port)
            files_port = await self._listen(self._files_app(), self.options.files_port)
        except BaseException:
            await self.stop()  # release a listener that did bind
            raise
        host = self.options.host
        self._api_url = f"http://{host}:{api_port}/v1"
        self._files.base_url = f"http://{host}:{files_port}"

    async def stop(self) -> None:
        """Close both listeners; requests still running get a short grace period."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _listen(self, app: web.Application, port: int) -> int:
        # handler_cancellation: a client that gives up (a timeout on a "slow" fault) ends the
        # handler, so work the client never received is not counted as a generation.
        runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, self.options.host, port).start()
        return int(runner.addresses[0][1])

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a daemon thread; return once it listens."""
        if self._thread is not None:
            raise RuntimeError("the local server thread is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the caller below
                failure.append(exc)
            ready.set()
            if not failure:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        thread = threading.Thread(target=run, name="batcher-local-server", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread = loop, thread

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with ``start_in_thread`` and wait for its thread to end."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    # -- the two applications --

    def _api_app(self) -> web.Application:
        # Edit requests carry images as data URIs, far over aiohttp's 1 MiB default.
        middlewares = [recorder("api", self._requests, self.options), openai_errors(self.options)]
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
        app.on_response_prepare.append(add_request_id)
        app.router.add_get("/v1/models", _models)
        app.router.add_post("/v1/images/generations", self._image_endpoint.handle)
        app.router.add_post("/v1/chat/completions", self._chat_endpoint.handle)
        return app

    def _files_app(self) -> web.Application:
        app = web.Application(middlewares=[recorder("files", self._requests, self.options)])
        app.router.add_get("/images/{token:[0-9a-f]+}.png", self._files.download)
        return app


async def _models(request: web.Request) -> web.Response:
    """``GET /v1/models``: every model the server answers for."""
    data = [
        {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "batcher-local"}
        for m in IMAGE_MODELS + CHAT_MODELS
    ]
    return web.json_response({"object": "list", "data": data})


async def serve_forever(options: ServerOptions, *, announce: Callable[[str], None] = print) -> None:
    """Run the local server until cancelled (``batcher serve``), announcing where it listens."""
    server = LocalServer(options)
    await server.start()
    try:
        announce(f"batcher serve: API at {server.api_url} (images at {server.files_url})")
        await asyncio.get_running_loop().create_future()  # until cancelled
    finally:
        await server.stop()


# FAULT_KINDS is here too for those that name the fault kinds next to SLOW_FAULT_SECONDS.
__all__ = ["FAULT_KINDS", "SLOW_FAULT_SECONDS", "LocalServer", "serve_forever"]
