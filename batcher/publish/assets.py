"""The asset set: a manifest's assets over a run's files, with the picks file applied. What
``publish`` ships and ``review`` shows."""

from __future__ import annotations

import sys

from batcher.errors import UsageError
from batcher.manifest import Manifest
from batcher.publish.keep import with_kept_seeds
from batcher.publish.picks import load_picks, picks_path
from batcher.publish.source import RunFiles
from batcher.publish.variants import Asset, check_picks, collect_assets, stale_entries


def asset_set(manifest: Manifest, files: RunFiles) -> dict[str, Asset]:
    """The manifest's assets over a run's files, with the picks; exit 2 on a bad picks file,
    warnings for stale entries."""
    if not any(job.asset for job in manifest.jobs):
        raise UsageError(f"{manifest.path}: no job has asset: (name the files, such as "
                         "asset: \"icons/{sku}\")")
    path = picks_path(manifest.path)
    decisions = load_picks(path)
    manifest = with_kept_seeds(manifest, files.ok_record, files.seen)
    assets = collect_assets(manifest, decisions, files.ok_record)
    check_picks(assets, decisions, str(path))
    for stale in stale_entries(assets, decisions):
        print(f"warning: {path}: {stale}", file=sys.stderr)
    return assets
