"""One lease per call (issue 22 item 8): whatever way a call ends, the probe, the gate's
budget and the slot are given back, and the pool hears how it ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import structlog

from worker.errors import QuotaExceeded, RateLimited, UpstreamError
from worker.limits.configured import ConfiguredLimits, LocalQuota
from worker.limits.gate import Gate, GateState, Permit, Wait
from worker.settings import UpstreamSpec
from worker.upstream.pool import Lease, Member, UpstreamPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Held(LocalQuota):
    """Configured limits that count what is held, and may fail on the way back."""

    def __init__(self, limits: ConfiguredLimits, *, failing: bool = False) -> None:
        super().__init__(limits)
        self.failing = failing
        self.slots = 0
        self.corrections: list[int] = []

    async def acquire_slot(self, within: float) -> str | None:
        slot = await super().acquire_slot(within)
        self.slots += slot is not None
        return slot

    async def release_slot(self, slot: str) -> None:
        self.slots -= 1
        await super().release_slot(slot)
        if self.failing:
            raise ConnectionError("Redis went away")

    async def correct(self, tokens: int, requests: int = 0) -> None:
        self.corrections.append(tokens)
        await super().correct(tokens, requests)


PoolWith = Callable[[Held, Clock], tuple[UpstreamPool, Member, Gate]]


@pytest.fixture
async def opened() -> AsyncIterator[list[UpstreamPool]]:
    pools: list[UpstreamPool] = []
    yield pools
    for pool in pools:
        await pool.aclose()


@pytest.fixture
def pool_with(opened: list[UpstreamPool]) -> PoolWith:
    def make(quota: Held, clock: Clock) -> tuple[UpstreamPool, Member, Gate]:
        pool, primary, gate = cooled_pool(quota, clock)
        opened.append(pool)
        return pool, primary, gate

    return make


def cooled_pool(quota: Held, clock: Clock) -> tuple[UpstreamPool, Member, Gate]:
    """Two upstreams; the first cooled down and due for its probe, with ``quota``."""
    specs = [
        UpstreamSpec(name=name, base_url=f"http://{name}.test/v1", models=["*"], priority=p)
        for p, name in enumerate(("primary", "backup"))
    ]
    gate = Gate("primary", quota, clock=clock)
    pool = UpstreamPool.from_specs(specs, gate=lambda s: gate if s.name == "primary" else None)
    pool._clock = clock
    primary = pool.members[0]
    for _ in range(primary.spec.cooldown.failures):
        pool.report(primary, UpstreamError("500"), probe=False)
    clock.now += primary.spec.cooldown.seconds + 1
    return pool, primary, gate


@pytest.fixture
def clock() -> Clock:
    return Clock()


def the_probe(pool: UpstreamPool) -> Lease:
    lease = pool.lease("m", 100, pool.members[1:])  # the backup is not wanted
    assert lease is not None and lease.name == "primary" and lease.probe
    return lease


async def test_a_success_gives_everything_back_and_corrects_the_tokens(
    clock: Clock, pool_with: PoolWith
) -> None:
    quota = Held(ConfiguredLimits(tpm=60_000, max_concurrency=2))
    pool, primary, _ = pool_with(quota, clock)
    async with the_probe(pool) as lease:
        assert isinstance(await lease.admit(30), Permit)
        assert quota.slots == 1 and primary.probing
        lease.answered(40)
    assert quota.slots == 0 and not primary.probing
    assert pool.states()["primary"] == "open"  # the probe's success brought it back
    assert quota.corrections == [40 - 100]


@pytest.mark.parametrize(
    "raised",
    [UpstreamError("502"), RateLimited("429"), asyncio.CancelledError(), KeyError("a bug")],
    ids=["upstream error", "429", "cancelled", "bug"],
)
async def test_every_way_out_frees_the_probe_slot_and_charge(
    clock: Clock, pool_with: PoolWith, raised: BaseException
) -> None:
    quota = Held(ConfiguredLimits(tpm=60_000, max_concurrency=2))
    pool, primary, _ = pool_with(quota, clock)

    async def call() -> None:
        async with the_probe(pool) as lease:
            assert isinstance(await lease.admit(30), Permit)
            raise raised

    with pytest.raises(type(raised)):
        await call()
    assert quota.slots == 0 and not primary.probing
    # Failed without usage: the charge comes back, unless refused for budget (a 429 says
    # the budget is spent: giving back would only bring the next 429 sooner).
    assert quota.corrections == ([] if isinstance(raised, RateLimited) else [-100])
    states = pool.states()
    if isinstance(raised, UpstreamError):
        assert states["primary"] == "cooling"  # the probe failed: cooled again
    elif isinstance(raised, RateLimited):
        assert states["primary"] == "open"  # a 429 proves it alive
    else:
        assert states["primary"] == "probing"  # proves nothing: the next job probes


async def test_insufficient_quota_cools_the_gate(clock: Clock, pool_with: PoolWith) -> None:
    quota = Held(ConfiguredLimits())
    pool, _, gate = pool_with(quota, clock)

    async def call() -> None:
        async with the_probe(pool) as lease:
            await lease.admit(30)
            raise QuotaExceeded("insufficient_quota")

    with pytest.raises(QuotaExceeded):
        await call()
    assert gate.state is GateState.COOLING


async def test_a_wait_at_the_gate_is_no_call(clock: Clock, pool_with: PoolWith) -> None:
    quota = Held(ConfiguredLimits())
    pool, primary, gate = pool_with(quota, clock)
    gate.close(20, reason="test")
    async with the_probe(pool) as lease:
        assert isinstance(await lease.admit(5), Wait)
    assert not primary.probing and quota.corrections == []
    assert pool.states()["primary"] == "probing"  # nothing learnt: still due for a probe


async def test_a_cancelled_admit_frees_the_probe(clock: Clock, pool_with: PoolWith) -> None:
    quota = Held(ConfiguredLimits(max_concurrency=1))
    pool, primary, _ = pool_with(quota, clock)
    held = await quota.acquire_slot(0)
    assert held is not None

    async def probe() -> None:
        async with the_probe(pool) as lease:
            await lease.admit(30)

    task = asyncio.ensure_future(probe())
    for _ in range(10):
        await asyncio.sleep(0)
    assert primary.probing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not primary.probing


async def test_an_error_giving_back_is_logged_and_never_raised(
    clock: Clock, pool_with: PoolWith
) -> None:
    quota = Held(ConfiguredLimits(tpm=60_000, max_concurrency=2), failing=True)
    pool, primary, _ = pool_with(quota, clock)
    with structlog.testing.capture_logs() as logs:
        async with the_probe(pool) as lease:
            await lease.admit(30)
            lease.answered(100)
    assert not primary.probing and pool.states()["primary"] == "open"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "releasing an upstream's budget failed"
    ]


async def test_a_member_without_a_gate_is_leased_all_the_same(
    opened: list[UpstreamPool],
) -> None:
    spec = UpstreamSpec(name="only", base_url="http://only.test/v1", models=["*"])
    pool = UpstreamPool.from_specs([spec])
    opened.append(pool)
    lease = pool.lease("m", 10)
    assert lease is not None and lease.gate is None
    async with lease:
        assert isinstance(await lease.admit(0), Permit)
        lease.answered(None)
