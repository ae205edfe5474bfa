"""The budget ledger (§17) against a real Redis: limits, periods, settlements, replicas."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.budgets import NO_TENANT, BudgetsFile, Exceeded, Ledger, Reservation

pytestmark = pytest.mark.integration

JAN_31_NOON = datetime(2030, 1, 31, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def rules(*entries: dict[str, Any]) -> BudgetsFile:
    return BudgetsFile.model_validate({"budgets": list(entries)})


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    """A key prefix of this test's own; its keys are deleted after it."""
    return redis_prefix


@pytest.fixture
async def make_ledger(redis_url: str, prefix: str) -> AsyncIterator[Callable[..., Ledger]]:
    made: list[Ledger] = []

    def make(budgets: BudgetsFile, clock: Clock | None = None) -> Ledger:
        ledger = Ledger(redis_url, budgets, prefix=prefix, clock=clock or Clock(JAN_31_NOON))
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        await ledger.aclose()


async def reserve_until_refused(ledger: Ledger, tenant: str, usd: float) -> int:
    taken = 0
    while isinstance(await ledger.reserve(tenant, usd, 0), Reservation):
        taken += 1
        assert taken < 1000
    return taken


async def test_reserve_until_the_limit_then_refused_until_the_day_turns(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger(rules({"tenant": "team-a", "usd_per_day": 10, "on_exceed": "wait"}))
    assert await reserve_until_refused(ledger, "team-a", 1.0) == 10
    refused = await ledger.reserve("team-a", 1.0, 0)
    assert isinstance(refused, Exceeded)
    assert (refused.tenant, refused.rule, refused.limit) == ("team-a", "usd_per_day", 10)
    assert refused.spent == pytest.approx(10)
    assert refused.on_exceed == "wait"
    assert refused.retry_at == datetime(2030, 2, 1, tzinfo=UTC)
    # A job of unknown price (reserved at $0) does not slip through a spent budget.
    assert isinstance(await ledger.reserve("team-a", 0.0, 0), Exceeded)
    spend = await ledger.spend("team-a")
    assert (spend.usd_day, spend.usd_month, spend.day.isoformat(), spend.month) == (
        pytest.approx(10),
        pytest.approx(10),
        "2030-01-31",
        "2030-01",
    )


async def test_other_tenants_go_on(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(
        rules({"tenant": "team-a", "usd_per_day": 2}, {"tenant": "team-b", "usd_per_day": 3})
    )
    assert await reserve_until_refused(ledger, "team-a", 1.0) == 2
    assert await reserve_until_refused(ledger, "team-b", 1.0) == 3
    # A tenant without a rule (and no "*") has no limit and writes nothing.
    free = await ledger.reserve("team-c", 1e9, 10**12)
    assert isinstance(free, Reservation) and not free.recorded
    assert await ledger.tenants() == ["team-a", "team-b"]


async def test_star_applies_to_each_tenant_apart(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(
        rules({"tenant": "*", "usd_per_day": 2}, {"tenant": "vip", "usd_per_day": 5})
    )
    assert await reserve_until_refused(ledger, "x", 1.0) == 2
    assert await reserve_until_refused(ledger, "y", 1.0) == 2
    assert await reserve_until_refused(ledger, "vip", 1.0) == 5
    assert await reserve_until_refused(ledger, None, 1.0) == 2  # no tenant: one group
    assert (await ledger.spend(None)).tenant == NO_TENANT
    assert await ledger.tenants() == sorted([NO_TENANT, "vip", "x", "y"])


async def test_tokens_limit(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(rules({"tenant": "t", "tokens_per_day": 1000}))
    assert isinstance(await ledger.reserve("t", 0.0, 600), Reservation)
    refused = await ledger.reserve("t", 0.0, 600)
    assert isinstance(refused, Exceeded) and refused.rule == "tokens_per_day"
    assert refused.spent == 600
    assert isinstance(await ledger.reserve("t", 0.0, 400), Reservation)


async def test_day_and_month_turn_with_the_clock(make_ledger: Callable[..., Ledger]) -> None:
    clock = Clock(datetime(2030, 1, 31, 23, 59, 30, tzinfo=UTC))
    ledger = make_ledger(rules({"tenant": "t", "usd_per_day": 3, "usd_per_month": 5}), clock)
    assert await reserve_until_refused(ledger, "t", 1.0) == 3
    refused = await ledger.reserve("t", 1.0, 0)
    assert isinstance(refused, Exceeded) and refused.rule == "usd_per_day"
    assert refused.retry_at == datetime(2030, 2, 1, tzinfo=UTC)

    clock.now = datetime(2030, 2, 1, 0, 0, 1, tzinfo=UTC)  # a new day and a new month
    assert await reserve_until_refused(ledger, "t", 1.0) == 3
    clock.now += timedelta(days=1)
    assert await reserve_until_refused(ledger, "t", 1.0) == 2  # the month's 5 are spent
    refused = await ledger.reserve("t", 1.0, 0)
    assert isinstance(refused, Exceeded) and refused.rule == "usd_per_month"
    assert refused.retry_at == datetime(2030, 3, 1, tzinfo=UTC)
    spend = await ledger.spend("t")
    assert (spend.usd_day, spend.usd_month) == (pytest.approx(2), pytest.approx(5))


async def test_an_estimate_over_the_limit_alone_never_fits(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger(rules({"tenant": "t", "usd_per_day": 1, "on_exceed": "wait"}))
    refused = await ledger.reserve("t", 1.5, 0)
    assert isinstance(refused, Exceeded)
    assert refused.retry_at is None  # waiting for the day to turn would not help


async def test_settle_corrects_by_the_difference_and_release_gives_back(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger(rules({"tenant": "t", "usd_per_day": 10, "tokens_per_day": 10_000}))
    first = await ledger.reserve("t", 5.0, 4000)
    second = await ledger.reserve("t", 3.0, 3000)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert isinstance(await ledger.reserve("t", 3.0, 0), Exceeded)

    await ledger.settle(first, 1.25, 1500)  # cheaper than estimated: 3.75 and 2500 back
    await ledger.settle(second, 3.5, 3100)  # dearer: 0.5 and 100 more
    spend = await ledger.spend("t")
    assert spend.usd_day == pytest.approx(4.75)
    assert spend.tokens_day == 4600
    assert spend.usd_month == pytest.approx(4.75)

    third = await ledger.reserve("t", 5.0, 5000)
    assert isinstance(third, Reservation)
    await ledger.release(third)
    spend = await ledger.spend("t")
    assert (spend.usd_day, spend.tokens_day) == (pytest.approx(4.75), 4600)


async def test_a_late_settlement_does_not_revive_an_expired_period(
    make_ledger: Callable[..., Ledger], redis_url: str
) -> None:
    clock = Clock(datetime(2030, 1, 15, 12, 0, tzinfo=UTC))
    ledger = make_ledger(rules({"tenant": "t", "usd_per_day": 10}), clock)
    held = await ledger.reserve("t", 2.0, 0)
    assert isinstance(held, Reservation)
    client = aioredis.Redis.from_url(redis_url)
    try:
        day_key = held.keys[0]
        ttl = await client.ttl(day_key)
        assert 12 * 3600 < ttl <= 12 * 3600 + 86400  # noon: half a day, plus the margin
        assert await client.ttl(held.keys[1]) > ttl
        await client.delete(day_key)  # as if it had expired
        await ledger.settle(held, 1.0, 0)
        assert not await client.exists(day_key)
    finally:
        await client.aclose()


async def test_replicas_never_overshoot(make_ledger: Callable[..., Ledger]) -> None:
    """Four replicas (ledgers, clients of their own) race for one tenant's budget."""
    budgets = rules({"tenant": "t", "usd_per_day": 50, "tokens_per_day": 10**9})
    replicas = [make_ledger(budgets) for _ in range(4)]
    granted: list[Reservation] = []

    async def race(ledger: Ledger) -> None:
        for _ in range(40):
            answer = await ledger.reserve("t", 1.0, 10)
            if isinstance(answer, Reservation):
                granted.append(answer)

    await asyncio.gather(*(race(ledger) for ledger in replicas))
    assert len(granted) == 50  # 160 asked; exactly the budget taken
    spend = await replicas[0].spend("t")
    assert (spend.usd_day, spend.tokens_day) == (pytest.approx(50), 500)


async def test_replicas_with_settlements_stay_within_the_estimates_in_flight(
    make_ledger: Callable[..., Ledger],
) -> None:
    budgets = rules({"tenant": "t", "usd_per_day": 20})
    replicas = [make_ledger(budgets) for _ in range(4)]
    rng = random.Random(7)
    in_flight = 0.0
    worst = 0.0

    async def worker(ledger: Ledger) -> None:
        nonlocal in_flight, worst
        for _ in range(60):
            estimate = rng.choice([0.5, 1.0, 2.0])
            answer = await ledger.reserve("t", estimate, 0)
            if not isinstance(answer, Reservation):
                continue
            in_flight += estimate
            spend = await ledger.spend("t")
            worst = max(worst, spend.usd_day)
            await asyncio.sleep(0)
            # The answer costs at most the estimate (the maximum output is an upper bound).
            await ledger.settle(answer, estimate * rng.uniform(0.1, 1.0), 0)
            in_flight -= estimate

    await asyncio.gather(*(worker(ledger) for ledger in replicas))
    spend = await replicas[0].spend("t")
    assert spend.usd_day <= 20 + 1e-9
    assert worst <= 20 + 1e-9  # reservations included, the limit always held
    assert in_flight == 0
