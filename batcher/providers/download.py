"""Fetching generated images from their URLs, at once, with no API key.

The downloader has its own ``aiohttp.ClientSession`` with no default headers, so nothing of the
API's authentication can reach an image host, even across a redirect. Bytes are streamed to a
temporary file with a size cap (checked against Content-Length and the bytes actually read) and
must start like an image. The URL is checked first (:func:`batcher.imagerefs.check_url`): what a
provider sends as a URL cannot make a parser below raise in the middle of a run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import yarl

from batcher.backoff import backoff
from batcher.errors import DownloadError
from batcher.imagegen import image_kind
from batcher.imagerefs import check_url

CHUNK = 256 * 1024
ATTEMPTS = 3


class Sink(Protocol):
    """Where a download's bytes go (the store's atomic file): entered, written, then its size
    and sha256 read; leaving it with an error leaves no file."""

    size: int

    @property
    def sha256(self) -> str: ...
    async def write(self, data: bytes) -> None: ...
    async def __aenter__(self) -> Sink: ...
    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None: ...


class Downloader:
    """Downloads image URLs into files the store opens (``open_file``: a final path to a
    :class:`Sink`)."""

    def __init__(self, session: aiohttp.ClientSession, *, cap: int, timeout: float,
                 open_file: Callable[[Path], Sink]) -> None:
        self._session = session
        self._open_file = open_file
        self._cap = cap
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))

    async def fetch(self, url: str, stem: Path) -> tuple[Path, int, str]:
        """Download ``url`` to ``stem`` plus the image's extension; retried a few times.

        Returns (path, size, sha256). Raises :class:`DownloadError` once the tries are spent;
        the run's course then pays for the generation again, at most ``regenerations`` times. A URL
        that is not a fetchable http(s) URL raises at once (``bad_url``), never fetched.
        """
        checked = image_url(url)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._fetch_once(checked, stem)
            except DownloadError as exc:
                if not exc.retryable or attempt == ATTEMPTS:
                    raise
                await asyncio.sleep(backoff(attempt, base=0.2, cap=2.0))
        raise AssertionError("unreachable")

    async def _fetch_once(self, url: yarl.URL, stem: Path) -> tuple[Path, int, str]:
        try:
            async with self._session.get(url, timeout=self._timeout, max_redirects=5) as response:
                if response.status != 200:
                    raise DownloadError(f"the image host answered HTTP {response.status}",
                                        status=response.status)
                length = response.content_length
                if length is not None and length > self._cap:
                    raise DownloadError(
                        f"image is {length} bytes, over the {self._cap}-byte cap",
                        reason="download_too_large", retryable=False,
                    )
                return await self._save(response, stem)
        except TimeoutError as exc:
            raise DownloadError("image download timed out", reason="download_timeout") from exc
        except aiohttp.ClientError as exc:
            raise DownloadError(f"image download failed: {exc}", reason="download") from exc

    async def _save(self, response: aiohttp.ClientResponse, stem: Path) -> tuple[Path, int, str]:
        first = b""
        while len(first) < 16 and (more := await response.content.read(16 - len(first))):
            first += more
        kind = image_kind(first)
        if kind is None:
            raise DownloadError("the image URL did not serve an image", reason="not_image")
        final = stem.with_name(f"{stem.name}.{kind}")
        async with self._open_file(final) as handle:
            await handle.write(first)
            async for block in response.content.iter_chunked(CHUNK):
                if handle.size + len(block) > self._cap:
                    raise DownloadError(
                        f"image is over the {self._cap}-byte cap", reason="download_too_large",
                        retryable=False,
                    )
                await handle.write(block)
        return final, handle.size, handle.sha256


def image_url(url: object) -> yarl.URL:
    """``url`` as it will be fetched; anything that is not a fetchable http(s) URL is refused
    here, with reason ``bad_url``, so that no parser below (IDNA, IPv6) can raise from a task."""
    try:
        if not isinstance(url, str):
            raise ValueError("is not a string")
        return check_url(url)
    except ValueError as exc:
        raise DownloadError(f"image URL {repr(url)[:100]} {exc}", reason="bad_url",
                            retryable=False) from exc
