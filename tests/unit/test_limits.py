"""The per-upstream gate on a fake clock: closing, reopening, cooling, pacing, local limits."""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from typing import Any

import pytest
import structlog

from worker.limits.configured import ConfiguredLimits, LocalQuota
from worker.limits.gate import Gate, GateState, Permit, Wait, estimate_tokens
from worker.mock.budget import BudgetConfig, OrgBudget, Report


class VirtualTime:
    """A clock whose sleeps pass in virtual time: many tasks may sleep at once, and they
    wake in order of their deadlines (see :meth:`run_until`)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), next(self._order), future))
        await future

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def run_until(self, end: float) -> None:
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            when, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self.now = end


def gate(clock: VirtualTime, limits: ConfiguredLimits | None = None) -> Gate:
    quota = LocalQuota(limits or ConfiguredLimits(), clock=clock.time)
    return Gate("openai", quota, clock=clock.time, sleep=clock.sleep)


def openai(requests: tuple[int, int], tokens: tuple[int, int] | None = None) -> dict[str, str]:
    headers = {
        "x-ratelimit-limit-requests": str(requests[0]),
        "x-ratelimit-remaining-requests": str(requests[1]),
    }
    if tokens:
        headers["x-ratelimit-limit-tokens"] = str(tokens[0])
        headers["x-ratelimit-remaining-tokens"] = str(tokens[1])
    return headers


async def test_open_gate_lets_calls_through_at_once() -> None:
    clock = VirtualTime()
    g = gate(clock)
    permit = await g.admit(100, limit=30)
    assert isinstance(permit, Permit) and permit.waited == 0
    assert g.state is GateState.OPEN and clock.slept == []


async def test_429_closes_until_retry_after_and_logs_each_change_once() -> None:
    clock = VirtualTime()
    g = gate(clock)
    with structlog.testing.capture_logs() as logs:
        g.observe(429, {"retry-after-ms": "2500"})
        g.observe(429, {"retry-after": "1"})  # shorter than the close in force: no change
        assert g.state is GateState.CLOSED
        task = asyncio.ensure_future(g.admit(10, limit=30))
        await clock.run_until(2.4)
        assert not task.done()
        await clock.run_until(2.6)
        permit = task.result()
        assert isinstance(permit, Permit) and permit.waited == pytest.approx(2.5)
        assert g.state is GateState.OPEN
    events = [entry["event"] for entry in logs]
    assert events == ["upstream gate closed", "upstream gate open"]


async def test_wait_past_the_limit_is_said_at_once() -> None:
    clock = VirtualTime()
    g = gate(clock)
    g.observe(429, {"retry-after": "45"})
    wait = await g.admit(10, limit=30)
    assert wait == Wait(45.0, 0.0, quota=False)
    assert clock.slept == []


async def test_429_without_hints_backs_off_doubling() -> None:
    clock = VirtualTime()
    g = gate(clock)
    closes = []
    for _ in range(4):
        g.observe(429, {})
        wait = await g.admit(1, limit=0)
        assert isinstance(wait, Wait)
        closes.append(wait.seconds)
        clock.now += wait.seconds
    assert closes == [1.0, 2.0, 4.0, 8.0]
    g.observe(200, {})
    g.observe(429, {})
    wait = await g.admit(1, limit=0)
    assert isinstance(wait, Wait) and wait.seconds == 1.0  # a success starts again


async def test_budget_read_as_spent_closes_until_it_refills() -> None:
    clock = VirtualTime()
    g = gate(clock)
    g.observe(200, openai((600, 0)))  # 10 requests a second refill
    assert g.state is GateState.CLOSED
    assert g.remaining() == {"requests": 0}
    wait = await g.admit(1, limit=0)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(0.1)


async def test_insufficient_quota_cools_then_one_call_probes() -> None:
    clock = VirtualTime()
    g = gate(clock)
    g.cool(300)
    assert g.state is GateState.COOLING
    wait = await g.admit(1, limit=30)
    assert isinstance(wait, Wait) and wait.quota and wait.seconds == 300
    clock.now = 300.0
    probe = await g.admit(1, limit=30)
    assert isinstance(probe, Permit) and probe.probe
    other = await g.admit(1, limit=0)
    assert isinstance(other, Wait) and other.quota  # waits for the probe's answer
    await g.release(probe)
    assert g.state is GateState.OPEN
    assert isinstance(await g.admit(1, limit=0), Permit)


async def test_probe_that_finds_quota_spent_keeps_cooling() -> None:
    clock = VirtualTime()
    g = gate(clock)
    g.cool(300)
    clock.now = 301.0
    probe = await g.admit(1, limit=0)
    assert isinstance(probe, Permit)
    g.cool(300)
    await g.release(probe, quota_spent=True)
    assert g.state is GateState.COOLING


async def test_configured_rpm_spreads_calls() -> None:
    clock = VirtualTime()
    g = gate(clock, ConfiguredLimits(rpm=120))  # 2 a second, at most 2 at once
    g.observe(200, {})  # an answer came: no more scouting one call at a time
    tasks = [asyncio.ensure_future(g.admit(1, limit=30)) for _ in range(6)]
    await clock.run_until(10)
    waited = sorted(round(t.result().waited, 3) for t in tasks)
    assert waited == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]


async def test_one_call_scouts_until_an_answer_tells_the_budget() -> None:
    clock = VirtualTime()
    g = gate(clock)
    scout = await g.admit(1, limit=30)
    assert isinstance(scout, Permit)
    second = asyncio.ensure_future(g.admit(1, limit=30))
    await clock.run_until(1.0)
    assert not second.done()
    g.observe(200, openai((6000, 5999)))
    await clock.run_until(1.1)
    assert isinstance(second.result(), Permit)


async def test_configured_tpm_is_corrected_by_usage() -> None:
    clock = VirtualTime()
    quota = LocalQuota(ConfiguredLimits(tpm=6000), clock=clock.time)  # 100 tokens a second
    assert await quota.reserve(100, horizon=10) == 0.0
    assert await quota.reserve(100, horizon=10) == pytest.approx(1.0)  # overdrawn: waits
    await quota.correct(-150)  # the two calls used 50 tokens: 150 back
    assert await quota.reserve(50, horizon=0) == 0.0
    assert await quota.reserve(1000, horizon=0.5) == pytest.approx(1.0)  # past the horizon:
    assert await quota.reserve(100, horizon=0) == pytest.approx(1.0)  # nothing was taken


async def test_configured_concurrency() -> None:
    clock = VirtualTime()
    g = gate(clock, ConfiguredLimits(max_concurrency=1))
    g.observe(200, {})
    first = await g.admit(1, limit=1)
    assert isinstance(first, Permit)
    second = asyncio.ensure_future(g.admit(1, limit=1))
    await clock.settle()
    assert not second.done()
    await g.release(first)
    await clock.settle()
    assert isinstance(second.result(), Permit)


def test_estimate_tokens() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "x" * 400},
            {"role": "user", "content": [{"type": "text", "text": "y" * 40}]},
        ],
        "max_completion_tokens": 50,
        "n": 2,
    }
    assert estimate_tokens(body) == (400 + 40 + 2 * 16) // 4 + 100
    assert estimate_tokens({"messages": [], "max_tokens": "lots"}) == 0


@pytest.mark.parametrize(
    ("given", "tokens"),
    [
        ("x" * 400, 100),
        ("hi", 1),  # a string is at least a token
        (["x" * 40, "y" * 8], 10 + 2),
        ([101, 2023, 102], 3),
        ([[101, 2023], [7], [1, 2, 3, 4]], 7),
    ],
)
def test_estimate_tokens_of_an_embeddings_input(given: Any, tokens: int) -> None:
    body = {"model": "e5", "input": given, "max_tokens": 50}  # no completion to allow for
    assert estimate_tokens(body, "embeddings") == tokens


@pytest.mark.parametrize(
    ("replicas", "retry_after", "report"),
    [(2, True, "minute"), (4, True, "minute"), (4, False, "minute"), (2, True, "window"),
     (4, True, "window")],
)  # fmt: skip
async def test_replicas_share_an_organisation_budget(
    replicas: int, retry_after: bool, report: Report
) -> None:
    """Gates that know nothing of each other, reading one simulated budget (enforced over
    one-second windows), stay inside it together and use most of it. ``minute``: tokens
    bind, the headers give the minute's budget. ``window`` (item 21): requests bind, and
    the headers give the one-second bucket as a share of the minute's limit."""
    clock = VirtualTime()
    body = {"messages": [{"role": "user", "content": "x" * 800}], "max_tokens": 100}
    counted = 800 // 4 + 100  # what the provider counts: 10 calls a second
    if report == "minute":
        rpm, tpm = 6000, 180_000
        calls_a_second = tpm / 60 / counted
    else:
        rpm, tpm = 1200, 10_000_000  # 20 calls a second
        calls_a_second = rpm / 60
    config = BudgetConfig(rpm=rpm, tpm=tpm, retry_after=retry_after, report=report)
    budget = OrgBudget(config, clock.time)
    cost = estimate_tokens(body)  # what the worker estimates (a little more)
    gates = [gate(clock) for _ in range(replicas)]

    async def job_loop(g: Gate) -> None:
        while True:
            permit = await g.admit(cost, limit=30)
            assert isinstance(permit, Permit)
            verdict = budget.admit(body)
            g.observe(429 if verdict.refused else 200, verdict.headers)
            if not verdict.refused:
                await clock.sleep(0.3)  # the call's latency
                budget.done()
            await g.release(permit)

    loops = [asyncio.ensure_future(job_loop(g)) for g in gates for _ in range(8)]
    seconds = 40.0
    await clock.run_until(seconds)
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    calls = budget.admitted + budget.refused
    goodput = budget.admitted / seconds / calls_a_second
    assert budget.refused / calls <= 0.05, (budget.admitted, budget.refused)
    assert goodput >= 0.9, goodput


# --- issue 22: hardening ---------------------------------------------------------------------


def test_estimate_is_capped_at_a_model_max() -> None:
    """Item 1: the schema bounds no max_tokens; no model takes more than a million tokens."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000_000}
    assert estimate_tokens(body) == 1_000_000
    assert estimate_tokens({**body, "max_tokens": 100, "n": 10**9}) == 1_000_000


@pytest.mark.parametrize("read_first", [True, False])
async def test_a_huge_estimate_that_fails_closes_nothing(read_first: bool) -> None:
    """Item 1: a call estimated at a million tokens is charged at most a second of either
    budget (the one read from headers, the configured one), and gives it back when it
    fails: the next call goes at once."""
    clock = VirtualTime()
    g = gate(clock, ConfiguredLimits(tpm=60_000))  # 1,000 tokens a second
    budget = {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "59000"}
    if read_first:
        g.observe(200, budget)
    huge = await g.admit(1_000_000, limit=30)
    assert isinstance(huge, Permit) and huge.tokens == 1000
    g.observe(400, budget)
    await g.release(huge, failed=True)
    after = await g.admit(100, limit=0)
    assert isinstance(after, Permit) and after.waited == 0
    await g.release(after, used_tokens=100)
    paced = asyncio.ensure_future(g.admit(100, limit=1))  # paced as any call, not for hours
    await clock.run_until(clock.now + 1)
    assert isinstance(paced.result(), Permit)
    assert g.state is GateState.OPEN


@pytest.mark.parametrize(
    "retry_after", ["31536000", "Fri, 01 Jan 2100 00:00:00 GMT"], ids=["seconds", "date"]
)
async def test_a_retry_after_of_years_closes_a_minute_then_one_call_probes(
    retry_after: str,
) -> None:
    """Item 6: no header closes the gate for more than a minute; then one call probes
    while the others wait, and its success reopens the gate."""
    clock = VirtualTime()
    g = gate(clock)
    g.observe(429, {"retry-after": retry_after})
    wait = await g.admit(1, limit=0)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(60)
    clock.now = 60.0
    assert g.state is GateState.CLOSED  # over, but not open until the probe says so
    probe = await g.admit(1, limit=0)
    assert isinstance(probe, Permit) and probe.probe
    other = await g.admit(1, limit=0)
    assert isinstance(other, Wait) and other.seconds < 1  # waits for the probe's answer
    g.observe(200, {})
    await g.release(probe)
    assert g.state is GateState.OPEN
    assert isinstance(await g.admit(1, limit=0), Permit)


async def test_a_probe_that_is_refused_again_closes_again_for_a_minute() -> None:
    clock = VirtualTime()
    g = gate(clock)
    g.observe(429, {"retry-after": "31536000"})
    clock.now = 60.0
    probe = await g.admit(1, limit=0)
    assert isinstance(probe, Permit) and probe.probe
    g.observe(429, {"retry-after": "31536000"})
    await g.release(probe, failed=True)
    wait = await g.admit(1, limit=0)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(60)


async def test_a_success_of_a_call_let_through_after_the_close_reopens() -> None:
    """Item 6: answers of calls that began before the close prove nothing; an answer of a
    call let through after it (the probe) does."""
    clock = VirtualTime()
    g = gate(clock)
    before = await g.admit(1, limit=0)
    assert isinstance(before, Permit)
    clock.now = 1.0
    g.observe(429, {"retry-after": "31536000"})

    async def answer_in_the_calls_context() -> None:
        g.observe(200, {})  # the reading of the call let through at 0, before the close

    await asyncio.get_running_loop().create_task(
        answer_in_the_calls_context(), context=copy_context_at(before)
    )
    assert g.state is GateState.CLOSED
    clock.now = 61.0
    probe = await g.admit(1, limit=0)
    assert isinstance(probe, Permit) and probe.probe
    g.observe(200, {})
    assert g.state is GateState.OPEN


def copy_context_at(permit: Permit) -> contextvars.Context:
    """A context as the task that made ``permit``'s call saw it."""
    from worker.limits import gate as gate_module

    context = contextvars.copy_context()
    context.run(gate_module._CALL.set, (permit.at, 1.0, float(permit.tokens), 0.0))
    return context


@pytest.mark.parametrize("state", ["cooling", "long close"])
async def test_a_probe_cancelled_at_the_gate_lets_another_probe(state: str) -> None:
    """Item 8: a probe cut short while it waits in ``admit`` (here for a concurrency slot)
    gives the probe back: the next call probes."""
    clock = VirtualTime()
    g = gate(clock, ConfiguredLimits(max_concurrency=1))
    held = await g.quota.acquire_slot(0)
    assert held is not None
    if state == "cooling":
        g.cool(300)
    else:
        g.observe(429, {"retry-after": "31536000"})
    clock.now = 301.0
    waiting = asyncio.ensure_future(g.admit(1, limit=30))
    await clock.settle()
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await g.quota.release_slot(held)
    probe = await g.admit(1, limit=0)
    assert isinstance(probe, Permit) and probe.probe


async def test_nothing_taken_stays_taken_when_admit_fails() -> None:
    """Item 8: an error in the configured limits while a call is admitted (Redis, say)
    gives back the pacing and the reservation taken for it."""
    clock = VirtualTime()
    quota = LocalQuota(ConfiguredLimits(tpm=6000, max_concurrency=1), clock=clock.time)
    g = Gate("openai", quota, clock=clock.time, sleep=clock.sleep)
    g.observe(200, {})

    async def broken(within: float) -> str | None:
        raise ConnectionError("Redis went away")

    real = quota.acquire_slot
    quota.acquire_slot = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await g.admit(100, limit=30)
    quota.acquire_slot = real  # type: ignore[method-assign]
    again = await g.admit(100, limit=0)  # the 100 tokens came back: no wait
    assert isinstance(again, Permit) and again.waited == 0
