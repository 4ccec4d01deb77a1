"""Small helpers for the words batcher prints."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, plural unless the count is one: 1 job, 2 jobs, 0 retries."""
    if count == 1:
        return f"{count} {noun}"
    if many is None:
        consonant_y = noun.endswith("y") and noun[-2:-1] not in "aeiou"
        many = noun[:-1] + "ies" if consonant_y else noun + "s"
    return f"{count} {many}"


def usd(amount: float) -> str:
    """An amount in USD for people: cents, or the digits that matter under a cent."""
    if amount == 0 or amount >= 0.01:
        return f"${amount:,.2f}"
    return f"${amount:.6f}".rstrip("0")
