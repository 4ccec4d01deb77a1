"""An HTTP proxy in front of moto that sees each request: it records them (method, key, status,
when) and can drop the answer to chosen ones after the store applied them, as a lost reply."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str  # /bucket/key?query
    if_match: bool  # a conditional update
    status: int
    dropped: bool
    at: float  # time.monotonic() when the store answered
    received: float = 0.0  # time.monotonic() when the whole request had arrived
    create_only: bool = False  # If-None-Match: * (never replaces an object)

    @property
    def wrote(self) -> bool:
        """The store changed something: a write it accepted."""
        return self.method in {"PUT", "POST", "DELETE"} and 200 <= self.status < 300


class RecordingProxy:
    """Forwards HTTP to ``target``; ``drop(method, path, headers)`` picks answers to lose."""

    def __init__(self, target: str) -> None:
        self._target = urlsplit(target).netloc
        self.seen: list[Seen] = []
        self.drop: Callable[[str, str, dict[str, str]], bool] = lambda *_: False
        self._guard = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _any(self) -> None:
                proxy._forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        received = time.monotonic()
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(self._target, timeout=30)
        upstream.request(handler.command, handler.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        upstream.close()
        with self._guard:
            dropped = self.drop(handler.command, handler.path, headers)
            lowered = {k.lower(): v for k, v in headers.items()}
            self.seen.append(Seen(handler.command, handler.path, "if-match" in lowered,
                                  answer.status, dropped, time.monotonic(), received,
                                  lowered.get("if-none-match") == "*"))
        if dropped:  # applied by the store, answer lost on the way back
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.send_response_only(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in HOP_BY_HOP and (key.lower() != "content-length"
                                                  or handler.command == "HEAD"):
                handler.send_header(key, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def writes(self) -> list[Seen]:
        with self._guard:
            return [seen for seen in self.seen if seen.wrote]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
