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
    if amount == 0 or abs(amount) >= 1:
        return f"${amount:,.2f}"
    decimals = max(2 - math.floor(math.log10(abs(amount))), 2)
    text = f"{amount:.{decimals}f}"
    return f"${text}" if abs(float(text)) < 1 else f"${amount:,.2f}"
