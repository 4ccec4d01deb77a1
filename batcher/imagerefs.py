"""Input image references: the one parser that the manifest, JSONL files, expansion and request
bodies all use, so they cannot disagree about what an entry of ``images`` is.

An entry is one of three kinds:

* an ``http(s)`` URL: sent as written; known to task ids by its address, never fetched to plan;
* a ``data:`` URI (base64): sent as written; it must hold an image;
* anything else is a local file, relative to the manifest or JSONL file: it must be an image
  of at most the provider's ``max_input_bytes``, and is sent as a data URI whose MIME type
  comes from its bytes, not its name.

Other schemes (``file:``, ``ftp://``, ...) are refused. Problems raise ``ValueError`` with a
message for the manifest loader to place (file:line:field).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yarl

from batcher.imagegen import image_kind

URL = "url"
DATA = "data"
FILE = "file"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}
_SNIFF = 16  # bytes image_kind needs


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One entry of ``images``: its kind and the text as written."""

    kind: str  # URL | DATA | FILE
    text: str

    def path(self, base_dir: Path) -> Path:
        """Where a FILE reference points."""
        return (base_dir / self.text).expanduser()


def parse_ref(value: object) -> ImageRef:
    """Classify an ``images`` entry by its form alone (no file is read); ValueError if none."""
    if not isinstance(value, str) or not value:
        raise ValueError("each entry must be a file path, an http(s) URL or a data URI")
    lowered = value[:8].lower()
    if lowered.startswith(("http://", "https://")):
        check_url(value)
        return ImageRef(URL, value)
    if lowered.startswith("data:"):
        return ImageRef(DATA, value)
    if _SCHEME.match(value) and ("://" in value or lowered.startswith("file:")):
        raise ValueError(f"{value[:60]}: only local files, http(s) URLs and data URIs are read")
    return ImageRef(FILE, value)


def check_url(url: str) -> yarl.URL:
    """``url`` as it would be fetched; ValueError unless it is an http(s) URL with a usable host.

    Checks what the parsers below would raise on later (a bad IPv6 address, a host label IDNA
    cannot encode, control characters), so that nobody meets those errors mid-run.
    """
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        raise ValueError("holds spaces or control characters")
    try:
        parsed = yarl.URL(url)
        host, _port = parsed.raw_host, parsed.port  # both parse lazily and may raise
        if host:
            host.encode("idna")  # what the resolver does; a label over 63 characters fails
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"cannot be parsed ({exc})") from exc
    if parsed.scheme.lower() not in {"http", "https"} or not host:
        raise ValueError("is not an http(s) URL with a host")
    return parsed


def check_local(ref: ImageRef, base_dir: Path, max_bytes: int) -> None:
    """A FILE or DATA reference must hold an image of at most ``max_bytes``; ValueError if not."""
    if ref.kind == DATA:
        data = data_uri_bytes(ref.text)
        if len(data) > max_bytes:
            raise ValueError(f"the data URI holds {len(data)} bytes, over max_input_bytes "
                             f"{max_bytes}")
        if image_kind(data[:_SNIFF]) is None:
            raise ValueError("the data URI does not hold an image (PNG, JPEG, GIF or WebP)")
        return
    if ref.kind != FILE:
        return
    path = ref.path(base_dir)
    if not path.is_file():
        raise ValueError(f"{ref.text}: no such file (paths are relative to the manifest)")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(_SNIFF)
    except OSError as exc:
        raise ValueError(f"{ref.text}: cannot be read ({exc.strerror})") from None
    if size > max_bytes:
        raise ValueError(f"{ref.text}: {size} bytes, over the provider's max_input_bytes "
                         f"{max_bytes}")
    if image_kind(head) is None:
        raise ValueError(f"{ref.text}: not an image (PNG, JPEG, GIF or WebP)")


def data_uri_bytes(uri: str) -> bytes:
    """The bytes of a ``data:<mime>;base64,<payload>`` URI; ValueError for any other form."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ValueError("a data URI must be data:<type>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the data URI's payload is not valid base64") from exc


def digest(ref: ImageRef, data: bytes | None = None) -> str:
    """What a task id knows of an input: a URL by address, a data URI or file by content hash.

    ``data`` is a FILE's bytes (the caller reads and caches them).
    """
    if ref.kind == URL:
        return "url:" + ref.text  # remote inputs are not fetched to plan
    if ref.kind == DATA:
        return hashlib.sha256(ref.text.encode()).hexdigest()
    assert data is not None
    return hashlib.sha256(data).hexdigest()


def as_data_uri(data: bytes) -> str:
    """A local file's bytes as a data URI, its MIME type taken from the bytes."""
    mime = _MIME.get(image_kind(data[:_SNIFF]) or "", "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
