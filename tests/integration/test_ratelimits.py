"""Rate limits end to end (contract §11): worker processes sharing one budget on the mock's
organisation budget, a job that waits too long, configured limits shared through Redis (and
what becomes of them when a job asks for a billion tokens, when Redis goes away, when a
call outlasts its lease: issue 22)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from structlog.testing import capture_logs
from support.broker import fresh_telemetry, get_one, make_settings, publish
from support.forward import Forwarder
from support.process import WorkerProcess, free_port

from worker.amqp.topology import declare
from worker.limits.configured import ConfiguredLimits, RedisQuota
from worker.limits.gate import Gate, Permit, Wait
from worker.mock.budget import BudgetConfig
from worker.mock.upstream import MockConfig, MockUpstream
from worker.service import Worker
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
    monkeypatch.setattr("worker.retry.RATE_LIMIT_INLINE_WAIT", 0.5)
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


# --- issue 22: hardening the rate-limit gates ----------------------------------------------


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Worker]:
    """A worker in this event loop, stopped (drained) on the way out."""
    worker = Worker(settings, telemetry=fresh_telemetry())
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(15):
            await worker.wait_ready()
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


def gauge(worker: Worker, name: str) -> float | None:
    """The upstream's value of a metric as ``/metrics`` shows it (None: no sample)."""
    values = [
        sample.value
        for metric in worker.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == name and sample.labels.get("upstream") == "default"
    ]
    return values[0] if values else None


async def test_a_billion_token_job_leaves_shared_limits_open_for_later_replicas(
    amqp_url: str,
    names: dict[str, str],
    mock: MockUpstream,
    connection: AbstractConnection,
    redis_url: str,
) -> None:
    """Item 1: the upstream answers 400 to a job asking ``max_tokens: 1000000000``; with the
    tpm shared in Redis, the replica's next jobs and those of a replica started afterwards
    go at once (they used to fail rate_limited, "waited 0.0s", for hours)."""
    settings = make_settings(amqp_url, names, mock, redis_url=redis_url, upstream_tpm=60_000)
    results = await collect(connection, settings)
    huge = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1_000_000_000,
        "mock": {"fault": "400"},
    }
    plain = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    async with running(settings):
        await publish(connection, settings.request_queue, {"body": huge}, message_id="huge")
        await results.until(1, timeout=30)
        await publish(connection, settings.request_queue, {"body": plain}, message_id="same")
        await results.until(2, timeout=30)
    async with running(settings):  # a replica started afterwards
        await publish(connection, settings.request_queue, {"body": plain}, message_id="later")
        await results.until(3, timeout=30)
    assert results.by_id["huge"]["error"]["code"] == "invalid_request"
    for job_id in ("same", "later"):
        result = results.by_id[job_id]
        assert result["error"] is None, result["error"]
        assert result["metadata"]["rate_limit_wait_ms"] < 1000


async def test_redis_cut_mid_call_or_away_keeps_limits_per_process_until_it_is_back(
    amqp_url: str,
    names: dict[str, str],
    mock: MockUpstream,
    connection: AbstractConnection,
    redis_url: str,
) -> None:
    """Item 9: Redis cut while a call is under way: the paid answer is the job's result (no
    redelivery, no second call); while Redis is away, jobs go under per-process limits (a
    gauge and one log line say so), and the shared limits come back by themselves."""
    target = urlsplit(redis_url)
    forwarder = Forwarder(free_port(), (target.hostname or "127.0.0.1", target.port or 6379))
    await forwarder.start()
    through = urlunsplit(target._replace(netloc=f"127.0.0.1:{forwarder.port}"))
    settings = make_settings(
        amqp_url,
        names,
        mock,
        redis_url=through,
        upstream_max_concurrency=4,
        upstream_tpm=600_000,
    )
    results = await collect(connection, settings)
    slow = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "mock": {"latency": 1.0},
    }
    plain = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    try:
        with capture_logs() as logs:
            async with running(settings) as worker:
                before = gauge(worker, "chat_worker_shared_limits_degraded")
                await publish(connection, settings.request_queue, {"body": slow}, message_id="cut")
                async with asyncio.timeout(10):
                    while mock.stats.total < 1:
                        await asyncio.sleep(0.02)
                await forwarder.stop()  # mid-call
                await results.until(1, timeout=30)
                assert results.by_id["cut"]["error"] is None, results.by_id["cut"]["error"]
                for n in range(5):
                    body = {"body": plain}
                    await publish(connection, settings.request_queue, body, message_id=f"away-{n}")
                await results.until(6, timeout=30)
                assert all(r["error"] is None for r in results.by_id.values()), results.by_id
                assert (before, gauge(worker, "chat_worker_shared_limits_degraded")) == (0, 1)
                await forwarder.start()
                async with asyncio.timeout(20):
                    n = 0
                    while gauge(worker, "chat_worker_shared_limits_degraded") != 0:
                        n += 1
                        body = {"body": plain}
                        await publish(
                            connection, settings.request_queue, body, message_id=f"back-{n}"
                        )
                        await asyncio.sleep(0.5)
        await asyncio.sleep(1)
    finally:
        await forwarder.stop()
    assert all(r["error"] is None for r in results.by_id.values()), results.by_id
    assert results.count["cut"] == 1, "the answer paid for is the result: no redelivery"
    assert mock.stats.total == len(results.by_id), "one call per job"
    changes = [
        e["event"]
        for e in logs
        if e["event"] in ("Redis unavailable: limits kept per process until it answers",
                          "shared limits back in Redis")
    ]  # fmt: skip
    assert changes == [
        "Redis unavailable: limits kept per process until it answers",
        "shared limits back in Redis",
    ]
    assert await queue_depth(connection, settings.dead_letter_queue) == 0


async def test_a_shared_concurrency_lease_is_renewed_while_its_call_runs(
    redis_url: str, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 10: a call that outlasts the lease's time to live (a long stream) keeps its
    shared slot: no second call starts beside it, on this replica or another."""
    monkeypatch.setattr("worker.limits.configured.LEASE_MARGIN", 0.0)
    limits = ConfiguredLimits(max_concurrency=1)
    key = names["request_queue"]  # this test's alone
    one, other = (
        Gate.from_limits("default", limits, redis_url=redis_url, shared_as=key, lease_seconds=0.3)
        for _ in range(2)
    )
    try:
        one.observe(200, {})
        other.observe(200, {})
        streaming = await one.admit(1, limit=1)
        assert isinstance(streaming, Permit)
        for _ in range(6):  # 1.2 s: four times the lease's time to live
            assert isinstance(await other.admit(1, limit=0.2), Wait)
        await one.release(streaming)
        assert isinstance(await other.admit(1, limit=1), Permit)
    finally:
        await one.aclose()
        await other.aclose()
