"""``keep: N``: an asset that rejects leave with fewer than N ok, unrejected variants gets the
next seeds at the next run (and plan), for that asset only, up to ``max_seeds`` seeds in all
(default 4 x N, at least ``seeds``).

The seeds an asset takes are worked out from the ledger and the picks, the same way every time:
start from the job's ``seeds``; add the next seed while the ok unrejected variants plus those
still to run fall short of N, and keep adding any seed that already has a row (so a seed run
once stays in the manifest, for status and prune, whatever is decided later).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from batcher.location import StoreURL
from batcher.manifest import JobSpec, Manifest
from batcher.publish.picks import load_picks, picks_path
from batcher.publish.variants import Asset, Lookup, collect_assets


def next_seeds(job: JobSpec) -> tuple[int, ...]:
    """The job's seeds and every seed it may add, in order."""
    assert job.seeds is not None and job.max_seeds is not None
    start = max(job.seeds) + 1
    return job.seeds + tuple(range(start, start + job.max_seeds - len(job.seeds)))


def with_kept_seeds(manifest: Manifest, asset_state: Lookup, seen: set[str]) -> Manifest:
    """The manifest with each ``keep`` job's extra seeds; ``asset_state`` gives a task's ok
    row (files present), ``seen`` every id the ledger has a row for."""
    if not any(job.keep for job in manifest.jobs):
        return manifest
    decisions = load_picks(picks_path(manifest.path))
    jobs = []
    for job in manifest.jobs:
        if job.keep:
            wide = dataclasses.replace(manifest, jobs=(dataclasses.replace(
                job, seeds=next_seeds(job)),))
            assets = collect_assets(wide, decisions, asset_state)
            more = {name: seeds for name, asset in assets.items()
                    if len(seeds := _seeds_taken(job, asset, seen)) > len(job.seeds or ())}
            job = dataclasses.replace(job, more_seeds=more)
        jobs.append(job)
    return dataclasses.replace(manifest, jobs=tuple(jobs))


def _seeds_taken(job: JobSpec, asset: Asset, seen: set[str]) -> tuple[int, ...]:
    assert job.keep is not None and job.seeds is not None
    base = set(job.seeds)
    count = sum(1 for v in asset.variants if v.seed in base and _counts(asset, v))
    taken = list(job.seeds)
    for seed in next_seeds(job)[len(job.seeds):]:
        variants = [v for v in asset.variants if v.seed == seed]
        if count >= job.keep and not any(v.task.id in seen for v in variants):
            break
        taken.append(seed)
        count += sum(1 for v in variants if _counts(asset, v))
    return tuple(taken)


def _counts(asset: Asset, variant: Any) -> bool:
    """Ok and unrejected, or still to run (a failed task is tried again)."""
    return not variant.ok or not asset.rejected(variant)


async def manifest_for_run(manifest: Manifest, target: Path | StoreURL) -> Manifest:
    """``with_kept_seeds`` over what the output holds now (nothing ran: the job's seeds)."""
    if not any(job.keep for job in manifest.jobs):
        return manifest
    from batcher.publish.source import open_run_files, seen_ids

    async with open_run_files(target, required=False) as files:
        return with_kept_seeds(manifest, files.ok_record, seen_ids(files))
