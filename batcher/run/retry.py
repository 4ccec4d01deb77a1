"""What to do after a request failed: the one place that classifies outcomes.

Retried: 408, 409, 429, 5xx, timeouts, connection errors, unparseable or incomplete answers, and
failed downloads. Never retried: other 4xx, which are recorded with the provider's message, and
an answer over ``max_response_bytes`` (``too_large``: asking again would pay for it again).
401/403 stop the run. A 429 that says the quota is spent, or a redirect (3xx: base_url is
wrong, and following it could carry the key elsewhere), stops its provider.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from batcher.errors import (
    DownloadError,
    HTTPStatusError,
    InternalError,
    ProviderError,
    ResponseError,
)

RETRYABLE_STATUS = frozenset({408, 409, 429})
AUTH_STATUS = frozenset({401, 403})
# A 429 whose code or message says the quota (not the rate) is spent: waiting will not help.
_QUOTA = re.compile(r"insufficient.quota|quota.exceeded|exceeded your (current )?quota|"
                    r"(daily|monthly) quota|billing", re.IGNORECASE)
_RATE_CODES = {"rate_limit_exceeded", "rate_limited", "too_many_requests"}


class Action(Enum):
    RETRY = "retry"
    FAIL = "fail"  # record the failure, go on with other tasks
    STOP_PROVIDER = "stop_provider"  # no use sending this provider anything more
    STOP_RUN = "stop_run"  # the key or the config is refused: stop everything (exit 3)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rate_limited: bool = False
    wait: float | None = None  # the provider's own hint, in seconds


def classify(error: ProviderError) -> Verdict:
    """Decide what one failed attempt means."""
    if isinstance(error, HTTPStatusError):
        status = error.status
        if status in AUTH_STATUS:
            return Verdict(Action.STOP_RUN)
        if 300 <= status < 400:  # every request will be redirected alike: base_url is wrong
            return Verdict(Action.STOP_PROVIDER)
        if status == 429:
            if (error.code or "").lower() not in _RATE_CODES and _QUOTA.search(
                f"{error.code or ''} {error.message}"
            ):
                return Verdict(Action.STOP_PROVIDER, rate_limited=True)
            return Verdict(Action.RETRY, rate_limited=True, wait=error.retry_after)
        if status in RETRYABLE_STATUS or status >= 500:
            return Verdict(Action.RETRY, wait=error.retry_after)
        return Verdict(Action.FAIL)
    if isinstance(error, DownloadError) and not error.retryable:
        return Verdict(Action.FAIL)
    if isinstance(error, InternalError):  # the same answer would fail the same way
        return Verdict(Action.FAIL)
    if isinstance(error, ResponseError) and error.reason in {"too_large", "bad_encoding"}:
        return Verdict(Action.FAIL)
    return Verdict(Action.RETRY)


def stop_reason(error: ProviderError) -> str:
    """Why a provider takes no more tasks after ``error`` (a STOP_PROVIDER verdict)."""
    if isinstance(error, HTTPStatusError) and 300 <= error.status < 400:
        return error.message
    return f"the provider says its quota is spent ({error})"


