"""Small helpers for the words batcher prints."""

from __future__ import annotations

import math


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, plural unless the count is one: 1 job, 2 jobs, 0 retries."""
    if count == 1:
        return f"{count} {noun}"
    if many is None:
        consonant_y = noun.endswith("y") and noun[-2:-1] not in "aeiou"
        many = noun[:-1] + "ies" if consonant_y else noun + "s"
    return f"{count} {many}"


def usd(amount: float) -> str:
    """An amount in USD for people: cents from $1 up, three significant digits below (so
    $0.018 reads ``$0.0180``, never ``$0.02``); ``$0.00`` for nothing."""
    rounded = float(f"{amount:.3g}")  # 0.0999996 is $0.100, not $0.1000
    if rounded == 0 or abs(rounded) >= 1:
        return f"${amount:,.2f}"
    decimals = max(2 - math.floor(math.log10(abs(rounded))), 2)
    return f"${rounded:.{decimals}f}"
