"""A job's ``outputs``: which files are derived from each delivered image, and how they are
named and recorded. No image work here (see :mod:`batcher.store.derive`): the manifest, the
ledger readers and the contact sheet load this without Pillow.

A task's derived files live in the ledger's ``derived`` column as
``{"spec": <the outputs they were made for>, "files": [entry, ...], "error": <why not all>}``,
each entry ``{"path", "size", "sha256", "role", "of"}``: ``role`` is ``full`` (the delivered
image in another format), ``size:<name>`` (a resized copy, with ``side`` its longest side) or
``input`` (a thumbnail of an edit task's input image); ``of`` is the delivered file's path (or
the input's sha256).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batcher.records import FileRecord, Record

FORMATS = ("png", "webp", "jpeg", "avif")
AS_DELIVERED = ("original", "as delivered")  # how a manifest may spell the default
DELIVERED_KINDS = ("png", "jpeg", "webp", "gif")  # what image_kind() names a delivered file
INPUT_SIDE = 256  # px, the longest side of an input image's thumbnail on the contact sheet
# The most pixels batcher decodes to derive files (8192 x 8192): far above what image APIs
# return, and a bound on memory (4 bytes a pixel and more while resizing) against a small
# file claiming huge dimensions. ``outputs: max_pixels`` changes it.
DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True, slots=True)
class Outputs:
    """What a job derives from each delivered image."""

    format: str | None = None  # None: as delivered (no full-size copy)
    quality: int | None = None  # None: Pillow's default for the format
    sizes: tuple[tuple[str, int], ...] = ()  # (name, longest side in px)
    metadata: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are not decoded (derivation fails)

    def as_dict(self) -> dict[str, Any]:
        spec = {"format": self.format, "quality": self.quality, "sizes": dict(self.sizes),
                "metadata": self.metadata}
        if self.max_pixels != DEFAULT_MAX_PIXELS:  # so outputs kept before it stay current
            spec["max_pixels"] = self.max_pixels
        return spec


def job_spec(outputs: Outputs | None, with_inputs: bool) -> str | None:
    """What a job's tasks' derived files must have been made for; ``None``: no derived files.

    Compared as text with the ``spec`` a ledger row records: equal means nothing to redo.
    """
    if outputs is not None and outputs.format is None and not outputs.sizes:
        outputs = None  # nothing to derive (the manifest refuses quality or metadata alone)
    if outputs is None and not with_inputs:
        return None
    spec = {"outputs": outputs.as_dict() if outputs is not None else None,
            "inputs": with_inputs}
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def entries(derived: Any) -> list[dict[str, Any]]:
    """The entries of a ``derived`` value (none for an old ledger's NULL, or for a value
    batcher did not write: a ledger may come from elsewhere)."""
    if not isinstance(derived, Mapping):
        return []
    files = derived.get("files")
    if not isinstance(files, list):
        return []
    return [entry for entry in files
            if isinstance(entry, dict) and isinstance(entry.get("path"), str)]


def derived_files(record: Record) -> list[FileRecord]:
    """A record's derived files as FileRecords (to upload, verify or remove); an entry that is
    not one batcher writes is left out."""
    files = []
    for entry in entries(record.derived):
        path, size, sha = entry.get("path"), entry.get("size"), entry.get("sha256")
        if isinstance(path, str) and isinstance(size, int) and not isinstance(size, bool) \
                and isinstance(sha, str):
            files.append(FileRecord(path, size, sha))
    return files
