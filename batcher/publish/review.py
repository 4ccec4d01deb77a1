"""The review page (to come)."""

from __future__ import annotations

from pathlib import Path

from batcher.errors import UsageError
from batcher.manifest import Manifest
from batcher.store.url import StoreURL


def serve_review(manifest: Manifest, target: Path | StoreURL, *, port: int) -> int:
    raise UsageError("review: not built yet")
