"""JSON on the per-task path: request bodies, answers, ledger rows, results.jsonl lines.

orjson encodes and decodes these five to ten times faster than the standard library, which is
a good part of batcher's own time per task on a fast endpoint. Output is compact UTF-8, as the
standard library's with ``separators=(",", ":")`` and ``ensure_ascii=False``. Two differences
matter to callers: orjson writes NaN and infinities as ``null`` (the standard library writes
``NaN``, which is not JSON), and it refuses integers beyond 64 bits and non-string keys, which
then go through the standard library. Task ids never use this module: their canonical form is
the standard library's, byte for byte (see :mod:`batcher.tasks`).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError  # a ValueError, as json.JSONDecodeError is


def dumps_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, a key that is not a string
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def dumps(value: Any) -> str:
    return dumps_bytes(value).decode()


def loads(data: bytes | str) -> Any:
    """Parse JSON text; raises :data:`JSONDecodeError` (a ValueError) on anything else,
    including bytes that are not UTF-8."""
    return orjson.loads(data)
