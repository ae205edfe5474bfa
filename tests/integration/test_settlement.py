"""Settling a job when a queue refuses what the worker publishes (issue 22, items 4, 5, 19):
exactly one result per job, refusals that are not the job's failure, nacks that pass.

Each ``test_itemN_...`` failed on the code before the fix and passes now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from support.broker import Replies, depth, drain, get_one, publish
from support.jobs import calls
from support.jobs import chat_job as job

from worker.amqp.topology import DELTA, H_UNROUTABLE_RESULT, TYPE_DELTA, TYPE_RESULT
from worker.messages import JobResult
from worker.mock.upstream import MockUpstream
from worker.service import Worker

StartWorker = Callable[..., Awaitable[Worker]]


async def full_queue(channel: AbstractChannel, connection: AbstractConnection, name: str) -> None:
    """Declare ``name`` as a quorum queue of one message that refuses more
    (``reject-publish``), and fill it until the broker refuses (a quorum queue takes one
    past its limit)."""
    await channel.declare_queue(
        name,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    filler = await connection.channel(publisher_confirms=True)
    for _ in range(5):
        try:
            await filler.default_exchange.publish(aio_pika.Message(b"{}"), name)
        except aiormq.exceptions.DeliveryError:
            break
    else:
        raise AssertionError(f"{name} never refused a publish")
    await filler.close()


def counter(worker: Worker, name: str) -> float:
    return sum(
        sample.value
        for metric in worker.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


# --- 4. a dead-letter queue that refuses the copy ------------------------------------------


async def test_item4_a_full_dead_letter_queue_costs_the_letter_not_a_second_result(
    start_worker: StartWorker,
    connection: AbstractConnection,
    names: dict[str, str],
    replies: Replies,
    mock: MockUpstream,
) -> None:
    channel = await connection.channel()
    await full_queue(channel, connection, names["dead_letter_queue"])
    worker = await start_worker(publish_retry_window=0.5)
    request = job(mock={"fault": "400"})
    await publish(connection, worker.settings.request_queue, request, reply_to=replies.name)
    first = await replies.until_results(1)
    await asyncio.sleep(3)  # a redelivery would have published another result by now
    results = [m for m in [*first, *replies.drain()] if m.type == TYPE_RESULT]
    assert len(results) == 1, "exactly one result"
    result = JobResult.model_validate_json(results[0].body)
    assert result.error is not None and result.error.code == "invalid_request"
    assert calls(mock, request) == 1
    assert await depth(connection, worker.settings.request_queue) == 0, "acknowledged"
    assert counter(worker, "chat_worker_dead_letters_lost_total") == 1


# --- 5. a refused delta on the result exchange ---------------------------------------------


async def test_item5_a_full_queue_bound_to_deltas_does_not_fail_the_job(
    start_worker: StartWorker,
    connection: AbstractConnection,
    names: dict[str, str],
    mock: MockUpstream,
) -> None:
    worker = await start_worker()
    channel = await connection.channel()
    listener = f"{names['request_queue']}.delta-listener"
    await full_queue(channel, connection, listener)
    try:
        bound = await channel.get_queue(listener)
        await bound.bind(worker.settings.result_exchange, DELTA)
        request = job(mock={"chunks": 6, "chunk_interval": 0.05}, stream=True)
        # No reply_to: the deltas go to the result exchange, where the full queue nacks.
        await publish(connection, worker.settings.request_queue, request)
        message = await get_one(connection, worker.settings.result_queue, timeout=20)
    finally:
        await channel.queue_delete(listener)
    result = JobResult.model_validate_json(message.body)
    assert result.error is None, result.error
    assert result.metadata.attempts == 1
    assert calls(mock, request) == 1, "no paid call was repeated"


async def test_item5_a_refused_delta_to_reply_to_still_moves_to_the_exchange(
    start_worker: StartWorker,
    connection: AbstractConnection,
    names: dict[str, str],
    mock: MockUpstream,
) -> None:
    """reply_to keeps today's fallback: the delta it refuses, and the rest, go to the
    exchange (where a queue of the test's own listens to them)."""
    worker = await start_worker()
    channel = await connection.channel()
    full = f"{names['request_queue']}.full-reply"
    await full_queue(channel, connection, full)
    listener = await channel.declare_queue(exclusive=True)
    await listener.bind(worker.settings.result_exchange, DELTA)
    try:
        request = job(mock={"chunks": 4, "chunk_interval": 0.05}, stream=True)
        await publish(connection, worker.settings.request_queue, request, reply_to=full)
        message = await get_one(connection, worker.settings.result_queue, timeout=20)
        result = JobResult.model_validate_json(message.body)
        assert result.error is None and result.metadata.attempts == 1
        deltas = []
        while (delta := await listener.get(fail=False, no_ack=True)) is not None:
            deltas.append(delta)
        assert deltas and all(d.type == TYPE_DELTA for d in deltas)
    finally:
        await channel.queue_delete(full)


# --- 19. a nacked result is published again ------------------------------------------------


async def test_item19_a_result_queue_that_refuses_for_a_while_gets_the_result(
    start_worker: StartWorker,
    connection: AbstractConnection,
    names: dict[str, str],
    mock: MockUpstream,
) -> None:
    channel = await connection.channel()
    await full_queue(channel, connection, names["result_queue"])
    worker = await start_worker(publish_retry_window=30)
    request = job()
    await publish(connection, worker.settings.request_queue, request, message_id="nacked")
    async with asyncio.timeout(10):
        while not calls(mock, request):
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # the worker is publishing the result again and again
    # Room again. The worker's next try may land while the queue drains: the filler comes
    # first, then at most the one result.
    drained = await drain(connection, names["result_queue"])
    assert drained and drained[0].type != TYPE_RESULT, "the filler held the queue"
    results = [m for m in drained if m.type == TYPE_RESULT]
    assert len(results) <= 1
    message = (
        results[0] if results else await get_one(connection, names["result_queue"], timeout=15)
    )
    assert message.type == TYPE_RESULT and H_UNROUTABLE_RESULT not in (message.headers or {})
    assert JobResult.model_validate_json(message.body).id == "nacked"
    await asyncio.sleep(0.3)
    assert await depth(connection, names["result_queue"]) == 0, "exactly one result"
    assert await depth(connection, worker.settings.dead_letter_queue) == 0, "not parked"
    assert await depth(connection, worker.settings.request_queue) == 0, "acknowledged"
    assert calls(mock, request) == 1
