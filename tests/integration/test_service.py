"""The worker's life cycle in-process: lost consumers and connections, an unreachable broker,
stopping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from aio_pika.abc import AbstractConnection
from amqp_proxy import AmqpProxy
from support.broker import Replies, fresh_telemetry, make_settings, publish

import worker.service
from worker.messages import JobResult
from worker.mock.upstream import MockUpstream
from worker.service import BrokerUnavailable, Worker

BODY = {"body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


async def test_consuming_resumes_after_the_broker_cancels_the_consumer(
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    replies: Replies,
) -> None:
    running = await start_worker()
    channel = await connection.channel()
    # Deleting the queue makes the broker cancel the consumer while the connection stays up
    # (aio-pika issues #231, #334): the worker must notice and consume again.
    await channel.queue_delete(running.settings.request_queue)
    async with asyncio.timeout(15):
        while running.ready:
            await asyncio.sleep(0.01)
        await running.wait_ready()
    await publish(connection, running.settings.request_queue, BODY, reply_to=replies.name)
    result = JobResult.model_validate_json((await replies.get()).body)
    assert result.error is None


async def test_an_unreachable_broker_ends_the_worker_with_an_error(
    monkeypatch: pytest.MonkeyPatch, names: dict[str, str], mock: MockUpstream
) -> None:
    monkeypatch.setattr(worker.service, "RESUME_DEADLINE", 1.0)
    settings = make_settings("amqp://guest:guest@127.0.0.1:1/", names, mock)
    running = Worker(settings)
    with pytest.raises(BrokerUnavailable, match="not consuming for 1s"):
        await asyncio.wait_for(running.run(), 20)
    assert not running.ready


async def test_item2_quick_losses_in_a_row_reconnect_after_a_growing_pause(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, connection: AbstractConnection
) -> None:
    """A connection the broker closes right after it opens (a message that breaks it) is
    not reopened at once again and again: the first loss reconnects at once, the next ones
    after a pause that doubles."""
    async with AmqpProxy(amqp_url) as proxy:
        running = Worker(make_settings(proxy.url, names, mock), telemetry=fresh_telemetry())
        task = asyncio.create_task(running.run())
        try:
            async with asyncio.timeout(15):
                await running.wait_ready()
            took = []
            for _ in range(4):
                proxy.cut()
                cut = time.monotonic()
                async with asyncio.timeout(15):
                    while running.ready:
                        await asyncio.sleep(0.005)
                    await running.wait_ready()
                took.append(time.monotonic() - cut)
        finally:
            running.stop()
            await asyncio.wait_for(task, 30)
    assert took[0] < 0.45, took  # at once
    assert took[1] >= 0.5 and took[2] >= 1.0 and took[3] >= 2.0, took


async def _blocked_with_a_job_in_flight(
    proxy: AmqpProxy, running: Worker, connection: AbstractConnection
) -> asyncio.Task[None]:
    """Start ``running``, give it a slow job, then play a resource alarm: the broker stops
    reading the connection (no answer to a cancel or a close) and holds its frames."""
    task = asyncio.create_task(running.run())
    async with asyncio.timeout(15):
        await running.wait_ready()
    slow = {"body": {**BODY["body"], "mock": {"latency": 60}}}
    await publish(connection, running.settings.request_queue, slow)
    async with asyncio.timeout(10):
        while not running.in_flight:
            await asyncio.sleep(0.01)
    proxy.block("memory alarm (test)", hold=True, deaf=True)
    await asyncio.sleep(0.3)
    return task


async def test_item12_a_stop_while_the_broker_blocks_ends_within_the_grace(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, connection: AbstractConnection
) -> None:
    async with AmqpProxy(amqp_url) as proxy:
        settings = make_settings(proxy.url, names, mock, shutdown_grace=2.0)
        running = Worker(settings, telemetry=fresh_telemetry())
        task = await _blocked_with_a_job_in_flight(proxy, running, connection)
        stopped = time.monotonic()
        running.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        finally:
            proxy.unblock()
            running.stop()
            await asyncio.wait_for(task, 30)
        took = time.monotonic() - stopped
    assert took < settings.shutdown_grace + 1.5, took


async def test_item12_a_second_stop_ends_at_once_while_the_broker_blocks(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, connection: AbstractConnection
) -> None:
    async with AmqpProxy(amqp_url) as proxy:
        settings = make_settings(proxy.url, names, mock, shutdown_grace=30.0)
        running = Worker(settings, telemetry=fresh_telemetry())
        task = await _blocked_with_a_job_in_flight(proxy, running, connection)
        running.stop()
        await asyncio.sleep(0.5)
        again = time.monotonic()
        running.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        finally:
            proxy.unblock()
            await asyncio.wait_for(task, 60)
        took = time.monotonic() - again
    assert took < 1.0, took


async def test_item20_a_silent_connection_is_left_within_two_heartbeats(
    amqp_url: str, names: dict[str, str], mock: MockUpstream, connection: AbstractConnection
) -> None:
    """A node cut off without a reset (packets dropped both ways): the worker notices from
    its unconfirmed probe and connects again (to the next node; here the proxy again)."""
    async with AmqpProxy(amqp_url) as proxy:
        settings = make_settings(proxy.url, names, mock, amqp_heartbeat=2)
        running = Worker(settings, telemetry=fresh_telemetry())
        task = asyncio.create_task(running.run())
        try:
            async with asyncio.timeout(15):
                await running.wait_ready()
            proxy.silence()
            silenced = time.monotonic()
            async with asyncio.timeout(30):
                while running.ready:
                    await asyncio.sleep(0.05)
            noticed = time.monotonic() - silenced
            async with asyncio.timeout(15):
                await running.wait_ready()
            replies_queue = f"{names['request_queue']}.replies"
            channel = await connection.channel()
            replies = await channel.declare_queue(replies_queue, exclusive=True)
            await publish(connection, settings.request_queue, BODY, reply_to=replies_queue)
            async with asyncio.timeout(15):
                while (answer := await replies.get(fail=False, no_ack=True)) is None:
                    await asyncio.sleep(0.05)
            assert JobResult.model_validate_json(answer.body).error is None
        finally:
            running.stop()
            await asyncio.wait_for(task, 30)
    assert noticed < 2 * settings.amqp_heartbeat + 0.5, noticed
