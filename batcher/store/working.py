"""A store's working copy on this machine, and the names a store's ledgers go by.

The working copy (``$XDG_CACHE_HOME/batcher/<scheme>/<bucket>-<prefix>-<hash>/<part>``) holds a
run's ledger and the files it writes; readers and prune restore ledgers into their own part.
A store's layout is a folder's: ``ledger.sqlite`` (``ledgers/shard-I-of-N.sqlite`` for a
shard, each with its own lock and summary), ``summary.json``, the listings, the files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from batcher.errors import StoreError, UsageError
from batcher.location import StoreURL
from batcher.store.ledger import LEDGER_NAME, Ledger
from batcher.store.names import LEDGERS, LOCK_NAME, SUMMARY_NAME, slugify
from batcher.store.objects import ObjectStore


def cache_root(url: StoreURL, part: str) -> Path:
    """The working copy of one store prefix (and shard) on this machine."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batcher"
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:8]
    name = f"{slugify(url.bucket, 40)}-{slugify(url.prefix or 'root', 40)}-{digest}"
    return (base / url.scheme / name / part).expanduser()


def run_names(shard: tuple[int, int] | None) -> tuple[str, str, str, str]:
    """The store names of a run's ledger, lock and summary, and its working copy's folder."""
    if shard is None:
        return LEDGER_NAME, LOCK_NAME, SUMMARY_NAME, "all"
    part = f"shard-{shard[0]}-of-{shard[1]}"
    return (f"{LEDGERS}{part}.sqlite", f"{LEDGERS}{part}.lock",
            f"{LEDGERS}{part}.summary.json", part)


def is_ledger(name: str) -> bool:
    return name == LEDGER_NAME or (name.startswith(LEDGERS) and name.endswith(".sqlite"))


def is_lock(name: str) -> bool:
    return name == LOCK_NAME or (name.startswith(LEDGERS) and name.endswith(".lock"))


def lock_of(ledger_name: str) -> str:
    """The lock object guarding a ledger (``ledgers/shard-1-of-2.sqlite`` -> ``....lock``)."""
    if ledger_name == LEDGER_NAME:
        return LOCK_NAME
    return ledger_name.removesuffix(".sqlite") + ".lock"


async def restore_ledgers(store: ObjectStore, folder: Path, names: list[str]) -> list[Path]:
    """Download the named ledgers into ``folder``; returns the local paths."""
    paths = []
    for name in names:
        path = folder / name.replace("/", "-")
        if await store.get_file(name, path):
            paths.append(path)
    return paths


def merged_view(own: Ledger, others: list[Path], folder: Path) -> Ledger:
    """One ledger holding the rows of ``own`` and ``others`` (``own`` itself when alone)."""
    if not others:
        return own
    path = folder / "view.sqlite"
    path.unlink(missing_ok=True)
    own.snapshot(path)
    view = Ledger(path)
    for other in others:
        view.absorb(other)
    return view


async def first_listing(store: ObjectStore) -> dict[str, int]:
    """The store's files and sizes, read before anything is sent: a store that cannot be read
    (no such bucket, credentials refused) is a usage error, exit 2."""
    try:
        return await store.sizes()
    except FileNotFoundError:
        raise UsageError(f"{store.url}: no such bucket or container") from None
    except StoreError as exc:
        raise UsageError(str(exc)) from None
