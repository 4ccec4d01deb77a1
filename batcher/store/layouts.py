"""Runs whose tasks could overlap never send side by side on one store prefix.

Each ledger has its own lock: ``.batcher.lock`` for the unsharded run, ``ledgers/shard-I-of-N.lock``
for shard I of N. Shards of one count split the tasks between them and run side by side; any two
other layouts (another count, or unsharded next to sharded) share tasks. So a run, holding its
own lock in phase ``starting`` (and heartbeating it), reads every other lock on the prefix and
settles each that overlaps:

- gone, or its process gone from this machine: no longer in the way;
- unchanged for its holder's whole lease: dead; removed, with a warning;
- changed: alive, and this run stops (exit 2) naming it, with one exception for two runs that
  start together and may be looking at each other: while both are ``starting``, the one whose
  nonce is greater keeps watching (the other gives way at its first change and removes its
  lock); if the watched run turns ``running``, it had not seen this one, and this one stops.

Only then does the run write ``running`` and send. Each run creates its lock before it lists, so
of two overlapping runs at least one sees the other, and the rules above let at most one on.
"""

from __future__ import annotations

import logging
import re

from batcher.errors import UsageError
from batcher.store.lock import Holder, StoreLock, watch
from batcher.store.names import LOCK_NAME
from batcher.store.objects import ObjectStore

log = logging.getLogger(__name__)


_SHARD_LOCK = re.compile(r"ledgers/shard-(\d+)-of-(\d+)\.lock")


def layout(lock_name: str) -> int | None:
    """The shard count a lock's run splits the tasks into (None: unsharded, the whole set)."""
    found = _SHARD_LOCK.fullmatch(lock_name)
    return int(found.group(2)) if found else None


def _label(lock_name: str) -> str:
    found = _SHARD_LOCK.fullmatch(lock_name)
    return f"shard {found.group(1)}/{found.group(2)}" if found else "unsharded"


def overlaps(one: str, other: str) -> bool:
    """Whether runs holding these two locks could send the same task."""
    return one != other and layout(one) != layout(other)


async def lock_names(store: ObjectStore) -> list[str]:
    """Every lock on the prefix (the unsharded one may or may not exist)."""
    shards = [name for name in await store.sizes("ledgers") if _SHARD_LOCK.fullmatch(name)]
    return [LOCK_NAME, *sorted(shards)]


async def claim_layout(store: ObjectStore, lock: StoreLock) -> None:
    """Settle every lock whose run could overlap ``lock``'s, then say ``running``."""
    for name in await lock_names(store):
        if overlaps(lock.name, name):
            await _settle(store, lock, name)
    await lock.set_phase("running")


async def _settle(store: ObjectStore, lock: StoreLock, name: str) -> None:
    current = await store.get_bytes(name)
    if current is None:
        return
    holder = Holder.parse(current[0])
    if not holder.gone_from_this_machine():
        log.warning("%s: the run of %s (%s, %s) could send this run's tasks too; waiting up "
                    "to %.0f s to see whether it is alive", store.url, name, _label(name),
                    holder.describe(), holder.lease)
        mine = lock.nonce

        def alive(now: Holder) -> UsageError:
            return UsageError(
                f"{store.url}: another batcher run ({now.describe()}) is live on this prefix "
                f"as {_label(name)} ({name}); its tasks overlap this run's ({_label(lock.name)})."
                f" Run shards of one count side by side, or wait for it to finish")

        def we_win_while_both_start(now: Holder) -> bool:
            return now.phase == "starting" and mine > (now.nonce or "")
        if not await watch(store, name, holder, current[1], on_change=alive,
                           keep_watching=we_win_while_both_start):
            return  # it went away
    log.warning("%s: removing the lock %s of a dead run (%s)", store.url, name,
                holder.describe())
    await store.delete(name)
