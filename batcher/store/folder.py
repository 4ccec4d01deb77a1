"""A run's output in a plain folder: files are final once renamed, so keeping a task is
recording it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from batcher.ledger import LEDGER_NAME, FileRecord, Ledger, Record, on_disk
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.reports.summary import write_reports
from batcher.storage import lock_folder


class FolderOutput:
    """The output folder itself is the working copy and the place results are kept."""

    def __init__(self, root: Path, ledger: Ledger) -> None:
        self.root = root
        self.ledger = ledger
        self.location = str(root)
        self.present = on_disk(root)
        self._kept = 0  # tasks kept by this run (ran, or derived files made again)

    async def statuses(self, manifest: Manifest, selection: Selection) -> tuple[set[str], set[str]]:
        return self.ledger.statuses(self.root)

    def ok_costs(self) -> Iterable[tuple[str, str, float | None]]:
        return self.ledger.ok_costs()

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
