"""Deterministic PNG pictures in pure Python, and image type sniffing.

The local server answers image generations with these pictures: a vertical colour gradient,
a diagonal band and a shaded disc, every colour and position drawn from sha256 of a key. The
same key always gives the same bytes; different keys give visibly different pictures.

Speed comes from never touching single pixels in Python: each row starts as a copy of the
gradient colour repeated across the width, and each shape overwrites one contiguous run of it
with a slice assignment, so a 1024x1024 image costs a few thousand C-level byte operations
plus one fast ``zlib`` pass.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RGB = tuple[int, int, int]


def image_kind(data: bytes) -> str | None:
    """Return ``"png"``, ``"jpeg"``, ``"gif"`` or ``"webp"`` from the magic bytes, else None."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """Return ``(width, height)`` from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass(frozen=True, slots=True)
class _Scene:
    """Everything a picture is made of, in pixels; drawn from a key's hash."""

    top: RGB
    bottom: RGB
    band: RGB
    band_width: float
    band_slope: float  # x shift of the band per row
    band_x0: float  # x of the band's centre on row 0
    rim: RGB
    disc: RGB
    highlight: RGB
    cx: float
    cy: float
    radius: float


def render_png(key: str, width: int, height: int, *, grain: bool = False) -> bytes:
    """Render a valid 8-bit RGB PNG of ``width`` x ``height`` determined entirely by ``key``.

    The same key and size always give the same bytes. Sizes must be at least 1x1. ``grain``
    adds noise to the two low bits of every byte, as a camera sensor would: the picture looks
    the same but weighs what a photograph of its size weighs (about 3 MB at 1024x1024), for
    benchmarks that must move realistic payloads.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    rows = _rows(_scene(digest, width, height), width, height)
    if grain:
        rows = _grained(rows, digest, width * 3, height)
    raw = b"".join(rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            # Noise does not compress: store it rather than spend time failing to.
            _chunk(b"IDAT", zlib.compress(raw, 0 if grain else 1)),
            _chunk(b"IEND", b""),
        )
    )


def _grained(
    rows: Iterator[bytes], digest: bytes, row_bytes: int, height: int
) -> Iterator[bytes]:
    """XOR the two low bits of every byte of each scanline with a stream drawn from the key.

    ``rows`` alternates filter bytes and scanlines, as :func:`_rows` yields them.
    """
    mask = int.from_bytes(b"\x03" * row_bytes, "big")
    pool = hashlib.shake_256(digest).digest(row_bytes * height)
    for index, (filter_byte, row) in enumerate(zip(rows, rows, strict=True)):
        noise = int.from_bytes(pool[index * row_bytes : (index + 1) * row_bytes], "big") & mask
        yield filter_byte
        yield (int.from_bytes(row, "big") ^ noise).to_bytes(row_bytes, "big")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _hsv(h: float, s: float, v: float) -> RGB:
    """An HSV colour as 8-bit RGB (h, s, v in [0, 1])."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return round(r * 255), round(g * 255), round(b * 255)


def _scene(digest: bytes, width: int, height: int) -> _Scene:
    def unit(i: int) -> float:
        return digest[i] / 255

    hue = unit(0)
    disc_hue = (hue + 0.25 + 0.5 * unit(10)) % 1
    side = min(width, height)
    slope = (0.4 + 1.2 * unit(7)) * (1 if digest[8] & 1 else -1)
    # Complementary hues and different brightness keep every picture far from one flat colour.
    return _Scene(
        top=_hsv(hue, 0.35 + 0.3 * unit(1), 0.95),
        bottom=_hsv((hue + 0.12 + 0.2 * unit(2)) % 1, 0.8, 0.25 + 0.2 * unit(3)),
        band=_hsv((hue + 0.5) % 1, 0.55 + 0.4 * unit(4), 0.55 + 0.4 * unit(5)),
        band_width=side * (0.08 + 0.15 * unit(6)),
        band_slope=slope,
        # The band passes through a point in the middle half, so it always crosses the picture.
        band_x0=width * (0.25 + 0.5 * unit(9)) - slope * height / 2,
        rim=_hsv(disc_hue, 0.9, 0.45),
        disc=_hsv(disc_hue, 0.7 + 0.3 * unit(11), 0.85),
        highlight=_hsv(disc_hue, 0.25, 1.0),
        cx=width * (0.25 + 0.5 * unit(12)),
        cy=height * (0.25 + 0.5 * unit(13)),
        radius=side * (0.15 + 0.2 * unit(14)),
    )


def _rows(scene: _Scene, width: int, height: int) -> Iterator[bytes]:
    """Yield each PNG scanline: filter byte 0, then the row's RGB bytes."""
    top, bottom = scene.top, scene.bottom
    span = max(height - 1, 1)
    for y in range(height):
        f = y / span
        bg = bytes(round(top[c] + (bottom[c] - top[c]) * f) for c in range(3))
        row = bytearray(bg * width)
        centre = scene.band_x0 + scene.band_slope * y
        _paint(row, width, centre - scene.band_width / 2, centre + scene.band_width / 2, scene.band)
        # A dark rim, the disc shifted up-left inside it, then a small highlight: a lit sphere.
        cx, cy, r = scene.cx, scene.cy, scene.radius
        _paint_disc(row, width, y, cx, cy, r, scene.rim)
        _paint_disc(row, width, y, cx - 0.06 * r, cy - 0.06 * r, 0.9 * r, scene.disc)
        _paint_disc(row, width, y, cx - 0.35 * r, cy - 0.35 * r, 0.3 * r, scene.highlight)
        yield b"\x00"
        yield bytes(row)


def _paint_disc(
    row: bytearray, width: int, y: int, cx: float, cy: float, radius: float, color: RGB
) -> None:
    dy = y + 0.5 - cy
    if abs(dy) < radius:
        half = math.sqrt(radius * radius - dy * dy)
        _paint(row, width, cx - half, cx + half, color)


def _paint(row: bytearray, width: int, x0: float, x1: float, color: RGB) -> None:
    """Overwrite pixels ``[x0, x1)`` of ``row`` (clipped to the image) with ``color``."""
    a, b = max(0, round(x0)), min(width, round(x1))
    if b > a:
        row[3 * a : 3 * b] = bytes(color) * (b - a)
