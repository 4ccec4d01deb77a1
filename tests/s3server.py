"""A real S3 API on 127.0.0.1 for the store tests: moto's server, and a TCP proxy in front of it
that can make the store fail the ways stores fail (503 SlowDown, 500, reset connections, a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

import boto3
import pytest
from faultproxy import ThreadedProxy
from moto.server import ThreadedMotoServer

MODES = ("pass", "503", "500", "reset", "hang")


class S3Server:
    """moto's S3 server on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"

        self.client = boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        """A new empty bucket."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object's size by key."""
        found: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def modified(self, bucket: str, key: str) -> float:
        """When the object was last put (the store keeps whole seconds)."""
        head = self.client.head_object(Bucket=bucket, Key=key)
        return float(head["LastModified"].timestamp())

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def stop(self) -> None:
        self._server.stop()


class FaultProxy(ThreadedProxy):
    """Forwards TCP connections to ``target``; ``mode`` makes new and open connections fail.

    pass: bytes flow both ways; 503 / 500: an S3 error answer, then the connection closes;
    reset: the connection is aborted; hang: nothing is ever answered.
    """

    def __init__(self, target: str) -> None:
        self.mode = "pass"
        self._open: set[asyncio.StreamWriter] = set()
        super().__init__(target)

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode

        def switch() -> None:
            self.mode = mode
            if mode != "pass":
                for writer in list(self._open):
                    writer.transport.abort()
        self._loop.call_soon_threadsafe(switch)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            if self.mode == "pass":
                await self._pipe(reader, writer)
            elif self.mode == "reset":
                writer.transport.abort()
            elif self.mode == "hang":
                await reader.read()  # until the client gives up
            else:
                await reader.readuntil(b"\r\n\r\n")
                code = "SlowDown" if self.mode == "503" else "InternalError"
                body = f"<Error><Code>{code}</Code><Message>try later</Message></Error>".encode()
                reason = "Slow Down" if self.mode == "503" else "Internal Server Error"
                writer.write(f"HTTP/1.1 {self.mode} {reason}\r\nContent-Length: {len(body)}\r\n"
                             "Content-Type: application/xml\r\nConnection: close\r\n\r\n"
                             .encode() + body)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(Exception):
                sink.close()
        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        finally:
            up_writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3.url)
    yield proxy
    proxy.stop()


def store_env(endpoint: str, cache: str) -> dict[str, str]:
    """The environment a user sets for an S3-compatible store, and a working-copy folder."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "XDG_CACHE_HOME": cache}
