"""Declaring the topology on a real broker: what a node down, or a legacy queue, does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractConnection
from support.broker import Replies, publish

import worker.service
from worker.amqp.connect import redact
from worker.amqp.topology import DELAY_TIERS, delay_queue_name
from worker.health import HealthServer
from worker.messages import JobResult
from worker.service import Worker

BODY = {"body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


async def readyz(health: HealthServer) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{health.port}/readyz")


async def test_a_queue_out_of_reach_leaves_the_worker_consuming_degraded_then_whole(
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    amqp_url: str,
    names: dict[str, str],
    replies: Replies,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker.service, "REDECLARE_INTERVAL", 0.5)
    # Another connection's exclusive queue under the dead-letter queue's name: the broker
    # refuses both a declare and a passive check (405), as it refuses a classic queue
    # whose home node is down (404), while the request queue is fine.
    owner = await aio_pika.connect(amqp_url)
    owner_channel = await owner.channel()
    await owner_channel.declare_queue(names["dead_letter_queue"], exclusive=True)
    running = await start_worker()
    health = HealthServer(
        lambda: running.ready,
        0,
        host="127.0.0.1",
        readiness=lambda: running.readiness,
        details=running.readiness_details,
    )
    await health.start()
    try:
        answer = await readyz(health)
        assert answer.status_code == 200, "consuming: ready, if degraded"
        body = answer.json()
        assert body["status"] == "degraded"
        assert list(body["unavailable"]) == [names["dead_letter_queue"]]
        assert "RESOURCE_LOCKED" in body["unavailable"][names["dead_letter_queue"]]
        assert body["node"] == redact(amqp_url) and ":guest@" not in body["node"]

        await publish(connection, running.settings.request_queue, BODY, reply_to=replies.name)
        result = JobResult.model_validate_json((await replies.get()).body)
        assert result.error is None, "jobs are served while a queue is out of reach"

        await owner.close()  # the queue is free again: the worker declares it by itself
        async with asyncio.timeout(15):
            while (await readyz(health)).json()["status"] != "ready":
                await asyncio.sleep(0.2)
        channel = await connection.channel()
        dlq = await channel.declare_queue(names["dead_letter_queue"], passive=True)
        assert dlq.name == names["dead_letter_queue"]
    finally:
        await health.stop()
        await owner.close()


async def test_a_quorum_worker_starts_beside_legacy_classic_delay_queues(
    start_worker: Callable[..., Awaitable[Worker]],
    connection: AbstractConnection,
    names: dict[str, str],
    replies: Replies,
) -> None:
    queue = names["request_queue"]
    channel = await connection.channel()
    await channel.declare_queue(
        queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names["dead_letter_queue"],
            "x-delivery-limit": 10,
        },
    )
    legacy = delay_queue_name(queue, 1, "classic")
    await channel.declare_queue(
        legacy,
        durable=True,
        arguments={
            "x-queue-type": "classic",
            "x-message-ttl": 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        },
    )
    # A job deferred by an older version still sits in its classic delay queue.
    await publish(connection, legacy, BODY, reply_to=replies.name, message_id="old-1")
    running = await start_worker(queue_type="quorum")
    assert running.readiness == "ready"
    result = JobResult.model_validate_json((await replies.get()).body)
    assert result.id == "old-1", "a legacy delay queue drains back by itself"
    for seconds in DELAY_TIERS:
        await channel.declare_queue(delay_queue_name(queue, seconds, "quorum"), passive=True)
