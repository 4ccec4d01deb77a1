"""A run's output in a plain folder: files are final once renamed, so keeping a task is
recording it. Tasks whose sidecars say they finished but that the ledger lacks (a deleted
``ledger.sqlite``) are adopted, by a run and by the readers alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from batcher.errors import UsageError
from batcher.ledger import LEDGER_NAME, FileRecord, Ledger, Record, on_disk
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.reports.summary import write_reports
from batcher.storage import lock_folder
from batcher.store import sidecars

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
                                sidecars.local_exists(self.root))
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


@contextlib.contextmanager
def read_folder(root: Path, *, required: bool = True) -> Iterator[Ledger]:
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
        asyncio.run(sidecars.adopt(view, found, sidecars.local_reader(root), on_disk(root),
                                   done, failed))
        yield view
    finally:
        view.close()
