"""Rate limits end to end (contract §11): worker processes sharing one budget on the mock's
organisation budget, a job that waits too long, configured limits shared through Redis."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from support.broker import get_one, make_settings, publish
from support.process import WorkerProcess

from worker.amqp.topology import declare
from worker.limits.configured import ConfiguredLimits, RedisQuota
from worker.mock.budget import BudgetConfig
from worker.mock.upstream import MockConfig, MockUpstream
from worker.settings import Settings


class Collected:
    """Results by job id, as they land on the result queue."""

    def __init__(self) -> None:
        self.by_id: dict[str, dict[str, Any]] = {}
        self.count: collections.Counter[str] = collections.Counter()
        self.changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        result = orjson.loads(message.body)
        self.by_id[result["id"]] = result
        self.count[result["id"]] += 1
        self.changed.set()

    async def until(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.by_id) < count:
                self.changed.clear()
                await self.changed.wait()


async def collect(connection: AbstractConnection, settings: Settings) -> Collected:
    collected = Collected()
    await declare(connection, settings)
    channel = await connection.channel()
    queue = await channel.get_queue(settings.result_queue)
    await queue.consume(collected.on_message, no_ack=True)
    return collected


async def fill(connection: AbstractConnection, settings: Settings, count: int) -> set[str]:
    # Ids of this run alone: with Redis the result store would answer a reused one (§16).
    run = uuid.uuid4().hex[:8]
    ids = {f"job-{run}-{n}" for n in range(count)}
    for n, job_id in enumerate(sorted(ids)):
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "word " * (20 + n % 7 * 30)}],
            "max_tokens": 32,
            "stream": n % 5 == 0,
            "mock": {"latency": 0.1},
        }
        await publish(connection, settings.request_queue, {"body": body}, message_id=job_id)
    return ids


async def queue_depth(connection: AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return declared.declaration_result.message_count or 0


@pytest.fixture
async def org_mock() -> AsyncIterator[MockUpstream]:
    """The mock with an organisation budget: 600 requests a minute (10 a second, enforced
    over one-second windows), answers with OpenAI's headers."""
    config = MockConfig(api_key="sk-test-0123456789", budget=BudgetConfig(rpm=600))
    async with MockUpstream(config) as server:
        yield server


async def test_two_processes_share_a_budget_and_no_job_fails(
    amqp_url: str,
    names: dict[str, str],
    org_mock: MockUpstream,
    connection: AbstractConnection,
) -> None:
    settings = make_settings(amqp_url, names, org_mock)
    results = await collect(connection, settings)
    jobs = 80
    ids = await fill(connection, settings, jobs)
    workers = [WorkerProcess(settings, concurrency=16) for _ in range(2)]
    try:
        await results.until(jobs, timeout=120)
    finally:
        for process in workers:
            process.kill()
    assert set(results.by_id) == ids
    failed = [r["error"] for r in results.by_id.values() if r["error"] is not None]
    assert failed == []
    refused = org_mock.stats.faults["rate_limit"]
    print(f"\n2 processes, {jobs} jobs on 10 requests/s: {refused} 429s")
    assert refused <= jobs // 10, "429s stay few: the workers pace themselves"
    assert org_mock.stats.total == jobs + refused
    waits = [r["metadata"]["rate_limit_wait_ms"] for r in results.by_id.values()]
    assert max(waits) > 0, "jobs waited for budget rather than failing"
    assert {r["metadata"]["upstream"] for r in results.by_id.values()} == {"default"}
    assert await queue_depth(connection, settings.dead_letter_queue) == 0


async def test_wait_past_max_wait_fails_rate_limited_and_dead_letters_once(
    amqp_url: str,
    names: dict[str, str],
    mock: MockUpstream,
    connection: AbstractConnection,
    start_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Waits over half a second leave the process: the job goes round the delay queue and
    # carries its wait with it.
    monkeypatch.setattr("worker.runner.RATE_LIMIT_INLINE_WAIT", 0.5)
    settings = make_settings(amqp_url, names, mock, rate_limit_max_wait=4)
    results = await collect(connection, settings)
    await start_worker(rate_limit_max_wait=4)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "mock": {"fault": "429", "retry_after": 2},
    }
    await publish(connection, settings.request_queue, {"body": body}, message_id="patient")
    await results.until(1, timeout=60)
    result = results.by_id["patient"]
    assert result["error"]["code"] == "rate_limited"
    assert "WORKER_RATE_LIMIT_MAX_WAIT" in result["error"]["message"]
    assert result["error"]["status_code"] == 429
    assert result["metadata"]["attempts"] == 0, "calls refused for budget are not attempts"
    assert 2000 <= result["metadata"]["rate_limit_wait_ms"] <= 4000 + 100  # timers round
    assert mock.stats.total >= 2, "it came back from the delay queue and was refused again"
    dead = await get_one(connection, settings.dead_letter_queue)
    assert dead.headers["x-error-code"] == "rate_limited"
    await asyncio.sleep(1.5)
    assert results.count["patient"] == 1
    assert await queue_depth(connection, settings.dead_letter_queue) == 0, "dead-lettered once"


@pytest.fixture
async def busy_mock() -> AsyncIterator[MockUpstream]:
    """A server that sends no rate-limit headers and answers 429 past 4 calls at once."""
    budget = BudgetConfig(max_concurrent=4, retry_after=False)
    async with MockUpstream(MockConfig(api_key="sk-test-0123456789", budget=budget)) as server:
        yield server


async def test_two_processes_share_max_concurrency_through_redis(
    amqp_url: str,
    names: dict[str, str],
    busy_mock: MockUpstream,
    connection: AbstractConnection,
    redis_url: str,
) -> None:
    settings = make_settings(
        amqp_url, names, busy_mock, upstream_max_concurrency=4, redis_url=redis_url
    )
    results = await collect(connection, settings)
    jobs = 60
    ids = await fill(connection, settings, jobs)
    workers = [WorkerProcess(settings, concurrency=16) for _ in range(2)]
    try:
        await results.until(jobs, timeout=120)
    finally:
        for process in workers:
            process.kill()
    assert set(results.by_id) == ids
    assert all(r["error"] is None for r in results.by_id.values())
    assert busy_mock.stats.faults["rate_limit"] == 0, "never more than 4 calls at once"
    assert busy_mock.stats.total == jobs


async def test_redis_quota_is_one_budget_for_every_replica(redis_url: str, names: Any) -> None:
    limits = ConfiguredLimits(rpm=60, max_concurrency=2)  # one a second; two at once
    key = names["request_queue"]  # this test's alone
    replicas = [RedisQuota(redis_url, key, limits, lease_seconds=5) for _ in range(3)]
    try:
        waits = [await quota.reserve(10, horizon=10) for quota in replicas]
        assert waits[0] == 0.0
        assert waits[1] == pytest.approx(1.0, abs=0.05)  # the second waits for the first
        assert waits[2] == pytest.approx(2.0, abs=0.05)
        assert await replicas[0].reserve(1, horizon=0.5) > 0.5  # past the horizon: not taken
        assert await replicas[1].reserve(1, horizon=3.5) == pytest.approx(3.0, abs=0.05)
        slots = [await quota.acquire_slot(0.2) for quota in replicas]
        assert sum(slot is not None for slot in slots) == 2
        held = next(slot for slot in slots if slot)
        holder = replicas[slots.index(held)]
        await holder.release_slot(held)
        assert await replicas[2].acquire_slot(0.5) is not None
    finally:
        for quota in replicas:
            await quota.aclose()
