"""The output folder: file names, atomic writes, and clean-up after a killed run.

File names are built only from sanitised slugs and hashes, so no prompt, model name or task id
can place a file outside the output folder. Every file is written under a temporary name in its
final folder, flushed, then renamed: a final name never holds a partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import itertools
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import aiofiles
import aiofiles.os

from batcher.errors import UsageError
from batcher.tasks import Task

TMP_PREFIX = ".tmp-"
_LEFTOVER = re.compile(r"\.tmp-\d+-")  # what temporary_name() makes: prefix, pid, number
LOCK_NAME = ".batcher.lock"
SLUG_MAX = 48
# Names Windows refuses for a file or folder whatever the extension (checked on the stem).
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=4096)  # job and model names, and prompts shared by many seeds
def slugify(text: str, max_length: int = SLUG_MAX) -> str:
    """A lowercase ASCII slug of ``text``: ``a-z``, ``0-9`` and single dashes, never empty.

    Bounded and deterministic; a reserved device name gets a trailing underscore.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _NOT_SLUG.sub("-", ascii_text.lower()).strip("-")[:max_length].rstrip("-")
    if not slug:
        slug = "x" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if slug in _RESERVED:
        slug += "_"
    return slug


ID_CHARS = 16  # hex characters of a task id's hash in its file names (64 bits)
LEGACY_ID_CHARS = 8  # what batcher wrote before: outputs made then keep their names


def short_id(task_id: str, length: int = ID_CHARS) -> str:
    """Hex characters that stand for a task id in file names.

    Always a hash of the id, even of an id that is a hash already: a user's id may look like
    one of batcher's and share its first characters with another. Sixteen characters (64
    bits): names meet only when two tasks share the job, the model, the seed, the first 48
    characters of the prompt's slug *and* this hash; among a million such tasks the chance
    that any two do is about 3 in 100 million (eight characters made it 116 expected pairs).
    The ledger refuses the rare one left (:meth:`batcher.ledger.Ledger.claim`).
    """
    return hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:length]


class Named(Protocol):
    """What a task's file names are made of: a Task, or the Record of one."""

    @property
    def id(self) -> str: ...
    @property
    def job(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def seed(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each task's files go under one output folder.

    Names are relative to the root, with "/" between folders, as the ledger records them.
    """

    root: Path

    def task_stem(self, task: Named) -> str:
        """``<job>/<model>/<prompt-slug>-s<seed>-<id16>``."""
        return self._stem(task, ID_CHARS)

    def legacy_stem(self, task: Named) -> str:
        """The stem batcher used before 16-character ids (``-<id8>``): files an older run
        made have it, and their ledger rows and sidecars say so."""
        return self._stem(task, LEGACY_ID_CHARS)

    def record_stem(self, record: Named, files: Iterable[str]) -> str:
        """The stem a kept task's ``files`` (its ledger row's) were written under: the
        legacy one for a task an older batcher made, else :meth:`task_stem`."""
        legacy = self.legacy_stem(record)
        # A legacy file is the stem then "." (the extension), "-" (image k of n) or "@" (a
        # derived size); a current name carries hex digits there.
        if any(path.startswith(legacy) and path[len(legacy):len(legacy) + 1] in {".", "-", "@"}
               for path in files):
            return legacy
        return self.task_stem(record)

    @staticmethod
    def _stem(task: Named, id_chars: int) -> str:
        return _stem_of(task.job, task.model, task.prompt, task.seed, task.id, id_chars)

    def image_stem(self, task: Task, index: int, count: int) -> str:
        """Image ``index`` of ``count`` without its extension (known once its bytes are)."""
        suffix = f"-{index}" if count > 1 else ""
        return f"{self.task_stem(task)}{suffix}"

    def image_name(self, task: Task, index: int, count: int, ext: str) -> str:
        return f"{self.image_stem(task, index, count)}.{ext}"

    def text_name(self, task: Task) -> str:
        return f"{self.task_stem(task)}.txt"

    def sidecar_name(self, task: Named) -> str:
        """The task's sidecar: what its ledger row says, beside its files."""
        return f"{self.task_stem(task)}.json"

    def legacy_sidecar_name(self, task: Named) -> str:
        """Where an older batcher put the task's sidecar (8-character ids)."""
        return f"{self.legacy_stem(task)}.json"

    def record_sidecar(self, record: Named, files: Iterable[str]) -> str:
        """The sidecar of a kept task, beside its ``files`` (an older run's name included)."""
        return f"{self.record_stem(record, files)}.json"

    def path(self, relative: str) -> str:
        """Where a name made here lives (no check: these names cannot leave the root)."""
        return os.path.join(self.root, relative)

    def resolve(self, relative: str | Path) -> Path:
        """The absolute path of a file named in the ledger; refuses anything outside the root."""
        path = (self.root / relative).resolve()
        root = self.root.resolve()
        if path != root and root not in path.parents:
            raise ValueError(f"{relative} is outside the output folder")
        return path


@functools.lru_cache(maxsize=4096)  # a task's names are asked for five times as it runs
def _stem_of(job: str, model: str, prompt: str, seed: int | None, task_id: str,
             id_chars: int) -> str:
    # Built as one string: every part is a slug or a hash, so "/" only separates them.
    seed_part = "" if seed is None else f"-s{seed}"
    return (f"{slugify(job, 64)}/{slugify(model, 64)}/"
            f"{slugify(prompt)}{seed_part}-{short_id(task_id, id_chars)}")


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


@contextlib.contextmanager
def lock_folder(root: Path) -> Iterator[None]:
    """Hold the output folder for one run: a second run into it stops with a clear error
    instead of interleaving files and removing the other's temporary files."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_NAME, "a")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UsageError(f"{root}: cannot use as the output folder ({exc.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{root}: another batcher run is writing to this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
