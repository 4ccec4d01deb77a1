"""Object stores (S3 and S3-compatible, GCS, Azure) behind a few retried calls, via obstore.

obstore is async-native, speaks all three clouds through one API, makes conditional puts
(create-only, update-if-unchanged), and streams files up in parts. Credentials and endpoints
come only from each cloud's standard environment and config (``AWS_*``, ``GOOGLE_*``,
``AZURE_*``; ``AWS_ENDPOINT_URL`` for R2, MinIO, Ceph): batcher never reads them from a
manifest and never prints or writes them.

Every call is retried with capped backoff while the store fails in a way that may pass (5xx,
throttling, timeouts, resets) until ``timeout`` seconds have gone by since the call began; then
:class:`StoreError` says the store is down. A store silent for ``SILENT_AFTER`` seconds gets one
line on stderr saying so and how long batcher keeps trying. Answers that will not change by
waiting (missing object, refused credentials, a failed precondition) come back at once; a
missing bucket or container is :class:`MissingBucket` at once, whatever the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)
from obstore.store import from_url

from batcher.backoff import backoff
from batcher.errors import StoreError, UsageError
from batcher.location import StoreURL
from batcher.store.atomic import atomic_open

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds a store may keep failing before a run gives up on it
SILENT_AFTER = 10.0  # seconds without an answer before a user is told the store is silent
_T = TypeVar("_T")
# How S3, GCS and Azure say the bucket (container) itself is missing; obstore reports some of
# these as a missing object, and a listing's as a generic error.
_NO_BUCKET = ("NoSuchBucket", "ContainerNotFound", "bucket does not exist",
              "The specified bucket does not exist")


class MissingBucket(StoreError):
    """The bucket or container of a store URL does not exist: waiting will not create it."""


def _is_missing_bucket(exc: BaseException) -> bool:
    text = str(exc)
    return any(mark in text for mark in _NO_BUCKET)


def _is_final(exc: BaseException) -> bool:
    """Errors that waiting will not cure."""
    return isinstance(exc, FileNotFoundError | AlreadyExistsError | PreconditionError
                      | ValueError | TypeError)


class ObjectStore:
    """One bucket and prefix; names passed to its methods are relative to the prefix."""

    def __init__(self, url: StoreURL, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        per_request = max(min(30.0, timeout / 2), 1.0)
        client: dict[str, Any] = {"timeout": timedelta(seconds=per_request),
                                  "connect_timeout": timedelta(seconds=min(per_request, 5.0))}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if url.scheme == "s3" and endpoint and endpoint.startswith("http://"):
            client["allow_http"] = True  # a local MinIO or test server said so by its URL
        try:
            # obstore's own retries are off: ours below cover every call, puts included.
            self._store = cast(Any, from_url)(f"{url.scheme}://{url.bucket}/{url.prefix}",
                                              client_options=client,
                                              retry_config={"max_retries": 0})
        except (BaseError, ValueError, UnknownConfigurationKeyError) as exc:
            raise UsageError(f"{url}: cannot open the store ({_first_line(exc)})") from None
        self._said_silent = False

    def _say_silent(self, what: str) -> None:
        """One line per silence: the store has not answered ``what`` for SILENT_AFTER s."""
        if self._said_silent:
            return
        self._said_silent = True
        left = max(self.timeout - SILENT_AFTER, 0.0)
        log.warning("%s has not answered for %.0f s (%s); batcher keeps trying for up "
                    "to %.0f s more (--store-timeout)", self.url, SILENT_AFTER, what, left)

    async def _retry(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        silent = asyncio.get_running_loop().call_later(SILENT_AFTER, self._say_silent, what)
        try:
            result = await self._retry_until_deadline(what, call)
        finally:
            silent.cancel()
        self._said_silent = False  # it answered: a later silence is news again
        return result

    async def _retry_until_deadline(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except Exception as exc:
                if _is_missing_bucket(exc):
                    raise MissingBucket(f"{self.url}: no such bucket or container "
                                        f"({self.url.bucket})") from exc
                await self._after_failure(what, exc, attempt, deadline)

    async def _after_failure(self, what: str, exc: Exception, attempt: int,
                             deadline: float) -> None:
        """Raise what waiting will not cure; else wait before the next attempt."""
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
            raise StoreError(f"{self.url}: the store refused {what} ({_first_line(exc)}); "
                             f"check its credentials in the environment") from exc
        if _is_final(exc):
            raise exc
        wait = backoff(attempt, base=0.2, cap=10.0)
        if time.monotonic() + wait > deadline:
            raise StoreError(f"{self.url}: {what} failed for {self.timeout:g} s; "
                             f"the store seems down ({_first_line(exc)})") from exc
        log.debug("%s: %s failed (%s); retrying in %.1f s", self.url, what, _first_line(exc),
                  wait)
        await asyncio.sleep(wait)

    async def put_file(self, name: str, path: Path, *, create: bool = False) -> None:
        """Upload a local file, streamed in parts when large; ``create``: only if no object
        has that name (one request, whole; else :class:`AlreadyExistsError`)."""
        await self._retry(f"uploading {name}", lambda: obstore.put_async(
            self._store, name, path, attributes=_attributes(name),
            mode="create" if create else None))

    async def put_bytes(self, name: str, data: bytes, *, mode: Any = None) -> str | None:
        """Upload ``data``; ``mode`` is obstore's ("create", or {"e_tag": ...} to update only
        that version). Returns the new object's ETag."""
        result = await self._retry(f"uploading {name}", lambda: obstore.put_async(
            self._store, name, data, mode=mode, attributes=_attributes(name),
            use_multipart=False))
        return result["e_tag"]

    async def get_bytes(self, name: str) -> tuple[bytes, str | None] | None:
        """An object's bytes and ETag, or ``None`` when there is no such object."""
        async def get() -> tuple[bytes, str | None]:
            result = await obstore.get_async(self._store, name)
            return bytes(await result.bytes_async()), result.meta["e_tag"]
        try:
            return await self._retry(f"reading {name}", get)
        except FileNotFoundError:
            return None

    async def get_file(self, name: str, path: Path) -> bool:
        """Download an object to ``path`` (through a temporary name); False when missing."""
        return (await self.get_file_version(name, path))[0]

    async def get_file_version(self, name: str, path: Path) -> tuple[bool, str | None]:
        """:meth:`get_file`, and the ETag of the version downloaded (None when missing)."""
        async def get() -> str | None:
            result = await obstore.get_async(self._store, name)
            with atomic_open(path) as handle:
                async for chunk in result.stream(min_chunk_size=1 << 20):
                    handle.write(chunk)
            return cast(str | None, result.meta["e_tag"])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return True, await self._retry(f"reading {name}", get)
        except FileNotFoundError:
            return False, None

    async def version(self, name: str) -> str | None:
        """The ETag of an object now, or ``None`` when there is no such object."""
        try:
            meta = await self._retry(f"reading {name}",
                                     lambda: obstore.head_async(self._store, name))
        except FileNotFoundError:
            return None
        return cast(str | None, meta["e_tag"])

    async def chunks(self, name: str) -> AsyncIterator[bytes]:
        """An object's bytes in pieces (for hashing without holding it whole)."""
        result = await self._retry(f"reading {name}",
                                   lambda: obstore.get_async(self._store, name))
        async for chunk in result.stream(min_chunk_size=1 << 20):
            yield bytes(chunk)

    async def sizes(self, under: str | None = None) -> dict[str, int]:
        """Every object's size by name (below ``under`` when given), listed page by page."""
        async def listing() -> dict[str, int]:
            found: dict[str, int] = {}
            async for page in obstore.list(self._store, under, chunk_size=1000):
                for meta in page:
                    found[meta["path"]] = meta["size"]
            return found
        return await self._retry("listing", listing)

    async def copy(self, source: str, name: str) -> None:
        """Copy an object to ``name`` inside the store (server-side: no bytes pass here)."""
        await self._retry(f"copying {source} to {name}",
                          lambda: obstore.copy_async(self._store, source, name))

    async def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await self._retry(f"deleting {name}", lambda: obstore.delete_async(self._store, name))


def _attributes(name: str) -> dict[str, str]:
    """A Content-Type, so a browser opens the contact sheet and its images straight from the
    bucket."""
    kind = mimetypes.guess_type(name)[0]
    if name.endswith((".txt", ".html", ".json", ".jsonl")):
        kind = {"txt": "text/plain", "html": "text/html", "json": "application/json",
                "jsonl": "application/jsonl"}[name.rsplit(".", 1)[1]] + "; charset=utf-8"
    return {"Content-Type": kind or "application/octet-stream"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
