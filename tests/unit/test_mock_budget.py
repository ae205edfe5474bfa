"""The mock upstream's organisation budget: buckets, windows, headers, 429s."""

from __future__ import annotations

import httpx
import pytest

from worker.limits.headers import read_budget
from worker.mock.budget import BudgetConfig, OrgBudget, go_duration, request_tokens
from worker.mock.upstream import MockConfig, MockUpstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.12, "120ms"), (1.0, "1s"), (360.0, "6m0s"), (61.5, "1m1.5s")]
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_tokens_counted_as_openai_counts_them() -> None:
    assert request_tokens(BODY) == 100 + 50


def test_requests_are_enforced_over_the_window_and_reported_per_minute() -> None:
    clock = Clock()
    budget = OrgBudget(BudgetConfig(rpm=600), clock)  # 10 a second, 10 in any second
    verdicts = [budget.admit(BODY) for _ in range(11)]
    assert [v.refused for v in verdicts] == [None] * 10 + ["requests"]
    last = read_budget(verdicts[9].headers)
    assert last.requests is not None and (last.requests.limit, last.requests.remaining) == (
        600,
        590,
    )
    refused = verdicts[10]
    assert refused.headers["retry-after-ms"] == "100"
    assert refused.headers["retry-after"] == "1"
    clock.now = 0.1
    assert budget.admit(BODY).refused is None  # refilled continuously


def test_tokens_bind_and_retry_after_can_be_off() -> None:
    clock = Clock()
    budget = OrgBudget(BudgetConfig(rpm=6000, tpm=18_000, retry_after=False), clock)
    assert budget.admit(BODY).refused is None  # 150 of 300 a second
    assert budget.admit(BODY).refused is None
    refused = budget.admit(BODY)
    assert refused.refused == "tokens"
    assert "retry-after" not in refused.headers and "retry-after-ms" not in refused.headers
    assert read_budget(refused.headers).tokens is not None


def test_window_report_gives_the_bucket_as_a_share_of_the_minute() -> None:
    """Issue 22 item 21: a provider that quantises 3,000 requests a minute as 50 a second
    reports that bucket as a share of the minute's limit: each call takes 60 from it, and
    ``reset`` is the time until it is full."""
    clock = Clock()
    budget = OrgBudget(BudgetConfig(rpm=3000, report="window"), clock)
    first = read_budget(budget.admit(BODY).headers)
    assert first.requests is not None
    assert (first.requests.limit, first.requests.remaining) == (3000, 2940)
    assert first.requests.reset == pytest.approx(0.02)
    verdicts = [budget.admit(BODY) for _ in range(49)]
    assert [v.refused for v in verdicts] == [None] * 49  # 50 in the bucket
    spent = read_budget(verdicts[-1].headers)
    assert spent.requests is not None and spent.requests.remaining == 0
    assert spent.requests.reset == pytest.approx(1.0)
    assert budget.admit(BODY).refused == "requests"
    clock.now = 0.5  # half the bucket back: 25 calls, 1,500 of the minute's 3,000
    half = read_budget(budget.admit(BODY).headers)
    assert half.requests is not None and half.requests.remaining == 1440
    with pytest.raises(ValueError, match="report"):
        BudgetConfig(rpm=60, report="hour")  # type: ignore[arg-type]


async def test_mock_window_report_over_http() -> None:
    config = MockConfig(budget=BudgetConfig(rpm=3000, report="window"))
    async with MockUpstream(config) as mock, httpx.AsyncClient() as client:
        answer = await client.post(f"{mock.base_url}/chat/completions", json=BODY)
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-limit-requests"] == "3000"
        assert answer.headers["x-ratelimit-remaining-requests"] == "2940"
        assert answer.headers["x-ratelimit-reset-requests"] == "20ms"


def test_concurrency_cap_refuses_without_headers() -> None:
    budget = OrgBudget(BudgetConfig(max_concurrent=1), Clock())
    assert budget.admit(BODY).refused is None
    refused = budget.admit(BODY)
    assert refused.refused == "concurrency" and refused.headers == {}
    budget.done()
    assert budget.admit(BODY).refused is None


async def test_mock_rate_limit_mode_over_http() -> None:
    config = MockConfig(budget=BudgetConfig(rpm=60))  # one a second
    async with MockUpstream(config) as mock, httpx.AsyncClient() as client:
        url = f"{mock.base_url}/chat/completions"
        first = await client.post(url, json=BODY)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "60"
        assert first.headers["x-ratelimit-remaining-requests"] == "59"
        second = await client.post(url, json=BODY)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        assert float(second.headers["retry-after-ms"]) > 0
        assert mock.stats.faults["rate_limit"] == 1


async def test_mock_insufficient_quota_fault() -> None:
    async with MockUpstream() as mock, httpx.AsyncClient() as client:
        body = {**BODY, "mock": {"fault": "insufficient_quota"}}
        answer = await client.post(f"{mock.base_url}/chat/completions", json=body)
        assert answer.status_code == 429
        error = answer.json()["error"]
        assert error["code"] == error["type"] == "insufficient_quota"
