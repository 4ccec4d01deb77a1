"""The contact sheet of an asset set: each task's asset name and its images' states (picked,
rejected, published), handed to :mod:`batcher.reports.sheet`, which groups by asset."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from batcher.location import StoreURL
from batcher.manifest import Manifest
from batcher.publish.keep import with_kept_seeds
from batcher.publish.picks import load_picks, picks_path
from batcher.publish.source import ok_records
from batcher.publish.variants import Asset, collect_assets
from batcher.reports.sheet import Mark
from batcher.store.ledger import FilePresent, Ledger, on_disk


def marks_of(assets: Mapping[str, Asset]) -> dict[str, Mark]:
    """The mark of every task of the set that has a ledger row."""
    marks: dict[str, Mark] = {}
    for asset in assets.values():
        chosen, picked = asset.chosen(), asset.picked()
        states: dict[str, list[str]] = {}
        for variant in asset.variants:
            if variant.record is None:
                continue
            state = ("picked" if variant is picked else "rejected" if asset.rejected(variant)
                     else "published" if variant is chosen else "")
            states.setdefault(variant.task.id, []).append(state)
        for task_id, found in states.items():
            marks[task_id] = Mark(asset.name, tuple(found))
    return marks


def _marks(manifest: Manifest, ledger: Ledger, present: FilePresent) -> dict[str, Mark]:
    records, seen = ok_records(ledger, present)
    manifest = with_kept_seeds(manifest, records.get, seen)
    assets = collect_assets(manifest, load_picks(picks_path(manifest.path)), records.get)
    return marks_of(assets)


async def refresh_sheet(manifest: Manifest, target: Path | StoreURL) -> bool:
    """Write the output's index.html (and results.jsonl) again, grouped by asset, with the
    picks file's decisions; False when nothing has run into it yet."""
    from batcher.store.listings import write_listings

    if not any(job.asset for job in manifest.jobs):
        return False
    if isinstance(target, StoreURL):
        from batcher.store.view import open_view

        async with open_view(target, required=False) as view:
            await view.write_listings(_marks(manifest, view.ledger, view.present))
        return True
    found = Ledger.open_existing(target)
    if found is None:
        return False
    with contextlib.closing(found):
        write_listings(target, found, marks=_marks(manifest, found, on_disk(target)))
    return True
