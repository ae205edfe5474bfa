"""Reading the rate-limit budget from answers' headers: each format, garbage, missing."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from worker.limits.headers import Dimension, parse_duration, read_budget, retry_after_seconds

NOW = 1_764_000_000.0  # a fixed wall clock


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("17ms", 0.017),
        ("2", 2.0),  # bare seconds
        ("250us", 0.00025),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "soon", "1x", "s", "5s later", "1s2", "-1s", "ms"])
def test_bad_durations(text: str | None) -> None:
    assert parse_duration(text) is None


def test_openai_headers() -> None:
    budget = read_budget(
        {
            "X-RateLimit-Limit-Requests": "3000",
            "x-ratelimit-remaining-requests": "2999",
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        NOW,
    )
    assert budget.requests == Dimension(3000, 2999, 0.02)
    assert budget.tokens == Dimension(150000, 149000, 360.0)
    assert budget.retry_after is None
    assert budget.requests.refill_rate == 50.0
    assert budget.tokens.fraction == pytest.approx(149 / 150)


def test_anthropic_headers_take_the_tightest_token_budget() -> None:
    reset = "2025-11-24T16:00:30Z"
    at = 1764000000.0  # 2025-11-24T16:00:00Z
    budget = read_budget(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "10",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "4000",
            "anthropic-ratelimit-input-tokens-reset": reset,
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "6000",
            "anthropic-ratelimit-output-tokens-reset": "2025-11-24T16:00:05+00:00",
        },
        at,
    )
    assert budget.requests == Dimension(50, 10, 30.0)
    assert budget.tokens == Dimension(40000, 4000, 30.0)  # 10 % left beats 75 %


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "20", "retry-after": "9"}) == 0.02
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, NOW) == pytest.approx(30.0)
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    assert retry_after_seconds({"retry-after": past}, NOW) == 0.0
    assert read_budget({"Retry-After": "3"}, NOW).retry_after == 3.0


def test_a_negative_retry_after_ms_does_not_hide_retry_after() -> None:
    """Issue 22 item 6: ``retry-after-ms: -5`` is nonsense; the valid ``retry-after``
    beside it is the wait."""
    headers = {"retry-after-ms": "-5", "retry-after": "10"}
    assert retry_after_seconds(headers) == 10.0
    assert retry_after_seconds(httpx.Headers(headers)) == 10.0
    assert read_budget(headers, NOW).retry_after == 10.0
    assert retry_after_seconds({"retry-after-ms": "-5"}) is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ratelimit-limit-requests": "lots", "x-ratelimit-remaining-requests": "5"},
        {"x-ratelimit-limit-requests": "100"},  # remaining missing
        {"x-ratelimit-limit-requests": "0", "x-ratelimit-remaining-requests": "0"},
        {"x-ratelimit-limit-tokens": "nan", "x-ratelimit-remaining-tokens": "inf"},
        {"anthropic-ratelimit-tokens-limit": "10", "anthropic-ratelimit-tokens-remaining": ""},
        {"retry-after": "tomorrow"},
        {"retry-after-ms": "NaN"},
        {"retry-after": "Mon, 99 Foo 2025 25:61:00 GMT"},
    ],
)
def test_garbage_and_missing_read_as_nothing(headers: dict[str, str]) -> None:
    assert read_budget(headers, NOW).empty


def test_garbage_reset_keeps_the_rest() -> None:
    budget = read_budget(
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "150",  # clamped to the limit
            "x-ratelimit-reset-requests": "whenever",
            "anthropic-ratelimit-tokens-limit": "1000",
            "anthropic-ratelimit-tokens-remaining": "-5",
            "anthropic-ratelimit-tokens-reset": "not a time",
        },
        NOW,
    )
    assert budget.requests == Dimension(100, 100, None)
    assert budget.tokens == Dimension(1000, 0, None)
