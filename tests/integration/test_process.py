"""Real worker processes against the real broker: kill -9, SIGTERM, connections cut.

Each test counts what it promised: every job ends with a result (lost = 0), and reports
how many jobs got a second result (allowed by at-least-once delivery).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from aio_pika.abc import AbstractConnection
from brokerctl import close_connections_of
from support.broker import publish
from support.process import Results, WorkerProcess

from worker.amqp.topology import declare
from worker.mock.upstream import MockUpstream
from worker.settings import Settings


@pytest.fixture
async def results(connection: AbstractConnection, settings: Settings) -> Results:
    collected = Results()
    # Jobs are published before any worker runs: declare what the worker would.
    await declare(connection, settings)
    channel = await connection.channel()
    queue = await channel.get_queue(settings.result_queue)
    await queue.consume(collected.on_message, no_ack=True)
    return collected


async def fill(
    connection: AbstractConnection, settings: Settings, count: int, latency: float
) -> set[str]:
    ids = {f"job-{n}" for n in range(count)}
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "mock": {"latency": latency},
    }
    for job_id in sorted(ids):
        await publish(connection, settings.request_queue, {"body": body}, message_id=job_id)
    return ids


async def test_kill_9_with_jobs_in_flight_loses_nothing(
    settings: Settings, connection: AbstractConnection, results: Results, mock: MockUpstream
) -> None:
    ids = await fill(connection, settings, 200, latency=0.2)
    first = WorkerProcess(settings, concurrency=16)
    try:
        await results.until(lambda: len(results.by_id) >= 40, timeout=60)
        assert mock.stats.total > len(results.by_id), "jobs are in flight at the kill"
        os.kill(first.pid, signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
    finally:
        first.kill()
    second = WorkerProcess(settings, concurrency=16)
    try:
        await results.until(lambda: set(results.by_id) >= ids, timeout=90)
    finally:
        second.kill()
    lost, duplicated = results.report(ids, "kill -9")
    assert lost == 0
    assert duplicated <= 16, "only jobs in flight at the kill may be done twice"


async def test_sigterm_drains_in_flight_jobs_and_exits_0(
    settings: Settings, connection: AbstractConnection, results: Results, mock: MockUpstream
) -> None:
    ids = await fill(connection, settings, 20, latency=1.5)
    process = WorkerProcess(settings, concurrency=8, shutdown_grace=10)
    try:
        async with asyncio.timeout(30):
            while mock.stats.total < 8:
                await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        process.process.send_signal(signal.SIGTERM)
        assert await process.wait(15) == 0
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        process.kill()
    assert elapsed < 10, "exits within the grace period"
    finished = set(results.by_id)
    assert len(finished) >= 8, "jobs in flight at SIGTERM finish"
    assert mock.stats.total == 8, "no job is started after SIGTERM"
    channel = await connection.channel()
    queue = await channel.declare_queue(settings.request_queue, passive=True)
    assert queue.declaration_result.message_count == len(ids) - len(finished)
    rest = WorkerProcess(settings)
    try:
        await results.until(lambda: set(results.by_id) >= ids, timeout=60)
    finally:
        rest.kill()
    lost, _ = results.report(ids, "SIGTERM")
    assert lost == 0


async def test_sigterm_past_the_grace_period_returns_jobs_to_the_queue(
    settings: Settings, connection: AbstractConnection, results: Results, mock: MockUpstream
) -> None:
    ids = await fill(connection, settings, 4, latency=30)
    process = WorkerProcess(settings, concurrency=4, shutdown_grace=1)
    try:
        async with asyncio.timeout(30):
            while mock.stats.total < 4:
                await asyncio.sleep(0.05)
        process.process.send_signal(signal.SIGTERM)
        assert await process.wait(10) == 0
    finally:
        process.kill()
    assert not results.by_id
    channel = await connection.channel()
    queue = await channel.declare_queue(settings.request_queue, passive=True)
    assert queue.declaration_result.message_count == len(ids)


async def test_connections_cut_under_load_resume_and_lose_nothing(
    settings: Settings, connection: AbstractConnection, results: Results, mock: MockUpstream
) -> None:
    ids = await fill(connection, settings, 400, latency=0.05)
    process = WorkerProcess(settings, concurrency=32)
    try:
        for cut in (50, 200):
            await results.until(lambda n=cut: len(results.by_id) >= n, timeout=60)
            closed = await asyncio.to_thread(close_connections_of, process.pid)
            assert closed, "the worker's connection is listed by the broker"
        await results.until(lambda: set(results.by_id) >= ids, timeout=120)
        assert process.process.poll() is None, "the worker survived both cuts"
    finally:
        process.kill()
    lost, _ = results.report(ids, "connection cuts")
    assert lost == 0
