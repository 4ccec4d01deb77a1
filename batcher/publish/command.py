"""What ``publish`` and ``review`` do and print; ``validate``'s and ``status``'s asset lines."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

from batcher.errors import UsageError
from batcher.location import StoreURL, output_target
from batcher.manifest import Manifest, load_manifest
from batcher.plan import output_dir
from batcher.publish.assets import asset_set
from batcher.publish.keep import next_seeds
from batcher.publish.picks import load_picks, picks_path
from batcher.publish.publish import open_target, plan_set, publish_set, read_previous
from batcher.publish.review import serve_review
from batcher.publish.source import open_run_files
from batcher.publish.variants import check_picks, collect_assets, stale_entries
from batcher.wording import plural


def picks_warnings(manifest: Manifest) -> list[str]:
    """``validate``: what in the picks file matches nothing (never an error)."""
    if not any(job.asset for job in manifest.jobs):
        return []
    path = picks_path(manifest.path)
    decisions = load_picks(path)
    if not decisions:
        return []
    # Every seed keep: N may add counts: a pick of an added seed is not stale.
    wide = dataclasses.replace(manifest, jobs=tuple(
        dataclasses.replace(job, seeds=next_seeds(job)) if job.keep else job
        for job in manifest.jobs))
    assets = collect_assets(wide, decisions, lambda _id: None)
    check_picks(assets, decisions, str(path))
    return [f"{path}: {stale}" for stale in stale_entries(assets, decisions)]


def publish(path: Path, output: str | None, to: str, *, dry_run: bool) -> int:
    if not to.strip():
        raise UsageError("--to is empty: name the folder or bucket to publish to")
    manifest = load_manifest(path)
    source, target = output_dir(manifest, output), output_target(to)
    if isinstance(target, Path) and target.exists() and not target.is_dir():
        raise UsageError(f"--to {to}: a file, not a folder")
    if str(source).rstrip("/") == str(target).rstrip("/") or (
            isinstance(source, Path) and isinstance(target, Path)
            and source.resolve() == target.resolve()):
        raise UsageError(f"--to {to}: that is the run's output; publish somewhere else")
    return asyncio.run(_publish(manifest, source, target, dry_run=dry_run))


async def _publish(manifest: Manifest, source: Path | StoreURL, to: Path | StoreURL, *,
                   dry_run: bool) -> int:
    async with open_run_files(source) as files:
        assets = asset_set(manifest, files)
        target = await open_target(to)
        previous = await read_previous(target)
        plan = plan_set(assets, previous)
        outcome = await publish_set(plan, previous, files, target, dry_run=dry_run)
    verb = "would write" if dry_run else "wrote"
    for name in outcome.written:
        print(f"{verb} {name}")
    for name in outcome.removed:
        print(f"{'would remove' if dry_run else 'removed'} {name}")
    for name in outcome.swept:
        print(f"removed {name} (left by a publish that was stopped)")
    count = len(assets) - len(plan.missing)
    listing = f"; {verb} assets.json" if outcome.listing_written else \
        "; assets.json unchanged"
    written = "to write" if dry_run else "written"
    removed = "to remove" if dry_run else "removed"
    print(f"publish: {count} of {plural(len(assets), 'asset')} to {target.location}: "
          f"{plural(len(outcome.written), 'file')} {written}"
          f"{f' ({outcome.copied} copied inside the store)' if outcome.copied else ''}, "
          f"{outcome.unchanged} unchanged, "
          f"{len(outcome.removed)} {removed}{listing}")
    for name, why in plan.missing:
        print(f"publish: {name}: not published: {why}", file=sys.stderr)
    return 1 if plan.missing else 0


def review(path: Path, output: str | None, *, port: int) -> int:

    manifest = load_manifest(path)
    return serve_review(manifest, output_dir(manifest, output), port=port)


def asset_summary(manifest: Manifest, root: Path | StoreURL) -> dict[str, object] | None:
    """For ``status --markdown``: how many assets, which have no ok unrejected variant, which
    have no pick (``None`` when no job has ``asset:``)."""
    if not any(job.asset for job in manifest.jobs):
        return None

    async def read() -> dict[str, object]:
        async with open_run_files(root, required=False) as files:
            assets = asset_set(manifest, files)
        return {"total": len(assets),
                "without_ok": [n for n, a in assets.items() if a.chosen() is None],
                "undecided": [n for n, a in assets.items() if not a.decided]}

    return asyncio.run(read())
