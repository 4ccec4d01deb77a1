"""A provider's rate limit as the user writes it (``60/min``, ``20/10s``): parsed once, then
read by the pacer that keeps it (:class:`batcher.run.limits.Pacer`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


_UNIT_NAMES = {1.0: "s", 60.0: "min", 3600.0: "h"}


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


# Requests are spaced so that N+1 consecutive starts span the period plus this much: the
# provider counts arrivals, and arrivals jitter by a few milliseconds on the way there.
JITTER_MARGIN = 0.02


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` requests started in any rolling window of ``period`` seconds."""

    count: float
    period: float
    text: str = field(default="", compare=False)  # as the user wrote it, for messages

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @property
    def interval(self) -> float:
        """The even spacing between starts, with room for network jitter."""
        margin = min(JITTER_MARGIN * self.period / max(self.count, 1.0), JITTER_MARGIN)
        return self.period / self.count + margin

    def __str__(self) -> str:
        if self.text:
            return self.text
        count = int(self.count) if self.count == int(self.count) else self.count
        unit = _UNIT_NAMES.get(self.period, f"{self.period:g}s")
        return f"{count}/{unit}"


def parse_rate(text: str) -> Rate:
    """Parse ``N/s``, ``N/min``, ``N/h`` or ``N/<number><unit>`` such as ``20/10s``.

    Raises ``ValueError`` with a message fit for a user.
    """
    match = _RATE_RE.match(str(text).lower())
    if not match or match.group(3) not in _UNITS:
        raise ValueError(f"{text!r} is not a rate; write N/s, N/min, N/h or N/<number><unit>")
    count = float(match.group(1))
    period = float(match.group(2) or 1) * _UNITS[match.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"{text!r}: the count and the period must be positive")
    return Rate(count, period, "".join(str(text).split()))
