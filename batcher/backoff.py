"""How long to wait before trying again: capped exponential backoff with jitter, and the
provider's own ``Retry-After`` hint. Used by requests, downloads and store calls alike."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

BACKOFF_BASE = 0.5


BACKOFF_CAP = 30.0


def backoff(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Capped exponential backoff with jitter for the ``attempt``-th retry (1-based)."""
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), 32))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date).

    Anything unreadable gives ``None``; this never raises.
    """
    try:
        value = headers.get("retry-after-ms")
        if value is not None:
            seconds = _number(value)
            if seconds is not None:
                return seconds / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        seconds = _number(value)
        if seconds is not None:
            return seconds
        when = parsedate_to_datetime(value.strip())
        if when is None or when.tzinfo is None:
            return None
        return max(when.timestamp() - (time.time() if now is None else now), 0.0)
    except (TypeError, ValueError, OverflowError, IndexError, AttributeError):
        return None


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except (TypeError, ValueError, AttributeError):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return max(value, 0.0)
