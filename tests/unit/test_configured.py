"""Configured limits in the process (worker/limits/configured.py's LocalQuota)."""

from __future__ import annotations

import pytest

from worker.limits.configured import ConfiguredLimits, LocalQuota


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_rpm_is_a_bucket_of_one_seconds_budget_that_refills_continuously() -> None:
    clock = Clock()
    quota = LocalQuota(ConfiguredLimits(rpm=60, tpm=None, max_concurrency=None), clock)
    waits = [await quota.reserve(0, horizon=100) for _ in range(3)]
    assert waits == pytest.approx([0.0, 1.0, 2.0])  # one a second: no burst past the rate
    clock.now = 10.0  # the debt is paid and the bucket is full again (one second's worth)
    assert await quota.reserve(0, horizon=100) == 0.0
    assert await quota.reserve(0, horizon=100) == pytest.approx(1.0)


async def test_a_wait_past_the_horizon_takes_nothing() -> None:
    quota = LocalQuota(ConfiguredLimits(rpm=60, tpm=None, max_concurrency=None), Clock())
    assert await quota.reserve(0, horizon=0) == 0.0
    assert await quota.reserve(0, horizon=0.5) == pytest.approx(1.0)  # past the horizon
    assert await quota.reserve(0, horizon=0.5) == pytest.approx(1.0)  # nothing was taken


async def test_a_call_is_charged_at_most_one_bucket() -> None:
    """Issue 22 item 1: a job asking a billion tokens does not close the gate for hours."""
    rate = 1000 / 60
    quota = LocalQuota(ConfiguredLimits(rpm=None, tpm=1000, max_concurrency=None), Clock())
    assert quota.charge(10**9) == pytest.approx(rate, abs=1)
    assert await quota.reserve(10**9, horizon=0) == 0.0
    assert await quota.reserve(10, horizon=100) == pytest.approx(10 / rate, rel=0.1)


async def test_correct_gives_back_what_an_answer_did_not_use() -> None:
    rate = 1000 / 60
    quota = LocalQuota(ConfiguredLimits(rpm=None, tpm=1000, max_concurrency=None), Clock())
    assert await quota.reserve(16, horizon=0) == 0.0
    before = await quota.reserve(10, horizon=0)  # not taken: a wait
    await quota.correct(-16)  # the answer used none of the 16 estimated
    after = await quota.reserve(10, horizon=100)
    assert before > 0 and after == 0.0, (before, after, rate)


async def test_max_concurrency_slots() -> None:
    quota = LocalQuota(ConfiguredLimits(rpm=None, tpm=None, max_concurrency=2))
    first, second = await quota.acquire_slot(0.1), await quota.acquire_slot(0.1)
    assert first and second
    assert await quota.acquire_slot(0.05) is None
    await quota.release_slot(first)
    assert await quota.acquire_slot(0.1)


async def test_no_limits_never_wait() -> None:
    quota = LocalQuota(ConfiguredLimits(rpm=None, tpm=None, max_concurrency=None))
    assert await quota.reserve(10**9, horizon=0) == 0.0
    assert await quota.acquire_slot(0) == ""
