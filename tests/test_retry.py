"""What a failed request means: Retry-After parsing, classification and backoff."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, formatdate

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from batcher.backoff import BACKOFF_BASE, BACKOFF_CAP, backoff, parse_retry_after
from batcher.errors import (
    DownloadError,
    HTTPStatusError,
    ProviderError,
    ResponseError,
    TransportError,
)
from batcher.run.retry import Action, Verdict, classify

NOW = 1_750_000_000.0  # a fixed "now" for HTTP dates


def headers(**values: str) -> CIMultiDict[str]:
    """Response headers as aiohttp hands them over (case-insensitive)."""
    return CIMultiDict({name.replace("_", "-"): value for name, value in values.items()})


# --------------------------------------------------------------------------- parse_retry_after


def test_retry_after_ms_wins() -> None:
    assert parse_retry_after(headers(retry_after_ms="1500", Retry_After="10")) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "10"}) == 0.25


def test_unreadable_retry_after_ms_falls_back_to_retry_after() -> None:
    assert parse_retry_after(headers(retry_after_ms="soon", Retry_After="4")) == 4.0
    assert parse_retry_after(headers(retry_after_ms="nan", Retry_After="4")) == 4.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10", 10.0), ("0", 0.0), ("2.5", 2.5), (" 7 ", 7.0), ("0.001", 0.001), ("120", 120.0)],
)
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(headers(Retry_After=value)) == seconds


def test_header_names_are_case_insensitive() -> None:
    assert parse_retry_after(headers(RETRY_AFTER="3")) == 3.0
    assert parse_retry_after(headers(Retry_After_Ms="300")) == 0.3


def test_retry_after_http_date() -> None:
    later = formatdate(NOW + 30, usegmt=True)  # e.g. "Sun, 15 Jun 2025 15:07:10 GMT"
    assert parse_retry_after(headers(Retry_After=later), now=NOW) == pytest.approx(30.0)
    earlier = formatdate(NOW - 30, usegmt=True)
    assert parse_retry_after(headers(Retry_After=earlier), now=NOW) == 0.0


def test_retry_after_http_date_with_numeric_zone() -> None:
    zone = timezone(timedelta(hours=2))
    later = format_datetime(datetime.fromtimestamp(NOW + 90, tz=zone))  # "... +0200"
    assert parse_retry_after(headers(Retry_After=later), now=NOW) == pytest.approx(90.0)


@pytest.mark.parametrize(
    "value",
    ["", "soon", "nan", "NaN", "inf", "-inf", "1e999", "Sun, 99 Foo 2025 99:99:99 GMT",
     "Sun, 06 Nov 1994 08:49:37", "\x00", "１０", "10 seconds", "--1", "0x10",
     "Fri, 31 Dec 99999 23:59:59 GMT"],
)
def test_garbage_gives_none(value: str) -> None:
    result = parse_retry_after(headers(Retry_After=value), now=NOW)
    assert result is None or (math.isfinite(result) and result >= 0)
    if value.strip().lower() in {"", "soon", "nan", "inf", "-inf", "1e999", "10 seconds"}:
        assert result is None


@pytest.mark.parametrize("value", ["-5", "-0.5", "-1e10"])
def test_negative_is_never_a_negative_wait(value: str) -> None:
    assert parse_retry_after(headers(Retry_After=value)) in (None, 0.0)
    assert parse_retry_after(headers(retry_after_ms=value)) in (None, 0.0)


def test_huge_values_do_not_raise() -> None:
    result = parse_retry_after(headers(Retry_After="9" * 400))
    assert result is None or (math.isfinite(result) and result >= 0)
    result = parse_retry_after(headers(Retry_After="1e300"))
    assert result is None or (math.isfinite(result) and result >= 0)


def test_no_header() -> None:
    assert parse_retry_after(headers()) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after(headers(Content_Type="application/json")) is None


def _check(result: float | None) -> None:
    assert result is None or (isinstance(result, float) and math.isfinite(result)
                              and result >= 0)


HEADER_NAMES = st.sampled_from(["retry-after", "retry-after-ms", "Retry-After", "RETRY-AFTER-MS",
                                "x-ratelimit-reset"]) | st.text(max_size=20)
HEADER_VALUES = st.one_of(
    st.text(),
    st.floats().map(str),
    st.integers().map(str),
    st.floats(min_value=-2e9, max_value=2.5e11).map(lambda t: formatdate(t, usegmt=True)),
    st.from_regex(r"[A-Z][a-z]{2}, \d{1,3} [A-Z][a-z]{2} \d{1,6} \d\d:\d\d:\d\d( GMT| [+-]\d{4})?",
                  fullmatch=True),
)


@settings(max_examples=500, deadline=None)
@given(values=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4),
       now=st.none() | st.floats(min_value=0, max_value=4e9))
@example(values={"retry-after": "Mon, 01 Jan 0001 00:00:00 GMT"}, now=NOW)
@example(values={"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, now=NOW)
@example(values={"retry-after": "Fri, 31 Dec 9999 23:59:59 +2359"}, now=NOW)
@example(values={"retry-after": "Sat, 32 Dec 2025 10:00:00 GMT"}, now=NOW)
def test_parse_retry_after_never_raises(values: dict[str, str], now: float | None) -> None:
    _check(parse_retry_after(values, now=now))
    _check(parse_retry_after(CIMultiDict(values), now=now))


@settings(max_examples=300, deadline=None)
@given(value=st.text())
def test_any_single_value_never_raises(value: str) -> None:
    _check(parse_retry_after(headers(Retry_After=value), now=NOW))
    _check(parse_retry_after(headers(retry_after_ms=value), now=NOW))


# --------------------------------------------------------------------------- classify


@pytest.mark.parametrize("status", [400, 404, 413, 415, 422])
def test_client_errors_fail_without_retry(status: int) -> None:
    verdict = classify(HTTPStatusError(status, "bad size", retry_after=5.0))
    assert verdict.action is Action.FAIL
    assert not verdict.rate_limited


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_stop_the_run(status: int) -> None:
    assert classify(HTTPStatusError(status, "invalid key")).action is Action.STOP_RUN


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504, 529])
def test_transient_statuses_retry(status: int) -> None:
    verdict = classify(HTTPStatusError(status, "try again", retry_after=3.0))
    assert verdict == Verdict(Action.RETRY, rate_limited=False, wait=3.0)
    assert classify(HTTPStatusError(status, "try again")).wait is None


def test_429_retries_as_rate_limited_with_its_wait() -> None:
    verdict = classify(HTTPStatusError(429, "Rate limit reached for requests",
                                       code="rate_limit_exceeded", retry_after=2.0))
    assert verdict == Verdict(Action.RETRY, rate_limited=True, wait=2.0)
    assert classify(HTTPStatusError(429, "slow down")).action is Action.RETRY


def test_429_insufficient_quota_stops_the_provider() -> None:
    verdict = classify(HTTPStatusError(
        429, "You exceeded your current quota, please check your plan and billing details.",
        code="insufficient_quota"))
    assert verdict.action is Action.STOP_PROVIDER
    assert verdict.rate_limited
    assert classify(HTTPStatusError(429, "x", code="insufficient_quota")).action is (
        Action.STOP_PROVIDER)


def test_per_minute_rate_limit_mentioning_quota_is_retried() -> None:
    # A 429 whose code says it is a rate limit is retried, whatever words its message uses:
    # stopping the provider here would leave every remaining task pending.
    verdict = classify(HTTPStatusError(
        429, "Quota exceeded for requests per minute. Please retry in 2s.",
        code="rate_limit_exceeded", retry_after=2.0))
    assert verdict.action is Action.RETRY


@pytest.mark.parametrize(
    "error",
    [
        TransportError("timed out", reason="timeout"),
        TransportError("connection reset"),
        ResponseError("not JSON"),
        ResponseError("no data", reason="no_data"),
        DownloadError("connection reset while downloading"),
        ProviderError("something else went wrong"),
    ],
    ids=["timeout", "reset", "bad-json", "no-data", "download", "other"],
)
def test_transport_and_response_errors_retry(error: ProviderError) -> None:
    verdict = classify(error)
    assert verdict.action is Action.RETRY
    assert not verdict.rate_limited


def test_download_that_is_not_retryable_fails() -> None:
    error = DownloadError("the URL answered 404", reason="download_404", retryable=False)
    assert classify(error).action is Action.FAIL


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_and_stays_under_its_cap() -> None:
    means = []
    for attempt in range(1, 12):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
        draws = [backoff(attempt) for _ in range(200)]
        assert all(0 < d <= ceiling for d in draws)
        means.append(sum(draws) / len(draws))
    uncapped = [m for a, m in enumerate(means, start=1)
                if BACKOFF_BASE * 2 ** a <= BACKOFF_CAP]
    assert len(uncapped) >= 4
    assert all(later > earlier * 1.5 for earlier, later in zip(uncapped, uncapped[1:],
                                                               strict=False))
    assert max(means) <= BACKOFF_CAP
    assert means[-1] > BACKOFF_CAP / 4  # the cap is reached, not just approached


def test_backoff_with_custom_base_and_cap() -> None:
    draws = [backoff(attempt, base=0.2, cap=2.0) for attempt in range(1, 30) for _ in range(5)]
    assert all(0 < d <= 2.0 for d in draws)
    assert max(draws) > 1.0


def test_backoff_is_jittered() -> None:
    for attempt in (1, 3, 10):
        draws = [backoff(attempt) for _ in range(20)]
        assert len(set(draws)) >= 15


@settings(max_examples=200, deadline=None)
@given(attempt=st.integers(min_value=0, max_value=100_000))
@example(attempt=1100)
def test_backoff_never_exceeds_the_cap(attempt: int) -> None:
    wait = backoff(attempt)
    assert 0 < wait <= BACKOFF_CAP
