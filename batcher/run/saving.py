"""From a provider's answer to files on disk and a ledger record.

Images: ``b64_json`` is decoded and checked to be an image; a ``url`` is downloaded at once.
An image that cannot be saved is left out (logged) while another of the same answer is kept:
the answer was paid for, and asking again would pay for the good ones twice.
A completion's text goes to a ``.txt`` file; with ``n`` > 1, each choice to its own
``<stem>-<k>.txt`` (k from 1), as the images of one answer do. Every finished task gets a
``.json`` sidecar carrying its ledger record and request. Every file is atomic (see
:mod:`batcher.store.atomic`).
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batcher.bodies import InputImages, build_body
from batcher.errors import (
    DownloadError,
    HTTPStatusError,
    InternalError,
    ProviderError,
    ResponseError,
)
from batcher.imagegen import image_kind
from batcher.manifest.tasks import Task
from batcher.providers.base import ChatAnswer, ImageAnswer, Provider
from batcher.providers.download import Downloader
from batcher.records import FileRecord, Record
from batcher.store import sidecars
from batcher.store.atomic import FileWriter
from batcher.store.names import Layout

Answer = ImageAnswer | ChatAnswer
log = logging.getLogger(__name__)


@contextmanager
def task_boundary(task: Task) -> Iterator[None]:
    """Whatever one task's answer makes batcher raise fails that task, never the run.

    Named failures (:class:`ProviderError`) pass as they are; batcher's own environment (a full
    disk, a folder it may not write: ``OSError``, ``MemoryError``) still stops the run; any
    other exception is a bug met on this answer and becomes an :class:`InternalError`.
    """
    try:
        yield
    except (ProviderError, OSError, MemoryError):
        raise
    except Exception as exc:
        log.error("task %s: internal error %s: %s", task.id, type(exc).__name__, exc)
        log.debug("task %s: the internal error in full", task.id, exc_info=True)
        raise InternalError(f"{type(exc).__name__}: {exc}"[:500]) from exc


class Saver:
    """Sends a task's request and turns the answer into files and a ledger record."""

    def __init__(
        self, layout: Layout, downloaders: dict[str, Downloader], files: FileWriter
    ) -> None:
        self.layout = layout
        self.downloaders = downloaders  # per provider: each has its own size cap
        self.files = files

    async def request(
        self, provider: Provider, task: Task, images: InputImages
    ) -> tuple[Answer, dict[str, Any]]:
        """Send the task; returns the answer and the request as the sidecar records it."""
        body, logged = build_body(task, images, provider.config.seed_param)
        if task.kind == "chat":
            return await provider.complete_chat(body), logged
        return await provider.generate_image(body), logged

    async def save(self, task: Task, answer: Answer) -> tuple[list[FileRecord], dict[str, Any]]:
        """Write the answer's files; returns them and the response body to keep in the ledger."""
        if isinstance(answer, ChatAnswer):
            texts: list[FileRecord] = []
            for index, text in enumerate(answer.texts, start=1):
                path = self._choice_name(task, index, len(answer.texts))
                size, sha = await self.files.write(self.layout.path(path), text.encode())
                texts.append(FileRecord(path, size, sha))
            return texts, dict(answer.body)
        files: list[FileRecord] = []
        lost: list[ProviderError] = []
        count = len(answer.items)
        for index, item in enumerate(answer.items, start=1):
            try:
                files.append(await self._save_image(task, item, index, count))
            except (ResponseError, DownloadError) as exc:
                lost.append(exc)
                log.warning("task %s: image %d of %d left out: %s", task.id, index, count, exc)
        if not files:  # nothing of the answer is usable: it fails (and may be asked again)
            raise lost[0]
        return files, dict(answer.body)

    def _choice_name(self, task: Task, index: int, count: int) -> str:
        """Choice ``index`` of ``count``: ``<stem>.txt`` for a single one (the name outputs
        of older versions have), else ``<stem>-<index>.txt``."""
        if count == 1:
            return self.layout.text_name(task)
        return f"{self.layout.task_stem(task)}-{index}.txt"

    async def _save_image(self, task: Task, item: Any, index: int, count: int) -> FileRecord:
        if item.b64 is None and item.url is None:
            raise ResponseError(f"image {index} has neither b64_json nor url", reason="bad_item")
        if item.b64 is not None:
            try:
                data = binascii.a2b_base64(item.b64.encode("ascii"), strict_mode=True)
            except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
                raise ResponseError(f"image {index} is not valid base64",
                                    reason="bad_base64") from exc
            kind = image_kind(data)
            if kind is None:
                raise ResponseError(f"image {index} is not an image", reason="not_image")
            path = self.layout.image_name(task, index, count, kind)
            size, sha = await self.files.write(self.layout.path(path), data)
            return FileRecord(path, size, sha)
        stem = self.layout.image_stem(task, index, count)
        downloader = self.downloaders[task.provider]
        final, size, sha = await downloader.fetch(item.url, self.layout.root / stem)
        return FileRecord(final.relative_to(self.layout.root).as_posix(), size, sha)

    async def write_sidecar(self, record: Record, request: dict[str, Any]) -> str:
        """Write the task's ``<stem>.json`` (:func:`batcher.store.sidecars.write`); returns its
        name."""
        return await sidecars.write(self.files, self.layout, record, request)

    def _base(self, task: Task, status: str, attempts: int, started: float) -> Record:
        finished = time.time()
        return Record(
            id=task.id, job=task.job, provider=task.provider, kind=task.kind, model=task.model,
            prompt=task.prompt, seed=task.seed, status=status, attempts=attempts,
            vars=dict(task.vars), params=dict(task.params or {}), started=started,
            finished=finished, elapsed=finished - started,
        )

    def succeeded(
        self, task: Task, files: list[FileRecord], answer: Answer, response: dict[str, Any],
        attempts: int, started: float,
    ) -> Record:
        record = self._base(task, "ok", attempts, started)
        record.files = files
        record.usage = answer.usage
        record.response = response
        record.request_id = answer.request_id
        return record

    def failed(self, task: Task, error: ProviderError, attempts: int, started: float) -> Record:
        record = self._base(task, "failed", attempts, started)
        record.reason = error.reason
        record.error = error.message
        if isinstance(error, HTTPStatusError):
            record.http_status = error.status
            record.error_code = error.code
            record.request_id = error.request_id
            # The provider's own error body, for results.jsonl's response.body.
            record.response = error.body
        return record
