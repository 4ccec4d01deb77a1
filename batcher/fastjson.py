"""JSON on the per-task path: request bodies, answers, ledger rows, results.jsonl lines.

orjson encodes and decodes these five to ten times faster than the standard library, which is
a good part of batcher's own time per task on a fast endpoint. Output is compact UTF-8, as the
standard library's with ``separators=(",", ":")`` and ``ensure_ascii=False``. Values a user
writes (params, JSONL lines) are checked with :func:`unsendable` when the manifest loads, so
what reaches :func:`dumps` is plain JSON that both libraries write alike. Task ids never use
this module: their canonical form is the standard library's, byte for byte (see
:mod:`batcher.manifest.tasks`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError  # a ValueError, as json.JSONDecodeError is
_INT64 = range(-(2**63), 2**63)


def dumps_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # not plain JSON after all; the standard library says what it makes of it
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def dumps(value: Any) -> str:
    return dumps_bytes(value).decode()


def loads(data: bytes | str) -> Any:
    """Parse JSON text; raises a ValueError on anything else.

    What orjson refuses and the standard library reads (a byte-order mark, UTF-16, ``NaN`` in a
    ledger written by an older batcher) is read by the standard library.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def unsendable(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first part of ``value`` that is not plain, portable JSON, as (where, why), or None.

    Plain: strings of valid Unicode, booleans, null, 64-bit integers, finite numbers, and lists
    and mappings of these with string keys. APIs refuse the rest, or read it differently.
    """
    if _plain(value):  # the common case, without building a path for every part
        return None
    return _first_unsendable(value, path)


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain JSON, for the exact built-in types only (anything else,
    subclasses included, is left to :func:`_first_unsendable`): once per answer on the
    per-task path, so scalars are checked in their container's loop."""
    kind = type(value)
    if kind is dict:
        for key in value:
            if type(key) is not str or not (key.isascii() or _is_unicode(key)):
                return False
        return _plain_items(value.values())
    if kind is list or kind is tuple:
        return _plain_items(value)
    return _plain_items((value,))


def _plain_items(items: Iterable[Any]) -> bool:
    for item in items:
        kind = type(item)
        if kind is str:
            if not (item.isascii() or _is_unicode(item)):
                return False
        elif kind is int:
            if item not in _INT64:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif kind is dict or kind is list or kind is tuple:
            if not _plain(item):
                return False
        elif item is not None and kind is not bool:
            return False
    return True


def _first_unsendable(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        return None if _is_unicode(value) else (path, "holds a lone surrogate (not Unicode)")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if value in _INT64 else (path, "is an integer beyond 64 bits")
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, "is not a finite number")
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if (found := _first_unsendable(item, f"{path}[{index}]")) is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str) or not _is_unicode(key):
                return where, "has a key that is not a string of valid Unicode"
            if (found := _first_unsendable(item, where)) is not None:
                return found
        return None
    return path, f"is a {type(value).__name__}, not a JSON value (quote dates and times)"


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
