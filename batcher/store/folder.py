"""A run's output in a plain folder: files are final once renamed, so keeping a task is
recording it. Tasks whose sidecars say they finished but that the ledger lacks (a deleted
``ledger.sqlite``) are adopted, by a run and by the readers alike."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from batcher.errors import UsageError
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.records import FileRecord, Record
from batcher.reports.sheet import Mark
from batcher.store import sidecars
from batcher.store.atomic import atomic_open
from batcher.store.folderlock import lock_folder, run_in_progress
from batcher.store.ledger import LEDGER_NAME, Ledger, on_disk
from batcher.store.listings import read_summary, write_listings, write_reports
from batcher.store.lock import Locks
from batcher.store.verify import Problems, verify

log = logging.getLogger(__name__)


class FolderOutput:
    """The output folder itself is the working copy and the place results are kept."""

    def __init__(self, root: Path, ledger: Ledger) -> None:
        self.root = root
        self.ledger = ledger
        self.location = str(root)
        self.present = on_disk(root)
        self._kept = 0  # tasks kept by this run (ran, or derived files made again, or adopted)

    async def statuses(self, manifest: Manifest, selection: Selection) -> tuple[set[str], set[str]]:
        """Done and failed by the ledger; finished tasks only a sidecar tells of are adopted."""
        done, failed = self.ledger.statuses(self.root)
        found = sidecars.wanted(manifest, selection, self.root, done, failed,
                                sidecars.local_exists(self.root),
                                sidecars.folder_sidecars(self.root))
        adopted = await sidecars.adopt(self.ledger, found, sidecars.local_reader(self.root),
                                       self.present, done, failed)
        if adopted:
            log.info("adopted %d finished tasks from their sidecars in %s", adopted, self.root)
            self._kept += adopted
        return done, failed

    def ok_costs(self) -> Iterable[tuple[str, str, float | None]]:
        return self.ledger.ok_costs()

    async def gate(self) -> None:
        """A folder's lock is held until the process ends: every request may start."""

    async def keep(
        self, record: Record, sidecar: str | None, kept: Callable[[Record], None],
        failed: Callable[[BaseException], None], *, files: list[FileRecord] | None = None,
    ) -> None:
        self._kept += 1
        kept(record)

    async def drain(self) -> None:
        """Nothing waits: a folder's files are in place before their task is kept."""

    async def fetch(self, path: str) -> bool:
        return (self.root / path).is_file()

    async def remove(self, path: str) -> None:
        (self.root / path).unlink(missing_ok=True)

    async def finish(self, summary: dict[str, Any]) -> None:
        # Tasks kept again with new derived files change the listings though none ran.
        write_reports(self.root, self.ledger, summary, rewrite=self._kept > 0)


@contextlib.asynccontextmanager
async def open_folder(root: Path) -> AsyncIterator[FolderOutput]:
    with lock_folder(root), Ledger(root / LEDGER_NAME) as ledger:
        yield FolderOutput(root, ledger)


class FolderView:
    """An output folder for reading: its ledger (a copy, sidecar-only tasks adopted), files."""

    def __init__(self, root: Path, ledger: Ledger) -> None:
        self.root = root
        self.ledger = ledger
        self.location = str(root)
        self.present = on_disk(root)

    def size(self, path: str) -> int | None:
        """A kept file's size on disk (None: not there)."""
        try:
            return os.stat(self.root / path).st_size
        except OSError:
            return None

    async def verify(self) -> Problems:
        """Every ok task's files read and hashed again."""
        return await verify(self.ledger, self._chunks)

    async def _chunks(self, path: str) -> AsyncIterator[bytes]:
        try:
            handle = (self.root / path).open("rb")
        except OSError as exc:  # missing, or not a file: either way not what was kept
            raise FileNotFoundError(path) from exc
        with handle:
            while block := handle.read(1 << 20):
                yield block

    async def summary(self) -> dict[str, Any] | None:
        return read_summary(self.root)

    async def locks(self) -> Locks:
        """Whether a run holds the folder's lock now; a folder's lock names no holder (it
        ends with the process that holds it)."""
        return Locks(run_in_progress(self.root), None)

    async def write_listings(self, marks: Mapping[str, Mark] | None = None) -> None:
        write_listings(self.root, self.ledger, marks=marks)


@contextlib.asynccontextmanager
async def open_folder_view(root: Path, *, required: bool = True) -> AsyncIterator[FolderView]:
    """The folder's ledger for reading (``status``, ``plan``, ``report``), with the tasks only
    sidecars tell of adopted into it; nothing in the folder is written. A folder with neither
    a ledger nor a sidecar is an error when ``required``, else reads as an empty ledger."""
    view = Ledger(Path(":memory:"))  # a copy: the folder's own ledger stays as it is
    try:
        if (root / LEDGER_NAME).is_file():
            view.absorb(root / LEDGER_NAME)
        elif required and next(sidecars.folder_sidecars(root), None) is None:
            raise UsageError(f"{root}: no ledger here (nothing has run into this folder yet)")
        done, failed = view.statuses(root)
        found = sidecars.unaccounted(view, sidecars.folder_sidecars(root), done)
        await sidecars.adopt(view, found, sidecars.local_reader(root), on_disk(root), done, failed)
        yield FolderView(root, view)
    finally:
        view.close()


class FolderSite:
    """Prune's view of a folder: its one ledger, under the folder's lock; files removed with
    the folders they leave empty."""

    def __init__(self, root: Path) -> None:
        self.root = self.scratch = root
        self.location = str(root)

    @contextlib.asynccontextmanager
    async def hold(self, *, dry_run: bool) -> AsyncIterator[list[Ledger]]:
        if not (self.root / LEDGER_NAME).is_file():
            yield []
            return
        with contextlib.ExitStack() as stack:
            if not dry_run:
                stack.enter_context(lock_folder(self.root))
            yield [stack.enter_context(Ledger(self.root / LEDGER_NAME, readonly=dry_run))]

    def present(self, name: str) -> bool:
        return (self.root / name).is_file()

    async def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except OSError:
            return None

    async def write(self, name: str, data: bytes) -> None:
        with atomic_open(self.root / name) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    async def publish(self, ledgers: list[Ledger]) -> None:
        """Nothing to do: the rows went in the folder's own ledger."""

    async def delete(self, names: Iterable[str]) -> None:
        for name in names:
            _remove_file(self.root, name)

    async def write_listings(self, ledger: Ledger) -> None:
        write_listings(self.root, ledger)


def _remove_file(root: Path, name: str) -> None:
    """Remove one file, then its folders while they are empty (up to the output itself)."""
    path = root / name
    path.unlink(missing_ok=True)
    folder = path.parent
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): its siblings stay
            break
        folder = folder.parent
