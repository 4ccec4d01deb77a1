"""The one way batcher writes a file: under a temporary name in its final folder, flushed, then
renamed, so a final name never holds a partial file; and the clean-up of the temporary files a
killed run left behind. Every writer goes through here: the store itself, downloads (the run
hands the downloader this file to write into), and publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiofiles
import aiofiles.os

TMP_PREFIX = ".tmp-"


_LEFTOVER = re.compile(r"\.tmp-\d+-")  # what temporary_name() makes: prefix, pid, number


class AtomicFile:
    """A file written under a temporary name in its final folder, then renamed into place."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = temporary_name(final)
        self.size = 0
        self._sha = hashlib.sha256()
        self._handle: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None

    async def __aenter__(self) -> AtomicFile:
        await aiofiles.os.makedirs(self.final.parent, exist_ok=True)
        self._handle = await aiofiles.open(self.tmp, "wb")
        return self

    async def write(self, data: bytes) -> None:
        assert self._handle is not None
        self._sha.update(data)
        self.size += len(data)
        await self._handle.write(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._handle is not None
        try:
            if exc_type is None:
                await self._handle.flush()
        finally:
            await self._handle.close()
        if exc_type is None:
            await aiofiles.os.replace(self.tmp, self.final)
        else:
            _discard(self.tmp)  # one unlink, on the failure path only


_tmp_numbers = itertools.count()


def temporary_name(final: Path) -> Path:
    """A name beside ``final`` that no other write of this process (or another) uses."""
    return final.with_name(_temporary_name(final.name))


def _temporary_name(name: str) -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{next(_tmp_numbers)}-{name}"


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_temporary(final: str | os.PathLike[str]) -> tuple[str, int]:
    """A new file under a temporary name beside ``final`` (its folder made when missing):
    its name and an open descriptor."""
    folder, name = os.path.split(final)
    while True:
        tmp = os.path.join(folder, _temporary_name(name))
        try:
            return tmp, os.open(tmp, _NEW_FILE, 0o666)
        except FileNotFoundError:  # the first file of its folder
            os.makedirs(folder, exist_ok=True)
        except FileExistsError:  # left by a killed process that had this pid: the next name
            pass


def _discard(tmp: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(final: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``final``; on success flush it and rename it into place,
    on failure remove it. Text is UTF-8."""
    tmp, fd = _create_temporary(final)
    try:
        with open(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, final)  # closing the handle flushed it
    except BaseException:
        _discard(tmp)
        raise


def _write_atomic_sync(final: str | os.PathLike[str], data: bytes) -> None:
    """atomic_open() in bare system calls, for the file each task writes."""
    tmp, fd = _create_temporary(final)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        _discard(tmp)
        raise


class FileWriter:
    """Writes whole files atomically off the event loop's thread.

    Creating a file costs a system call of tens of microseconds, hundreds on some disks; a run
    on a fast endpoint creates one per task. Small files queue for one writer thread, which takes
    all that are waiting at once (the files of a loop turn, and those that came while it wrote
    the last batch), so the loop pays a queue put per file and the kernel's work runs beside it.
    Large payloads each get a thread of the default pool. A write returns once its file is
    renamed into place; one whose caller was cancelled before its batch began is skipped.
    """

    SMALL = 256 * 1024  # bytes; larger payloads are written alone

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher-files")
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None

    async def write(self, final: str | os.PathLike[str], data: bytes) -> tuple[int, str]:
        """Write ``data`` to ``final``; returns its size and sha256."""
        if len(data) > self.SMALL:
            await asyncio.to_thread(_write_atomic_sync, final, data)
        else:
            if self._consumer is None:
                self._consumer = asyncio.create_task(self._consume())
            written = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Write(final, data, written))
            await written
        return len(data), hashlib.sha256(data).hexdigest()

    async def close(self) -> None:
        """Write what is queued, then stop the thread; call once the run's writers are done."""
        if self._consumer is not None:
            self._queue.put_nowait(None)
            await self._consumer
        self._thread.shutdown(wait=False)  # idle by now

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            closing = batch[-1] is None
            writes = [w for w in batch if w is not None and not w.done.done()]
            if writes:
                try:
                    errors = await loop.run_in_executor(self._thread, _write_batch, writes)
                except asyncio.CancelledError:  # the loop is closing: so are their callers
                    for write in writes:
                        write.done.cancel()
                    raise
                except Exception as exc:  # never expected: _write_batch returns each one's error
                    errors = [exc] * len(writes)
                _settle(writes, errors)
            if closing:
                return


@dataclass(frozen=True, slots=True)
class _Write:
    final: str | os.PathLike[str]
    data: bytes
    done: asyncio.Future[None]


def _write_batch(writes: list[_Write]) -> list[Exception | None]:
    errors: list[Exception | None] = []
    for write in writes:
        try:
            _write_atomic_sync(write.final, write.data)
        except Exception as exc:  # a full disk, a folder in the way: that write's own error
            errors.append(exc)
        else:
            errors.append(None)
    return errors


def _settle(writes: list[_Write], errors: list[Exception | None]) -> None:
    for write, error in zip(writes, errors, strict=True):
        if write.done.done():  # its caller was cancelled while the batch was written
            continue
        if error is None:
            write.done.set_result(None)
        else:
            write.done.set_exception(error)


def remove_leftovers(root: Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    removed = 0
    if not root.is_dir():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if _LEFTOVER.match(name):
                Path(dirpath, name).unlink(missing_ok=True)
                removed += 1
    return removed
