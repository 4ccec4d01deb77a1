"""An output folder's lock: held by the one run (or prune, or merge) that writes the folder, and
probed by ``status`` to say a run is writing it now."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from batcher.errors import UsageError
from batcher.store.names import LOCK_NAME


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


def run_in_progress(root: Path) -> bool:
    """Whether a run holds the folder's lock now (see :func:`lock_folder`).

    The probe takes a shared lock for an instant and gives it back; a run starting in that
    instant would stop as if another run held the folder, a risk worth a true answer here.
    """
    try:
        handle = open(root / LOCK_NAME, "rb")  # noqa: SIM115 - closed below
    except OSError:  # no lock file: no run has held this folder, or it was cleaned up
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to tell
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
