"""How the local server is told to behave: ``ServerOptions`` and the fault kinds it can inject."""

from __future__ import annotations

from dataclasses import dataclass

# fmt: off
FAULT_KINDS = (
    "500", "502", "503", "429", "reset", "truncated", "garbage", "empty_data", "bad_b64",
    "url_404", "not_image", "slow",
)
# fmt: on


@dataclass(slots=True)
class ServerOptions:
    """How the local server behaves; every field has a harmless default.

    Not frozen: a test may change a field of a running server (a key revoked, a quota topped
    up), and the server reads each field when a request needs it.
    """

    host: str = "127.0.0.1"
    port: int = 0  # 0 = ephemeral
    latency: float = 0.0  # seconds added before each generation answer
    rate_limit: tuple[float, float] | None = None  # (count, period_s) over accepted arrivals
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    fault_rate: float = 0.0  # fraction of distinct bodies that fault on their first arrival
    fault_kinds: tuple[str, ...] = ("500", "502", "503", "reset", "truncated")
    fail_rate: float = 0.0  # fraction of distinct bodies that always answer 500
    quota_exhausted: bool = False  # every generation answers 429 insufficient_quota
    max_image_side: int = 1024
    image_grain: bool = False  # photo-sized PNGs (~3 MB at 1024x1024), for benchmarks
    files_port: int = 0  # port of the files listener; 0 = ephemeral
    download_status: int | None = None  # when set, every image download answers this status
    max_records: int | None = 100_000  # stats.requests keeps at most this many, newest last
    log_requests: bool = False  # one log line per request (`batcher serve`; not inside a run)

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.fault_kinds if kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        for name in ("fault_rate", "fail_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
