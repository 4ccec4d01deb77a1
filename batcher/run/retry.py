"""What to do after a request failed: the one place that classifies outcomes.

Retried: 408, 409, 429, 5xx, timeouts, connection errors, unparseable or incomplete answers, and
failed downloads. Never retried: other 4xx, which are recorded with the provider's message, and
an answer over ``max_response_bytes`` (``too_large``: asking again would pay for it again).
401/403 stop the run. A 429 that says the quota is spent, a redirect (3xx: base_url is wrong,
and following it could carry the key elsewhere), or a wait asked for over the provider's
``max_wait`` stops its provider.

The verdict is applied to a task, with the provider's limits (retries, regenerations, an
endpoint never reached), in one place: :meth:`batcher.run.course.Course.after_failure`. The
words for each stop are :mod:`batcher.run.outcome`'s.
"""

from __future__ import annotations

import math
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


class Cause(Enum):
    """Why a verdict stops the run or a provider."""

    KEY_REFUSED = "key refused"  # 401, 403
    REDIRECTED = "redirected"  # 3xx
    QUOTA_SPENT = "quota spent"  # a 429 that says so
    WAIT_TOO_LONG = "wait too long"  # a wait asked for over max_wait


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
    cause: Cause | None = None  # why it stops (STOP_RUN, STOP_PROVIDER)


def classify(error: ProviderError, *, max_wait: float = math.inf) -> Verdict:
    """Decide what one failed attempt means; a provider asking to wait over ``max_wait``
    seconds is stopped rather than waited for."""
    verdict = _verdict(error)
    if verdict.wait is not None and verdict.wait > max_wait:
        return Verdict(Action.STOP_PROVIDER, verdict.rate_limited, verdict.wait,
                       Cause.WAIT_TOO_LONG)
    return verdict


def _verdict(error: ProviderError) -> Verdict:
    if isinstance(error, HTTPStatusError):
        status = error.status
        if status in AUTH_STATUS:
            return Verdict(Action.STOP_RUN, cause=Cause.KEY_REFUSED)
        if 300 <= status < 400:  # every request will be redirected alike: base_url is wrong
            return Verdict(Action.STOP_PROVIDER, cause=Cause.REDIRECTED)
        if status == 429:
            if (error.code or "").lower() not in _RATE_CODES and _QUOTA.search(
                f"{error.code or ''} {error.message}"
            ):
                return Verdict(Action.STOP_PROVIDER, rate_limited=True, cause=Cause.QUOTA_SPENT)
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


