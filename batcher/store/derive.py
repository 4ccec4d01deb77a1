"""Derived files: each delivered image in another format and resized, with its metadata, and
thumbnails of an edit task's input images for the contact sheet. Pillow decodes, resizes
(Lanczos) and encodes; the work runs on a thread, off the event loop.

The image as delivered is never touched: derived files are made from it once it is in place,
each written under a temporary name and renamed (:func:`batcher.store.atomic.atomic_open`). Names:
``<stem>.<ext>`` for the full-size copy (``<stem>@full.<ext>`` when that is the delivered
file's own name), ``<stem>@<size>.<ext>`` for each size, ``<job>/inputs/<sha16>.webp`` for
input thumbnails (shared by the tasks of a job that use the same input).

An image Pillow cannot decode or encode fails the derivation, not the task: the task was paid
for and its delivered image is kept; the ``error`` of its ``derived`` value says why. So does
an image of more pixels than ``outputs: max_pixels`` (default 8192 x 8192): its header is
read, never its pixels (``too_many_pixels``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from PIL import Image, PngImagePlugin

from batcher.imagerefs import DATA, FILE, data_uri_bytes, parse_ref
from batcher.manifest import JobSpec, Manifest
from batcher.manifest.tasks import Task
from batcher.outputs import DEFAULT_MAX_PIXELS, DELIVERED_KINDS, INPUT_SIDE, Outputs, job_spec
from batcher.records import Record
from batcher.store.atomic import atomic_open
from batcher.store.names import Layout, slugify
from batcher.version import version

log = logging.getLogger(__name__)

_PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG", "avif": "AVIF"}
_EXT = {"png": "png", "webp": "webp", "jpeg": "jpg", "avif": "avif"}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)
# batcher bounds the pixels it decodes itself (max_pixels, checked on the header before any
# pixel is read); Pillow's own bound would only add a raw DecompressionBombWarning, or refuse
# a max_pixels set above it.
Image.MAX_IMAGE_PIXELS = None


class TooManyPixels(ValueError):
    """An image whose header claims more pixels than batcher decodes (``max_pixels``)."""

    reason = "too_many_pixels"

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__(f"{self.reason}: {width} x {height} px is over max_pixels "
                         f"({max_pixels:,} px; outputs: max_pixels raises it)")


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Before anything decodes ``image`` (opening reads only its header)."""
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixels(width, height, max_pixels)
XMP_NS = "https://batcher.invalid/ns/1.0/"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # XML 1.0 forbids these



def metadata_of(record: Record) -> dict[str, str]:
    """What a derived file says about itself (``metadata: true``)."""
    return {
        "prompt": record.prompt, "model": record.model,
        "seed": "" if record.seed is None else str(record.seed), "task_id": record.id,
        "job": record.job, "provider": record.provider, "batcher_version": version(),
    }


def xmp_packet(meta: Mapping[str, str]) -> bytes:
    """An XMP packet: the prompt as dc:description (where viewers look), the rest as batcher:
    properties."""
    meta = {key: _NOT_XML.sub("", value) for key, value in meta.items()}
    attrs = " ".join(f"batcher:{key}={quoteattr(value)}" for key, value in meta.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:batcher="{XMP_NS}" '
        f'xmp:CreatorTool={quoteattr("batcher " + meta.get("batcher_version", ""))} {attrs}>'
        '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        f'{escape(meta.get("prompt", ""))}</rdf:li></rdf:Alt></dc:description>'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def encode(image: Image.Image, fmt: str, quality: int | None,
           meta: Mapping[str, str] | None) -> bytes:
    """``image`` in ``fmt`` (png, webp, jpeg, avif), with ``meta`` as PNG text chunks or XMP."""
    options: dict[str, Any] = {}
    if quality is not None and fmt != "png":
        options["quality"] = quality
    alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha
    elif fmt != "png" and image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if alpha else "RGB")
    if meta:
        if fmt == "png":
            info = PngImagePlugin.PngInfo()
            info.add_text("Description", meta.get("prompt", ""))  # iTXt when not Latin-1
            info.add_text("Software", f"batcher {meta.get('batcher_version', '')}")
            for key, value in meta.items():
                info.add_text(key, value)
            options["pnginfo"] = info
        else:
            options["xmp"] = xmp_packet(meta)
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMAT[fmt], **options)
    return buffer.getvalue()


def _write(root: Path, relative: str, data: bytes) -> dict[str, Any]:
    with atomic_open(root / relative) as handle:
        handle.write(data)
    return {"path": relative, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _delivered_kind(path: str) -> str | None:
    ext = path.rsplit(".", 1)[-1].lower()
    return ext if ext in DELIVERED_KINDS else None


def derive_sync(
    root: Path, record: Record, outputs: Outputs | None, inputs: list[tuple[str, bytes]],
    spec: str,
) -> dict[str, Any]:
    """Make a task's derived files under ``root``; returns its ``derived`` value."""
    files: list[dict[str, Any]] = []
    errors: list[str] = []
    if outputs is not None:
        meta = metadata_of(record) if outputs.metadata else None
        layout = Layout(root)
        for original in record.files:
            kind = _delivered_kind(original.path)
            try:
                layout.resolve(original.path)  # a ledger from elsewhere may name anything
            except ValueError as exc:
                errors.append(str(exc))
                continue
            if kind is not None:
                files.extend(_derive_one(root, original.path, kind, outputs, meta, errors))
    max_pixels = outputs.max_pixels if outputs is not None else DEFAULT_MAX_PIXELS
    for sha, data in inputs:
        try:
            with Image.open(io.BytesIO(data)) as image:
                _check_pixels(image, max_pixels)
                image.thumbnail((INPUT_SIDE, INPUT_SIDE), Image.Resampling.LANCZOS)
                thumb = encode(image, "webp", 80, None)
        except _DECODE_ERRORS as exc:
            errors.append(f"input {sha[:16]}: {_why(exc)}")
            continue
        name = f"{slugify(record.job, 64)}/inputs/{sha[:16]}.webp"
        files.append({**_write(root, name, thumb), "role": "input", "of": sha})
    derived: dict[str, Any] = {"spec": spec, "files": files}
    if errors:
        derived["error"] = "; ".join(errors)[:500]
        log.warning("task %s: some derived files were not made: %s", record.id, errors[0])
    return derived


def _derive_one(root: Path, path: str, kind: str, outputs: Outputs,
                meta: Mapping[str, str] | None, errors: list[str]) -> list[dict[str, Any]]:
    """The derived files of one delivered image; none (and an error) when Pillow cannot."""
    stem = path.rsplit(".", 1)[0]
    made: list[tuple[str, bytes, dict[str, Any]]] = []  # (name, bytes, what the entry adds)
    try:
        with Image.open(root / path) as image:
            _check_pixels(image, outputs.max_pixels)
            image.load()
            if outputs.format is not None:
                name = f"{stem}.{_EXT[outputs.format]}"
                if name == path:
                    name = f"{stem}@full.{_EXT[outputs.format]}"
                made.append((name, encode(image, outputs.format, outputs.quality, meta),
                             {"role": "full"}))
            size_format = outputs.format or ("png" if kind == "gif" else kind)
            for size, side in outputs.sizes:
                copy = image.copy()
                copy.thumbnail((side, side), Image.Resampling.LANCZOS)  # never enlarges
                made.append((f"{stem}@{size}.{_EXT[size_format]}",
                             encode(copy, size_format, outputs.quality, meta),
                             {"role": f"size:{size}", "side": side}))
    except _DECODE_ERRORS as exc:
        if isinstance(exc, OSError) and not (root / path).is_file():
            raise  # the delivered file is gone: the caller's problem, not the image's
        errors.append(f"{path}: {_why(exc)}")
        return []
    # Written only once every encode succeeded: a file on disk means all its siblings are.
    return [{**_write(root, name, data), **extra, "of": path} for name, data, extra in made]


def _why(exc: BaseException) -> str:
    if isinstance(exc, TooManyPixels):
        return str(exc)  # its reason first: too_many_pixels
    return f"{type(exc).__name__}: {exc}"


def input_images(task: Task) -> list[tuple[str, bytes]]:
    """An edit task's local and data-URI inputs: (sha256, bytes). URLs are not fetched."""
    found = []
    for text in task.images:
        ref = parse_ref(text)
        if ref.kind == FILE:
            data = ref.path(task.base_dir or Path(".")).read_bytes()
        elif ref.kind == DATA:
            data = data_uri_bytes(ref.text)
        else:
            continue
        found.append((hashlib.sha256(data).hexdigest(), data))
    return found


class Deriver:
    """The derived files each job of a manifest wants, and the making of them."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        # Derivation is CPU-bound: more at once than cores only holds more images in memory.
        self._gate = asyncio.Semaphore(os.cpu_count() or 2)
        self.jobs: dict[str, JobSpec] = {job.name: job for job in manifest.jobs}
        self.specs: dict[str, str | None] = {
            job.name: job_spec(job.outputs, job.type == "image" and bool(job.images))
            for job in manifest.jobs
        }

    def spec(self, job: str) -> str | None:
        return self.specs.get(job)

    async def derive(self, task: Task, record: Record) -> dict[str, Any] | None:
        """The derived files of an ok task, made now; ``None`` when its job wants none."""
        spec = self.specs.get(task.job)
        if spec is None or record.status != "ok":
            return None
        job = self.jobs[task.job]
        async with self._gate:
            return await asyncio.to_thread(self._derive, task, record, job.outputs, spec)

    def _derive(self, task: Task, record: Record, outputs: Outputs | None,
                spec: str) -> dict[str, Any]:
        inputs = input_images(task) if task.kind == "image" and task.images else []
        return derive_sync(self.root, record, outputs, inputs, spec)

